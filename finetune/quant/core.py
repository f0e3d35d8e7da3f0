"""The quantizer: a weight (N, K) as small signed integers and a scale (and, asymmetric, a zero) per group of
``group_size`` consecutive inputs of a row, ``w ~= q * scale + zero``.

Symmetric groups map their largest-magnitude value exactly onto a level: 127 for 8 bits (GGUF's q8_0), -8 for 4
bits (q4_0, where one more level matters; values of the other sign past 7/8 of it are clipped). Asymmetric groups
spread [min, max] over all levels (torchao/gpt-fast's int4 layout). A row whose length is not a multiple of the
group size has a shorter last group.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = (8, 4)
SYMMETRIC_LEVEL = {8: 127, 4: -8}  # the level a symmetric group's largest-magnitude (signed) value becomes


@dataclass
class Quantized:
    """``q``: (N, K) int8 in [-2**(bits-1), 2**(bits-1) - 1]; ``scale``, ``zero``: (N, G) float32, G = ceil(K /
    group_size); ``zero`` is None for symmetric groups."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def levels(self) -> tuple[int, int]:
        return levels(self.bits)


def levels(bits: int) -> tuple[int, int]:
    """The smallest and largest integer of ``bits`` signed bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check(bits: int, group_size: int | None) -> None:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {list(BITS)}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(
            f"quantization group size must be a positive integer (or None: one per row), got {group_size!r}"
        )


def quantize_weight(w: torch.Tensor, *, bits: int, group_size: int | None = None, symmetric: bool = True) -> Quantized:
    """``w`` (N, K) quantized group-wise along K; ``group_size=None``: one group per row (per output channel)."""
    check(bits, group_size)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    g = min(group_size or K, K)
    G = math.ceil(K / g)
    wf = w.detach().float()
    if G * g != K:  # the last group is short: pad with its own last value, which leaves its range unchanged
        wf = F.pad(wf[None], (0, G * g - K), mode="replicate")[0]
    groups = wf.view(N, G, g)  # (N, G, g)
    lo, hi = levels(bits)
    if symmetric:
        extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (N, G), signed
        scale = torch.where(extreme != 0, extreme / SYMMETRIC_LEVEL[bits], torch.ones_like(extreme))
        zero = None
        q = torch.round(groups / scale[..., None])
    else:
        mn, mx = groups.amin(-1), groups.amax(-1)  # (N, G)
        scale = torch.where(mx > mn, (mx - mn) / (hi - lo), torch.ones_like(mx))
        zero = mn - lo * scale  # q = lo gives the minimum
        q = torch.round((groups - zero[..., None]) / scale[..., None])
    q = q.clamp(lo, hi).to(torch.int8).view(N, G * g)[:, :K].contiguous()
    return Quantized(q, scale.contiguous(), zero, bits, g)


def expand(t: torch.Tensor, group_size: int, K: int) -> torch.Tensor:
    """A per-group (N, G) tensor repeated over each group's columns: (N, K)."""
    return t.repeat_interleave(group_size, dim=1)[:, :K]


def dequantize(qw: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the quantized one stands for, computed in float32, returned in ``dtype``."""
    K = qw.q.size(1)
    w = qw.q.float() * expand(qw.scale.float(), qw.group_size, K)
    if qw.zero is not None:
        w = w + expand(qw.zero.float(), qw.group_size, K)
    return w.to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit values (N, K) int8 in [-8, 7] as (N, ceil(K / 2)) uint8, two per byte (even column in the low half)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.size(1) % 2:
        u = F.pad(u, (0, 1), value=8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: (N, K) int8 in [-8, 7]."""
    low, high = packed & 0xF, packed >> 4
    u = torch.stack((low, high), dim=-1).flatten(1)[:, :K]
    return (u.to(torch.int16) - 8).to(torch.int8)
