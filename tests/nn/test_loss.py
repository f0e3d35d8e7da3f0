"""The chunked linear cross-entropy against the plain loss (``F.cross_entropy`` over ``F.linear``): value and
gradients, in fp32, bf16 and under autocast, with ignored labels, uneven chunks and a scaled loss."""

import pytest
import torch
import torch.nn.functional as F

from finetune.nn.loss import chunk_tokens, linear_cross_entropy

V, C = 301, 24


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 37, C, generator=g).to(dtype)
    w = (torch.randn(V, C, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (3, 37), generator=g)
    labels[0, :9] = -100  # a masked prompt
    labels[2, 30:] = -100  # padding
    return h, w, labels


def _plain(h, w, labels):
    n = (labels != -100).sum()
    loss = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss, n


def _run(fn, h, w, labels, *, autocast=False, scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, n = fn(h, w, labels)[:2]
    (loss * scale).backward()
    return loss.detach(), n, h.grad, w.grad


# fp32 agrees to summation order. In bf16 the weight gradient is a sum of per-chunk bf16 products (in fp32), where
# the plain head rounds one product once, so it may differ by a bf16 rounding step.
@pytest.mark.parametrize(
    ("dtype", "autocast", "tol"),
    [(torch.float32, False, 1e-6), (torch.bfloat16, False, 8e-3), (torch.float32, True, 8e-3)],
    ids=["fp32", "bf16", "autocast-bf16"],
)
@pytest.mark.parametrize("chunk", [16, 1000])  # uneven chunks (111 tokens), and one chunk
def test_chunked_loss_and_gradients_equal_the_plain_loss(dtype, autocast, tol, chunk):
    h, w, labels = _inputs(dtype)
    chunked = lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk)  # noqa: E731
    ref, ours = (
        _run(_plain, h, w, labels, autocast=autocast, scale=3.0),
        _run(chunked, h, w, labels, autocast=autocast, scale=3.0),
    )
    assert ours[1].item() == ref[1].item() == 111 - 9 - 7
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)  # the loss is fp32 on both sides
    for a, b in zip(ours[2:], ref[2:], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


def test_without_gradients_gives_the_loss_and_argmax_predictions():
    h, w, labels = _inputs(torch.float32)
    with torch.no_grad():
        loss, n, preds = linear_cross_entropy(h, w, labels, chunk=16, preds=True)
        ref, ref_n = _plain(h, w, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert n.item() == ref_n.item()
    assert torch.equal(preds, F.linear(h, w).argmax(-1))
    # and with gradients on, predictions come along too
    loss2, _, preds2 = linear_cross_entropy(h.requires_grad_(), w, labels, chunk=16, preds=True)
    assert torch.equal(preds2, preds)
    torch.testing.assert_close(loss2.detach(), ref, rtol=1e-6, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_all_ignored_gives_zero():
    h, w, labels = _inputs(torch.float32)
    loss, *_ = _run(lambda h, w, y: linear_cross_entropy(h, w.detach(), y, chunk=16), h, w, labels)
    torch.testing.assert_close(loss, _plain(h, w, labels)[0], rtol=1e-6, atol=1e-6)
    hh = h.clone().requires_grad_()
    zero, n, _ = linear_cross_entropy(hh, w, torch.full_like(labels, -100))
    zero.backward()
    assert zero.item() == 0.0 and n.item() == 0 and not hh.grad.any()


def test_chunk_size_keeps_the_logits_chunk_bounded():
    assert chunk_tokens(8000) == 524  # 2^22 fp32 logits = 16 MiB per chunk on the CPU
    assert chunk_tokens(128256, "cuda") == 261  # 128 MiB on a GPU
    assert chunk_tokens(10**8) == 1


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_head_bias_gets_its_gradient_as_f_linear_does(autocast):
    """A head with a bias (BERT's MLM decoder): loss and the gradients of h, weight and bias equal the plain ones."""
    h, w, labels = _inputs(torch.float32)
    b = torch.randn(V, generator=torch.Generator().manual_seed(3))

    def run(fn):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hh, ww, bb)
        (loss * 2.0).backward()
        return loss.detach(), hh.grad, ww.grad, bb.grad

    plain = run(lambda h, w, b: F.cross_entropy(F.linear(h, w, b).float().flatten(0, 1), labels.flatten()))
    ours = run(lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, chunk=16)[0])
    tol = 8e-3 if autocast else 1e-6
    torch.testing.assert_close(ours[0], plain[0], rtol=tol, atol=tol)
    for a, r in zip(ours[1:], plain[1:], strict=True):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol * r.abs().max().item())
