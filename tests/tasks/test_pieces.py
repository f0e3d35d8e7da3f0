"""The tasks' building blocks against references: packed attention, losses, metrics, masking, optimizer groups."""

import math

import pytest
import torch
import transformers as T
from torchmetrics.text import Perplexity as TMPerplexity

from finetune.models import from_hf
from finetune.tasks.causal_lm import packed_mask, token_loss
from finetune.tasks.masked_lm import mask_tokens
from finetune.tasks.metrics import Bleu, Perplexity, RougeL
from finetune.tasks.optim import lr_lambda, param_groups, warmup_steps
from finetune.tasks.seq2seq import shift_right


def _packed(lengths, T_total, seed=0, V=97):
    """Random samples of ``lengths`` packed into one row of ``T_total`` (the rest is padding, segment 0)."""
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(3, V, (n,), generator=g) for n in lengths]
    ids = torch.zeros(1, T_total, dtype=torch.long)
    seg = torch.zeros(1, T_total, dtype=torch.long)
    pos = torch.zeros(1, T_total, dtype=torch.long)
    at = 0
    for i, s in enumerate(samples):
        ids[0, at : at + len(s)] = s
        seg[0, at : at + len(s)] = i + 1
        pos[0, at : at + len(s)] = torch.arange(len(s))
        at += len(s)
    return samples, ids, seg, pos


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "mistral-window"])
def test_packed_samples_do_not_attend_across_boundaries(hf_folder, name):
    """Each packed sample's logits equal those of the sample run alone, on our model and on HF's (4D mask)."""
    hf, folder = hf_folder(name)
    ours = from_hf(folder)
    samples, ids, seg, pos = _packed([5, 7, 4], 18)
    with torch.no_grad():
        packed_ours = ours(ids, position_ids=pos, segment_ids=seg)
        window = getattr(hf.config, "sliding_window", None)
        packed_hf = hf(ids, attention_mask=packed_mask(seg, window), position_ids=pos).logits
        at = 0
        for s in samples:
            alone = hf(s[None]).logits[0]
            torch.testing.assert_close(packed_ours[0, at : at + len(s)], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_hf[0, at : at + len(s)], alone, rtol=1e-5, atol=1e-5)
            at += len(s)


def test_packed_mask_is_block_causal():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = packed_mask(seg)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_token_loss_equals_hf_causal_lm_loss(hf_folder):
    hf, _ = hf_folder("llama-gqa")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, 7:] = -100  # padding
    with torch.no_grad():
        out = hf(ids, labels=labels)
        loss, n = token_loss(out.logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(loss, out.loss)
    assert n.item() == (labels[:, 1:] != -100).sum().item() == 12  # 6 + 6 labelled next tokens


def test_perplexity_equals_torchmetrics_perplexity():
    g = torch.Generator().manual_seed(0)
    ours, ref = Perplexity(), TMPerplexity(ignore_index=-100)
    for _ in range(3):  # the epoch value, over batches with different token counts
        logits = torch.randn(2, 7, 11, generator=g)
        target = torch.randint(0, 11, (2, 7), generator=g)
        target[0, torch.randint(0, 7, (3,), generator=g)] = -100
        loss, n = token_loss(logits, target)
        ours.update(loss, n)
        ref.update(logits, target)
    torch.testing.assert_close(ours.compute(), ref.compute())


def test_bleu_and_rouge_l_against_hand_computation():
    # ROUGE-L: LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 each way.
    rouge = RougeL()
    rouge.update(["the cat sat on the mat"], ["the cat is on the mat"])
    assert rouge.compute().item() == pytest.approx(5 / 6, abs=1e-6)
    bleu = Bleu()
    bleu.update(["a b c d e"], ["a b c d e"])
    assert bleu.compute().item() == pytest.approx(1.0)
    bleu = Bleu()
    bleu.update(["a b c d x"], ["a b c d e"])
    # precisions 4/5, 3/4, 2/3, 1/2; no brevity penalty
    assert bleu.compute().item() == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)


def test_mask_tokens_follows_bert_recipe():
    ids = torch.randint(5, 300, (64, 128), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids)
    special[:, 0] = special[:, -1] = 1
    x, labels = mask_tokens(
        ids, special, mask_token_id=4, vocab_size=300, probability=0.15, generator=torch.Generator().manual_seed(1)
    )
    picked = labels != -100
    assert not picked[special.bool()].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(x[~picked], ids[~picked])  # unpicked tokens are untouched
    frac = picked.float().mean().item()
    assert 0.13 < frac < 0.17
    masked = (x[picked] == 4).float().mean().item()
    kept = (x[picked] == ids[picked]).float().mean().item()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.13
    again, _ = mask_tokens(
        ids, special, mask_token_id=4, vocab_size=300, probability=0.15, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(again, x)  # seeded: the same masks on every evaluation and after resume


def test_shift_right_matches_hf_t5():
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    cfg = T.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, decoder_start_token_id=0)
    ref = T.T5ForConditionalGeneration(cfg)._shift_right(labels)
    assert torch.equal(shift_right(labels, 0, 0), ref)


def test_param_groups_exclude_norms_biases_and_embeddings(hf_folder):
    model = from_hf(hf_folder("gpt2")[1])  # tied head, biases, layer norms
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n and "wte" not in n for n in decayed)
    assert "wte.weight" in {names[id(p)] for p in no_decay["params"]}  # the tied head is the embedding
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # every parameter once


def test_lr_schedule_shapes():
    f = lambda s, sched: lr_lambda(s, warmup=10, total=110, schedule=sched, min_ratio=0.1)  # noqa: E731
    assert f(0, "cosine") == pytest.approx(1 / 11)
    assert f(9, "cosine") == pytest.approx(10 / 11)
    assert f(10, "cosine") == pytest.approx(1.0)
    assert f(60, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110, "cosine") == pytest.approx(0.1)
    assert f(60, "linear") == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100, "constant") == 1.0
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(30, 200) == 30
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        warmup_steps(-1, 10)


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_gradient_checkpointing_gives_the_same_gradients(stand_in, backend):
    from finetune.tasks import CausalLM

    folder = str(stand_in("llama"))
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = []
    for on in (False, True):
        task = CausalLM(folder, backend=backend, gradient_checkpointing=on)
        task.configure_model()
        if backend == "hf":
            assert task.model.is_gradient_checkpointing is on
        else:
            assert task.model.gradient_checkpointing is on
        task.step(batch, "train", 0)["loss"].backward()
        grads.append({n: p.grad for n, p in task.model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


def test_token_mean_weights_by_tokens_and_keeps_nan_visible():
    from finetune.tasks.metrics import TokenMean

    m = TokenMean()
    m.update(torch.tensor(2.0), torch.tensor(3))
    m.update(torch.tensor(4.0), torch.tensor(1))
    assert m.compute().item() == pytest.approx((2 * 3 + 4) / 4)
    m.update(torch.tensor(float("nan")), torch.tensor(2))  # a diverged step is not silently dropped
    assert math.isnan(m.compute().item())
