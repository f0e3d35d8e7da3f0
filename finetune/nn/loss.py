"""Cross-entropy over a linear output head, computed in chunks of tokens so that the (tokens, vocabulary) logits are
never held whole: the language-model loss without its largest tensor.

In training, each chunk's gradient is computed in the forward pass, right after its logits (softmax minus the one-hot
target), and the logits are freed; backward then only scales the stored gradients. Memory for the loss is one
chunk's logits instead of the full fp32 logits plus their log-softmax, and no logits are recomputed.
"""

import torch

IGNORE = -100
# fp32 logit elements per chunk. CPU: 2^22 = 16 MiB (524 tokens of an 8k vocabulary): below glibc's largest mmap
# threshold (32 MiB), so chunk buffers are reused from the heap instead of being mapped and page-faulted in afresh
# each time (chunks of 32 MiB ran 1.5x slower in bf16). GPU: 2^25 = 128 MiB (261 tokens of a 128k vocabulary), so
# the loop stays at tens of chunks; the caching allocator reuses the buffers.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}


def chunk_tokens(vocab_size: int, device: str = "cpu") -> int:
    """Tokens per chunk: the most whose fp32 logits fit the device's budget."""
    return max(1, CHUNK_ELEMENTS.get(device, CHUNK_ELEMENTS["cuda"]) // vocab_size)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(h, weight)`` would compute in: autocast's under mixed precision, else the inputs'."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _chunked(h, weight, bias, labels, n, chunk, *, grad_h: bool, grad_w: bool, grad_b: bool, preds: bool):
    """The loss sum / n over chunks of tokens; with the gradients of h (N, C), weight (V, C) and bias (V,) when
    asked, and the argmax predictions (N,) when asked. Returns (loss, grad_h, grad_w, grad_b, preds), the ones not
    asked for ``None``."""
    dtype = _compute_dtype(h, weight)
    hd, wd = h.to(dtype), weight.to(dtype)
    bd = bias.to(dtype) if bias is not None else None
    gh = torch.empty_like(h) if grad_h else None
    # Summed over chunks in fp32 (a bf16 sum would round once per chunk); cast to the weight's dtype at the end.
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grad_b else None
    out = torch.empty(labels.shape, dtype=torch.long, device=labels.device) if preds else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    scale = 1.0 / n.clamp(min=1)
    with torch.autocast(h.device.type, enabled=False):  # the casts are explicit above
        for start in range(0, h.size(0), chunk):
            end = min(start + chunk, h.size(0))
            hc, yc = hd[start:end], labels[start:end]  # (n, C), (n,)
            logits = (hc @ wd.T if bd is None else torch.addmm(bd, hc, wd.T)).float()  # (n, V), as F.linear
            if preds:
                out[start:end] = logits.argmax(-1)
            valid = yc != IGNORE
            target = yc.masked_fill(~valid, 0)
            picked = logits.gather(1, target[:, None]).squeeze(1)  # (n,)
            top = logits.amax(-1, keepdim=True)  # (n, 1)
            e = logits.sub_(top).exp_()  # (n, V) exp(logits - max), in place: one pass, no second buffer
            sums = e.sum(-1)  # (n,)
            total += ((top.squeeze(1) + sums.log() - picked) * valid).sum()  # logsumexp - target logit
            if not (grad_h or grad_w or grad_b):
                continue
            # d(loss)/d(logits) = (softmax - onehot) * valid / n, in place over e.
            weight_row = valid * scale  # (n,)
            e.mul_((weight_row / sums)[:, None])
            e[torch.arange(end - start, device=e.device), target] -= weight_row
            g = e.to(dtype)
            if grad_h:
                gh[start:end] = g @ wd  # (n, C)
            if grad_w and dtype == torch.float32:
                gw.addmm_(g.T, hc)  # (V, C), accumulated in place: no (V, C) temporary per chunk
            elif grad_w:
                gw += (g.T @ hc).float()  # (V, C)
            if grad_b:
                gb += g.float().sum(0)  # (V,)
    cast = lambda g, like: g.to(like.dtype) if g is not None else None  # noqa: E731
    return total * scale, gh, cast(gw, weight), cast(gb, bias), out


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over labelled tokens of -log softmax(h @ W.T + b)[label], divided by ``n``; gradients made in forward.

    Every product runs in the dtype the unfused head would use, and the logits are upcast to fp32 for the softmax,
    so loss and gradients equal ``F.cross_entropy(F.linear(h, W, b).float(), labels)`` up to summation order.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, n, chunk):  # h (N, C), weight (V, C), bias (V,) or None, labels (N,)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss, *grads, _ = _chunked(
            h, weight, bias, labels, n, chunk, grad_h=need_h, grad_w=need_w, grad_b=need_b, preds=False
        )
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: () — 1.0 unless the loss was scaled (gradient accumulation, ...)
        scaled = [g * grad_out if g is not None else None for g in ctx.saved_tensors]  # h, weight, bias
        return (*scaled, None, None, None)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
    preds: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of ``h @ weight.T + bias`` against ``labels`` (-100 = ignored), the labelled-token count,
    and (``preds=True``) the argmax prediction per token, without materializing all logits.

    h: (..., C) hidden states; weight: (V, C) and bias (V,) or None, the output head; labels: (...) aligned with ``h``.
    Returns (loss (), n (), preds (...) or None).
    """
    h2, y = h.reshape(-1, h.size(-1)), labels.reshape(-1)  # (N, C), (N,)
    chunk = chunk or chunk_tokens(weight.size(0), h.device.type)
    n = (y != IGNORE).sum()
    out = None
    no_grads = {"grad_h": False, "grad_w": False, "grad_b": False}
    trains = h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and trains:
        loss = _LinearCrossEntropy.apply(h2, weight, bias, y, n, chunk)
        if preds:
            with torch.no_grad():
                out = _chunked(h2, weight, bias, y, n, chunk, **no_grads, preds=True)[4]
    else:
        with torch.no_grad():
            loss, *_, out = _chunked(h2, weight, bias, y, n, chunk, **no_grads, preds=preds)
    return loss, n, out.view_as(labels) if preds else None


# ------------------------------------------------------------------------------------- per-token log-probabilities
def _token_logprobs(h, weight, labels, chunk, *, grad_h: bool):
    """log softmax(h @ W.T)[label] per token (0 where ignored), chunk by chunk; with ``grad_h`` also each token's
    gradient direction d logp / d h = W[label] - softmax @ W (N, C), so backward only scales it per token."""
    dtype = _compute_dtype(h, weight)
    hd, wd = h.to(dtype), weight.to(dtype)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if grad_h else None
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, h.size(0), chunk):
            end = min(start + chunk, h.size(0))
            valid = labels[start:end] != IGNORE
            target = labels[start:end].masked_fill(~valid, 0)  # (n,)
            logits = (hd[start:end] @ wd.T).float()  # (n, V)
            picked = logits.gather(1, target[:, None]).squeeze(1)  # (n,)
            lse = logits.logsumexp(-1)  # (n,)
            out[start:end] = (picked - lse) * valid
            if grad_h:
                p = logits.sub_(lse[:, None]).exp_()  # (n, V) softmax, in place
                p.neg_()[torch.arange(end - start, device=p.device), target] += 1  # onehot - softmax
                dh[start:end] = (p * valid[:, None]).to(dtype) @ wd  # (n, C)
    return out, dh


class _LinearTokenLogprobs(torch.autograd.Function):
    """Per-token log-probabilities of ``labels`` under ``h @ W.T`` with a per-token gradient: unlike the summed
    cross-entropy, each token may get its own upstream gradient (DPO weighs chosen and rejected sequences with
    opposite signs). The hidden-state gradient directions are made in forward (the size of ``h``); the head's gradient,
    when it trains, recomputes the logits chunk by chunk in backward. No (N, V) tensor outlives a chunk."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):  # h (N, C), weight (V, C), labels (N,)
        out, dh = _token_logprobs(h, weight, labels, chunk, grad_h=ctx.needs_input_grad[0])
        ctx.save_for_backward(dh, h if ctx.needs_input_grad[1] else None, weight, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N,) one upstream gradient per token
        dh, h, weight, labels = ctx.saved_tensors
        grad_h = dh * grad_out[:, None].to(dh.dtype) if dh is not None else None
        grad_w = None
        if h is not None:
            dtype = _compute_dtype(h, weight)
            hd, wd = h.to(dtype), weight.to(dtype)
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, h.size(0), ctx.chunk):
                end = min(start + ctx.chunk, h.size(0))
                valid = labels[start:end] != IGNORE
                target = labels[start:end].masked_fill(~valid, 0)
                logits = (hd[start:end] @ wd.T).float()  # (n, V)
                p = logits.softmax(-1).neg_()
                p[torch.arange(end - start, device=p.device), target] += 1  # onehot - softmax
                p.mul_((grad_out[start:end].float() * valid)[:, None])
                gw += (p.to(dtype).T @ hd[start:end]).float()  # (V, C)
            grad_w = gw.to(weight.dtype)
        return grad_h, grad_w, None, None


def linear_token_logprobs(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """log p(label) of every token under ``h @ weight.T`` (0 where the label is -100), without materializing all
    logits; differentiable per token (sum rows of it for per-sequence log-probs).

    h: (..., C) hidden states; weight: (V, C), a bias-free output head; labels: (...) aligned with ``h``.
    Returns (...) fp32 log-probs. Equals ``log_softmax(F.linear(h, W).float()).gather(labels)`` up to rounding.
    """
    h2, y = h.reshape(-1, h.size(-1)), labels.reshape(-1)  # (N, C), (N,)
    chunk = chunk or chunk_tokens(weight.size(0), h.device.type)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        out = _LinearTokenLogprobs.apply(h2, weight, y, chunk)
    else:
        with torch.no_grad():
            out = _token_logprobs(h2, weight, y, chunk, grad_h=False)[0]
    return out.view(labels.shape)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The materialized fallback of ``linear_token_logprobs``: (..., V) logits -> (...) fp32 log p(label), 0 where
    the label is -100 (for heads the chunked path can't stand in for)."""
    valid = labels != IGNORE
    picked = logits.float().log_softmax(-1).gather(-1, labels.masked_fill(~valid, 0)[..., None]).squeeze(-1)
    return picked * valid
