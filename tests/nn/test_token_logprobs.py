"""Per-token log-probabilities through the chunked output head against the materialized ``log_softmax.gather``:
values, and gradients of the hidden states and the head under opposite-signed per-sequence weights (DPO's)."""

import pytest
import torch
import torch.nn.functional as F

from finetune.nn.loss import linear_token_logprobs, token_logprobs

V, C = 301, 24


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 19, C, generator=g).to(dtype)
    w = (torch.randn(V, C, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (4, 19), generator=g)
    labels[:, :5] = -100  # masked prompts
    labels[1, 12:] = -100  # padding
    return h, w, labels


def _plain(h, w, labels):
    logp = F.linear(h, w).float().log_softmax(-1)  # (B, T, V)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return picked * (labels != -100)


def _dpo_like(fn, h, w, labels, autocast=False):
    """A per-sequence objective with opposite signs: rows 0, 1 chosen (+), rows 2, 3 rejected (-)."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        seq = fn(h, w, labels).sum(-1)  # (B,)
    out = F.logsigmoid(seq[:2] - seq[2:]).sum() + 0.3 * seq[0]
    out.backward()
    return seq.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_values_and_gradients_match_materialized(chunk):
    h, w, labels = _inputs()
    seq, gh, gw = _dpo_like(lambda *a: linear_token_logprobs(*a, chunk=chunk), h, w, labels)
    ref, rgh, rgw = _dpo_like(_plain, h, w, labels)
    torch.testing.assert_close(seq, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rgh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-6, rtol=1e-5)
    assert gh[:, :5].abs().max() == 0  # ignored tokens get no gradient


def test_autocast_bf16_matches_materialized():
    h, w, labels = _inputs()
    seq, gh, gw = _dpo_like(lambda *a: linear_token_logprobs(*a, chunk=11), h, w, labels, autocast=True)
    ref, rgh, rgw = _dpo_like(_plain, h, w, labels, autocast=True)
    torch.testing.assert_close(seq, ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(gh, rgh, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw, rgw, atol=2e-2, rtol=2e-2)


def test_batch_order_and_no_grad():
    h, w, labels = _inputs()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = linear_token_logprobs(h, w, labels, chunk=5).sum(-1)
        b = linear_token_logprobs(h[perm], w, labels[perm], chunk=5).sum(-1)
    torch.testing.assert_close(a[perm], b)
    torch.testing.assert_close(a, token_logprobs(F.linear(h, w), labels).sum(-1), atol=1e-5, rtol=1e-5)


def test_frozen_head_only_hidden_gradient():
    h, w, labels = _inputs()
    h = h.requires_grad_()
    linear_token_logprobs(h, w, labels, chunk=9).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    _plain(h2, w, labels).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-6, rtol=1e-5)


def test_extreme_logits_stay_finite():
    h, w, labels = _inputs()
    logp = linear_token_logprobs(h * 1e4, w, labels, chunk=8)
    assert torch.isfinite(logp).all() and (logp <= 0).all()
