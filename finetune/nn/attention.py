"""Multi-head attention over ``F.scaled_dot_product_attention``: MHA, GQA and MQA; self- and cross-attention;
a KV cache grown on demand for incremental decoding; and the mask builder the models share."""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from finetune.nn.positions import apply_rotary


class KVCache:
    """Key/value buffers (B, H_kv, capacity, D) for one attention layer, grown on demand up to ``max_len``.

    Nothing is allocated until the first write, which sizes the buffers to what it writes, in the dtype and device of
    the keys written (the model's activations: a bf16 model, or a quantized one computing in bf16, gets bf16). A write
    that does not fit grows them geometrically (doubling, capped at ``max_len``): a decode of n tokens copies O(log n)
    times, not once per token, and a short chat holds memory for its own length, not the whole context (8 GiB for
    Llama-3.2-1B at 128k positions). Writes go in place (no concatenation per step). A cross-attention cache is
    filled once from the encoder output and then reused. ``dtype``/``device``, when given, fix the buffers' instead.
    """

    def __init__(
        self, *, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=None, device=None
    ) -> None:
        if max_len < 1:
            raise ValueError(f"KV cache max_len must be >= 1, got {max_len}")
        self.batch_size, self.max_len, self.n_kv_heads, self.head_dim = batch_size, max_len, n_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: torch.Tensor | None = None  # (B, H_kv, capacity, D), allocated by the first write
        self.v: torch.Tensor | None = None
        self.size = 0

    @property
    def capacity(self) -> int:
        """Positions the buffers hold now (allocated), between ``size`` and ``max_len``."""
        return 0 if self.k is None else self.k.size(2)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        """Makes room for ``need`` positions: the first allocation is exactly ``need``, later ones double."""
        if need <= self.capacity:
            return
        capacity = min(self.max_len, max(need, 2 * self.capacity))
        dtype = self.dtype or (like.dtype if self.k is None else self.k.dtype)
        device = self.device or (like.device if self.k is None else self.k.device)
        shape = (self.batch_size, self.n_kv_heads, capacity, self.head_dim)
        # Zeros, not empty: a slot cache's shorter rows read positions they never wrote (masked out), and masking
        # does not survive NaN or inf there (a NaN score stays NaN; a zero weight times a NaN value is NaN).
        k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        if self.size:  # what is kept; stale entries past `size` (after a truncate) are not worth copying
            k.narrow(2, 0, self.size).copy_(self.k.narrow(2, 0, self.size))
            v.narrow(2, 0, self.size).copy_(self.v.narrow(2, 0, self.size))
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends (B, H_kv, T, D) and returns all keys and values so far, (B, H_kv, size, D)."""
        start, T = self.size, k.size(2)
        if start + T > self.max_len:
            raise ValueError(f"KV cache is full: {start} + {T} tokens exceed its max_len {self.max_len}")
        self._reserve(start + T, k)
        # narrow + copy_ rather than slice assignment: the same write, with less Python indexing per step.
        self.k.narrow(2, start, T).copy_(k)
        self.v.narrow(2, start, T).copy_(v)
        self.size = start + T
        return self.k.narrow(2, 0, self.size), self.v.narrow(2, 0, self.size)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            raise ValueError("the KV cache is empty: nothing was written to it yet")
        return self.k.narrow(2, 0, self.size), self.v.narrow(2, 0, self.size)

    def truncate(self, size: int) -> None:
        """Forgets every position from ``size`` on (rejected draft tokens, a failed turn): O(1), nothing is copied
        or freed. Later writes overwrite the stale entries, and reads never go past ``size``."""
        if not 0 <= size <= self.size:
            raise ValueError(f"cannot truncate a KV cache of {self.size} tokens to {size}")
        self.size = size

    def reset(self) -> None:
        self.size = 0


class SlotKVCache(KVCache):
    """A KV cache whose rows are independent sequences (continuous batching): row b holds ``lengths[b]`` positions.

    The first ``rows`` rows are in use (kept contiguous, so a step runs on ``k[:rows]``, a view). A request enters
    with ``put`` (its prompt's keys and values, prefilled on their own), each step appends T positions to every row
    with ``update`` at that row's own length, ``rewind`` forgets each row's tail (rejected draft tokens), and
    ``drop`` frees a row by moving the last one into it. Reads return ``size = max(lengths)`` positions; a row's
    stale positions past its length are hidden by ``mask``. While every row has the same length (always so for one
    row) a step is exactly a ``KVCache`` step: one contiguous write, no mask, positions counted from ``size``.
    """

    def __init__(self, *, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=None, device=None):
        super().__init__(batch_size=batch_size, max_len=max_len, n_kv_heads=n_kv_heads, head_dim=head_dim,
                         dtype=dtype, device=device)  # fmt: skip
        self.rows = 0
        self.lengths: list[int] = []  # of the rows in use
        self.uniform = True  # every row in use has the same length

    def _set(self, lengths: list[int]) -> None:
        self.rows, self.lengths = len(lengths), lengths
        self.size = max(lengths, default=0)
        self.uniform = min(lengths, default=0) == self.size

    def put(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Adds a row holding (1, H_kv, T, D) keys and values; returns its index."""
        if self.rows == self.batch_size:
            raise ValueError(f"all {self.batch_size} rows of the KV cache are in use")
        T, row = k.size(2), self.rows
        self._reserve(T, k)
        self.k[row, :, :T].copy_(k[0])
        self.v[row, :, :T].copy_(v[0])
        self._set([*self.lengths, T])
        return row

    def drop(self, row: int) -> None:
        """Frees ``row``; the last row moves into its place (callers renumber it)."""
        last, lengths = self.rows - 1, list(self.lengths)
        if row != last:
            n = lengths[last]
            self.k[row, :, :n].copy_(self.k[last, :, :n])
            self.v[row, :, :n].copy_(self.v[last, :, :n])
            lengths[row] = n
        self._set(lengths[:last])

    def rewind(self, lengths: list[int]) -> None:
        """Forgets row b's positions from ``lengths[b]`` on (each at most its length now); O(1), like ``truncate``."""
        if len(lengths) != self.rows or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths, strict=True)):
            raise ValueError(f"cannot rewind rows of lengths {self.lengths} to {lengths}")
        self._set(list(lengths))

    def positions(self, T: int = 1, device=None) -> torch.Tensor | None:
        """(rows, T) position ids of a step appending T tokens to each row; None when the rows share a length (the
        model counts on from ``size`` itself)."""
        if self.uniform:
            return None
        return torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)  # (rows, T)

    def mask(self, T: int = 1, device=None, *, window: int | None = None) -> torch.Tensor | None:
        """(rows, 1, T, size + T) bool for a step appending T tokens to each row: query t of row b sees that row's
        first ``lengths[b] + t + 1`` positions (the last ``window`` of them, for sliding-window attention). None when
        the rows share a length (the model's own causal/window mask is right then)."""
        if self.uniform:
            return None
        keys = torch.arange(self.size + T, device=device)[None, None]  # (1, 1, S)
        last = self.positions(T, device)[:, :, None]  # (rows, T, 1)
        mask = keys <= last
        if window is not None:
            mask &= last - keys < window
        return mask[:, None]  # (rows, 1, T, S)

    def key_mask(self, device=None) -> torch.Tensor | None:
        """(rows, size) bool, row b's first ``lengths[b]`` keys: a cross-attention cache's rows of different source
        lengths, padded to the longest. None when the rows share a length (nothing to hide)."""
        if self.uniform:
            return None
        return torch.arange(self.size, device=device)[None] < torch.tensor(self.lengths, device=device)[:, None]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends (rows, H_kv, T, D), each row at its own length; returns (rows, H_kv, size, D)."""
        T = k.size(2)
        if k.size(0) != self.rows:
            raise ValueError(f"a slot cache appends to each of its {self.rows} rows, got {tuple(k.shape)}")
        if self.size + T > self.max_len:
            raise ValueError(f"KV cache is full: a row of {self.size} tokens cannot grow by {T} past {self.max_len}")
        self._reserve(self.size + T, k)
        if self.uniform:  # one contiguous write, as KVCache.update
            self.k[: self.rows].narrow(2, self.size, T).copy_(k)
            self.v[: self.rows].narrow(2, self.size, T).copy_(v)
        else:
            rows, at = _write_index(tuple(self.lengths), T, self.k.device)
            self.k[rows, :, at] = k.transpose(1, 2)  # (rows, T, H_kv, D)
            self.v[rows, :, at] = v.transpose(1, 2)
        self._set([n + T for n in self.lengths])
        return self.k[: self.rows].narrow(2, 0, self.size), self.v[: self.rows].narrow(2, 0, self.size)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows in use, (rows, H_kv, size, D) (a cross-attention cache's, read at every step)."""
        k, v = super().get()
        return k[: self.rows], v[: self.rows]

    def truncate(self, size: int) -> None:
        """Every row to ``size`` positions at most (``rewind`` sets each row's own)."""
        self.rewind([min(n, size) for n in self.lengths])

    def reset(self) -> None:
        """Frees every row."""
        self._set([])


