"""The chunked loss in seq2seq and masked LM: equal to HF's own loss, and to the full-logits path in value and in
every gradient (head weight and bias included), on both backends, tied and untied, with and without an adapter."""

import pytest
import torch
import transformers as T

from finetune.tasks import MaskedLM, Seq2Seq
from finetune.tasks.masked_lm import mask_tokens
from tests.conftest import T5, make_tokenizer

LORA = {"preset": "lora", "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def t5_tied(tmp_path_factory):
    """A T5 v1.0 stand-in: head tied to the embedding and fed d_model^-0.5-scaled states."""
    folder = tmp_path_factory.mktemp("t5-tied")
    make_tokenizer(folder, "t5")
    config = T.T5Config(**{**T5, "vocab_size": 320}, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    T.T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def _grads(task, loss: torch.Tensor) -> dict:
    task.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def _compare(task, batch: dict, monkeypatch) -> dict:
    """The fused step against the plain (full logits) step: loss, count, gradients, eval predictions."""
    assert task.output_head() is not None  # the fused path is the one under test
    fused = task.step(batch, "train", 0)
    fused_grads = _grads(task, fused["loss"])
    with torch.no_grad():
        fused_val = task.step(batch, "val", 0)
    with monkeypatch.context() as m:
        m.setattr(task, "output_head", lambda: None)
        plain = task.step(batch, "train", 0)
        plain_grads = _grads(task, plain["loss"])
        with torch.no_grad():
            plain_val = task.step(batch, "val", 0)
    torch.testing.assert_close(fused["loss"], plain["loss"], rtol=1e-6, atol=1e-6)
    assert fused["n_tokens"].item() == plain["n_tokens"].item() > 0
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name, ref in plain_grads.items():  # fp32, equal up to summation order
        tol = max(1e-5 * ref.abs().max().item(), 1e-9)  # (key biases get ~0 gradient: softmax ignores them)
        torch.testing.assert_close(fused_grads[name], ref, rtol=1e-5, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(fused_val["preds"], plain_val["preds"])
    torch.testing.assert_close(fused_val["loss"], plain_val["loss"], rtol=1e-6, atol=1e-6)
    return fused


@pytest.mark.parametrize("adapter", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("backend", ["scratch", "hf"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_seq2seq_chunked_loss_equals_hf_and_plain(stand_in, t5_tied, monkeypatch, tied, backend, adapter):
    folder = t5_tied if tied else stand_in("t5")
    task = Seq2Seq(pretrained=str(folder), backend=backend, adapter=adapter)
    task.configure_model()
    task.eval()  # no dropout: every pass sees the same function
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 320, (3, 9), generator=g)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    labels = torch.randint(3, 320, (3, 7), generator=g)
    labels[2, 4:] = -100  # a shorter target
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
    out = _compare(task, batch, monkeypatch)
    hf = T.AutoModelForSeq2SeqLM.from_pretrained(folder)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)  # LoRA starts as the identity
    assert out["n_tokens"].item() == 3 * 7 - 3


@pytest.mark.parametrize("adapter", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_masked_lm_chunked_loss_equals_hf_and_plain(stand_in, monkeypatch, backend, adapter):
    folder = stand_in("bert")
    task = MaskedLM(pretrained=str(folder), backend=backend, adapter=adapter, mlm_probability=0.4)
    task.configure_model()
    task.eval()
    x = torch.randint(5, 320, (3, 12), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(x)
    special[:, 0] = 1
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "special_tokens_mask": special}
    out = _compare(task, batch, monkeypatch)
    # HF's loss over the same masked inputs (the step draws its masks from (seed, epoch, batch index)).
    gen = torch.Generator().manual_seed(hash((0, 0, 0)) & (2**63 - 1))
    masked, labels = mask_tokens(x, special, mask_token_id=task.tokenizer.mask_token_id, vocab_size=len(task.tokenizer),
                                 probability=0.4, generator=gen)  # fmt: skip
    hf = T.AutoModelForMaskedLM.from_pretrained(folder)
    with torch.no_grad():
        ref = hf(input_ids=masked, attention_mask=torch.ones_like(x), labels=labels).loss
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    assert out["n_tokens"].item() == (labels != -100).sum().item()


def test_the_head_is_back_after_the_step(stand_in):
    task = MaskedLM(pretrained=str(stand_in("bert")))
    task.configure_model()
    head = task.output_head()
    x = torch.randint(5, 320, (2, 8))
    task.step({"input_ids": x, "attention_mask": torch.ones_like(x), "special_tokens_mask": torch.zeros_like(x)},
              "train", 0)  # fmt: skip
    assert "forward" not in vars(head)
    assert task.model(x).logits.shape == (2, 8, 320)  # full logits again outside the step
