"""The training step's speed paths keep its results: the chunked loss over the output head (no (B, T, V) logits)
equals HF's own loss and the plain path's gradients, on both backends, with and without an adapter; an unpadded
batch drops its mask to the same result; compiled blocks equal eager ones."""

import pytest
import torch
import transformers as T

from finetune.data.collate import Collator
from finetune.tasks import CausalLM
from finetune.tasks.causal_lm import next_token_labels, token_loss

from .helpers import TINY_LLAMA


def _batch(rows: list[list[int]], pad: int) -> dict:
    items = [{"input_ids": r, "labels": [-100] * 2 + r[2:]} for r in rows]  # a masked two-token prompt
    return Collator(pad)(items)


def _plain_step(task: CausalLM, batch: dict) -> torch.Tensor:
    """The step without the fused loss: full logits, then cross-entropy."""
    return token_loss(task.logits(batch), next_token_labels(batch["labels"]))[0]


def _grads(task: CausalLM, loss: torch.Tensor) -> dict:
    task.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adapter", [None, {"preset": "lora", "lora_dropout": 0.0}], ids=["full", "lora"])
@pytest.mark.parametrize("backend", ["scratch", "hf"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_loss_equals_hf_loss_and_plain_gradients(stand_in, arch, backend, adapter):
    folder = stand_in(arch)
    task = CausalLM(pretrained=str(folder), backend=backend, adapter=adapter)
    task.configure_model()
    task.eval()  # no dropout (GPT-2 has some), so that every pass sees the same function; gradients stay on
    assert task.output_head() is not None  # the fused path is the one under test
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (11, 7, 9)]  # padded rows
    batch = _batch(rows, task.pad_token_id)
    assert batch["padded"]

    out = task.step(batch, "train", 0)
    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    # LoRA starts as the identity (B = 0), so the adapted model's loss is the base model's.
    torch.testing.assert_close(out["loss"], ref.loss, rtol=1e-5, atol=1e-6)
    assert out["n_tokens"].item() == sum(len(r) - 2 for r in rows)  # labelled next tokens

    fused, plain = _grads(task, out["loss"]), _grads(task, _plain_step(task, batch))
    assert fused.keys() == plain.keys() and fused
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)

    with torch.no_grad():
        val = task.step(batch, "val", 0)
        logits = task.logits(batch)
    assert torch.equal(val["preds"], logits.argmax(-1).flatten())
    torch.testing.assert_close(val["loss"], ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_unpadded_batch_skips_the_mask_with_the_same_result(stand_in, backend):
    task = CausalLM(pretrained=str(stand_in("llama")), backend=backend)
    task.configure_model()
    rows = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(1)).tolist()
    batch = _batch(rows, task.pad_token_id)
    assert batch["padded"] is False
    with torch.no_grad():
        fast = task.step(batch, "train", 0)["loss"]
        masked = task.step({**batch, "padded": True}, "train", 0)["loss"]  # the explicit all-ones mask
    torch.testing.assert_close(fast, masked, rtol=1e-6, atol=1e-6)


def test_compiled_blocks_match_eager(tokenizer_folder):
    """``compile: true`` compiles each transformer block; forward, loss and gradients equal the eager model's."""
    tasks = {}
    for compile in (False, True):
        torch.manual_seed(0)
        tasks[compile] = CausalLM(config=TINY_LLAMA, tokenizer=str(tokenizer_folder("llama")), compile=compile)
        tasks[compile].configure_model()
    rows = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(2)).tolist()
    batch = _batch(rows, tasks[False].pad_token_id)
    eager, compiled = tasks[False], tasks[True]
    assert all(b._compiled_call_impl is not None for b in compiled.model.layers)
    assert all(b._compiled_call_impl is None for b in eager.model.layers)
    loss_e, loss_c = eager.step(batch, "train", 0)["loss"], compiled.step(batch, "train", 0)["loss"]
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    grads_e, grads_c = _grads(eager, loss_e), _grads(compiled, loss_c)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