@functools.lru_cache(maxsize=4)
def _write_index(lengths: tuple[int, ...], T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a step appending T tokens to rows of these lengths writes: (rows, 1) row numbers and (rows, T) positions.
    Every layer's cache of a step asks for the same ones: built once per step, not once per layer."""
    rows = torch.arange(len(lengths), device=device)[:, None]  # (rows, 1)
    return rows, torch.tensor(lengths, device=device)[:, None] + torch.arange(T, device=device)  # (rows, T)


class AttentionNames(NamedTuple):
    """Projection module names, as the checkpoint calls them. ``qkv`` set means one fused projection."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None


LLAMA_NAMES = AttentionNames()


class Attention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` key/value heads: MHA (= n_heads), GQA (divides it) or MQA (1).

    Args:
        dim: model width C.
        n_heads, n_kv_heads, head_dim: query heads, key/value heads (default n_heads), width per head.
        qkv_bias, o_bias: biases on the input and output projections.
        scale: score scale; ``None`` means 1/sqrt(head_dim) (T5 uses 1.0).
        kv_dim: width of the cross-attention context, when it differs from ``dim``.
        dropout: dropout on attention probabilities, in training only.
        names: the projection names of the checkpoint family, so adapters target the same strings.
    """

    def __init__(
        self,
        *,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        scale: float | None = None,
        kv_dim: int | None = None,
        dropout: float = 0.0,
        names: AttentionNames = LLAMA_NAMES,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads}) when head_dim is not given")
            head_dim = dim // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim, self.scale = n_heads, n_kv_heads, head_dim, scale
        self.dropout = dropout
        self.names = names
        q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
        if names.qkv:
            self.add_module(names.qkv, nn.Linear(dim, q_out + 2 * kv_out, bias=qkv_bias))
        else:
            self.add_module(names.q, nn.Linear(dim, q_out, bias=qkv_bias))
            self.add_module(names.k, nn.Linear(kv_dim or dim, kv_out, bias=qkv_bias))
            self.add_module(names.v, nn.Linear(kv_dim or dim, kv_out, bias=qkv_bias))
        self.add_module(names.o, nn.Linear(q_out, dim, bias=o_bias))

    keep_weights = False  # True (``finetune.attention_maps``): forward keeps ``self.weights`` (B, H, T, S)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # (B, T, n*D) -> (B, n, T, D)
        return x.view(*x.shape[:-1], n, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        cross: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, C). context: (B, S, C') for cross-attention. mask: bool (True = attend) or additive float,
        broadcastable to (B, H, T, S). rope: (cos, sin), each (B, T, D). ``cross``: cross-attention also without
        ``context``, over the keys and values ``cache`` already holds (the serving engine keeps no encoder states).
        Returns (B, T, C)."""
        # Projections are looked up in _modules directly: nn.Module.__getattr__ is a slow fallback, and decoding
        # calls this once per layer per token.
        n, modules = self.names, self._modules
        if n.qkv:
            q, k, v = modules[n.qkv](x).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
            )
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
        else:
            q = self._heads(modules[n.q](x), self.n_heads)  # (B, H, T, D)
            if (cross or context is not None) and cache is not None and cache.size:
                k, v = cache.get()  # cross-attention: the encoder's keys and values never change
                cache = None
            else:
                if cross and context is None:
                    raise ValueError("cross-attention needs its context, or a cache that holds its keys and values")
                src = x if context is None else context
                k = self._heads(modules[n.k](src), self.n_kv_heads)  # (B, H_kv, S, D)
                v = self._heads(modules[n.v](src), self.n_kv_heads)
        if rope is not None and q.size(2) == 1:
            # Decoding one token: queries and keys rotated in one go, half the small ops of two calls (op-bound).
            qk = apply_rotary(torch.cat((q, k), dim=1), *rope)  # (B, H + H_kv, 1, D)
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
        elif rope is not None:  # longer inputs: two calls, rather than copying q and k into one tensor
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None:
            # On CUDA only the flash kernel implements enable_gqa, and flash takes no mask: a masked GQA call (packed
            # rows, padded batches, padded generation) would fall back to the math kernel, B*H*T^2 fp32 scores.
            # Repeating K/V to n_heads, as transformers does, lets the memory-efficient kernel take the mask.
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        if self.keep_weights:  # attention maps asked for: the explicit softmax, equal to SDPA's output
            y, self.weights = explicit_attention(q, k, v, mask=mask, is_causal=is_causal and mask is None,
                                                 scale=self.scale)  # fmt: skip
            return modules[n.o](y.transpose(1, 2).flatten(2))  # (B, T, C)
        y = sdpa(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=gqa,
        )  # (B, H, T, D)
        return modules[n.o](y.transpose(1, 2).flatten(2))  # (B, T, C)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, run in fp32 for bf16/fp16 inputs on the CPU when gradients are needed.

    The CPU flash kernel's bf16 backward is slow: at (8, 8 heads / 4 KV, 256, 32), 2 threads, forward + backward took
    35 ms in bf16 against 21 ms cast up to fp32 and back (casts included). Its bf16 forward alone is the faster one,
    and decoding would cast the whole KV cache up per token (5-14x slower), so without gradients it stays as it is.
    The fp32 result rounded to the inputs' dtype is at least as precise. Only the bf16 tensors are kept for the
    backward (:class:`_Fp32CpuFlashAttention`), so memory stays that of the bf16 kernel. CUDA is unchanged.
    q: (B, H, T, D); k, v: (B, H_kv, S, D); keyword arguments as SDPA's. Returns (B, H, T, D) in q's dtype.
    """
    low_on_cpu = q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu"
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not (low_on_cpu and training):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask, is_causal, scale = kwargs.get("attn_mask"), kwargs.get("is_causal", False), kwargs.get("scale")
    with torch.autocast("cpu", enabled=False):  # bf16-mixed would cast the fp32 inputs straight back down
        if kwargs.get("dropout_p", 0.0) > 0 or mask is not None and mask.requires_grad:
            # Dropout, or a learned bias (T5's) needing its gradient: SDPA in fp32 through autograd.
            kwargs["attn_mask"] = _additive_fp32(mask)
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
        return _Fp32CpuFlashAttention.apply(q, k, v, mask, is_causal, scale)


def _additive_fp32(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool (True = attend) or additive mask as the additive fp32 mask the CPU flash kernel takes with fp32 inputs."""
    if mask is None or mask.dtype == torch.float32:
        return mask
    if mask.is_floating_point():
        return mask.float()
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -torch.inf)


class _Fp32CpuFlashAttention(torch.autograd.Function):
    """The CPU flash kernel run in fp32 on low-precision q, k, v (GQA included: the kernel takes fewer KV heads),
    forward and backward. It keeps q, k, v and the output in their own dtype and the fp32 log-sum-exp (B, H, T),
    and casts up again in the backward, instead of holding fp32 copies from the forward to the backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float | None):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(q.float(), k.float(), v.float(), 0.0, is_causal, attn_mask=_additive_fp32(mask), scale=scale)
        out = out.to(q.dtype)  # (B, H, T, D)
        ctx.save_for_backward(q, k, v, out, lse, mask)  # the mask as given (a bool one is a quarter of fp32's)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        gq, gk, gv = backward(grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, ctx.is_causal,
                              attn_mask=_additive_fp32(mask), scale=ctx.scale)  # fmt: skip
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None


def explicit_attention(q, k, v, *, mask=None, is_causal: bool = False, scale: float | None = None):
    """``softmax(q k^T * scale + mask) v`` spelled out, for the attention weights SDPA does not return. q: (B, H, T,
    D); k, v: (B, H_kv, S, D); mask as for ``Attention``; ``is_causal``: SDPA's (top-left) causal mask. Returns the
    output (B, H, T, D) and the weights (B, H, T, S), computed in float32."""
    H = q.size(1)
    if k.size(1) != H:
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)  # (B, H, S, D)
    scores = q.float() @ k.float().transpose(-2, -1) * (q.size(-1) ** -0.5 if scale is None else scale)  # (B,H,T,S)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(-1)
    return (weights @ v.float()).to(q.dtype), weights


def build_mask(
    *,
    q_len: int,
    k_len: int,
    padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    causal: bool,
    sliding_window: int | None = None,
    materialize: bool = False,
    device=None,
) -> tuple[torch.Tensor | None, bool]:
    """Returns ``(mask, is_causal)`` for :class:`Attention`.

    Queries are the last ``q_len`` of ``k_len`` positions (earlier ones are in the KV cache).
    ``padding_mask`` is (B, k_len), 1/True for real tokens, or a whole bool mask (B, 1, q_len, k_len), returned as
    it is (rows of their own lengths, from ``SlotKVCache.mask``). ``segment_ids`` (B, k_len) numbers the samples packed
    into a row (0 = padding): a query attends only to keys of its own segment, so packed samples stay apart.
    The mask is bool (B|1, 1, q_len, k_len), True = attend; ``None`` with ``is_causal=True`` when plain causal
    attention suffices, which lets SDPA pick its fastest kernel, unless ``materialize`` asks for the mask itself
    (to add a position bias to).
    """
    if padding_mask is not None and padding_mask.dim() == 4:  # the whole mask, made by the caller (SlotKVCache.mask)
        return padding_mask, False
    no_padding = padding_mask is None and segment_ids is None
    if no_padding and sliding_window is None and not causal:
        return None, False
    if no_padding and not materialize:
        if sliding_window is None and q_len == k_len:
            return None, causal and q_len > 1
        if q_len == 1 and (sliding_window is None or k_len <= sliding_window):
            return None, False  # one new token attends to everything cached
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    mask = mask[None, None]  # (1, 1, Tq, Tk)
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]  # (B, 1, Tq, Tk)
    if segment_ids is not None:
        same = segment_ids[:, -q_len:, None] == segment_ids[:, None, :]  # (B, Tq, Tk)
        mask = mask & same[:, None]  # (B, 1, Tq, Tk)
    if not no_padding:
        # A padding query (left padding) may see no key at all; let it see everything rather than produce NaN.
        # Its output is never used.
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask, False
