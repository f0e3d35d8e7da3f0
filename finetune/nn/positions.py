"""Position encodings: sinusoidal tables, rotary embeddings (with their scaling variants), T5 relative bias.

Learned absolute positions (GPT-2's ``wpe``, BERT's ``position_embeddings``) are a plain ``nn.Embedding``.
"""

import math

import torch
from torch import nn


def sinusoidal_table(n_positions: int, dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": row p is sin/cos of p / base^(2i/dim), interleaved.

    Returns (n_positions, dim).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (C/2,)
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


class Fp32Tables(nn.Module):
    """A module whose computed tables (non-persistent buffers) stay fp32 whatever dtype the module is cast to.

    ``module.to(torch.bfloat16)``, ``.half()``, Lightning's bf16-true and FSDP all cast through ``_apply``, which
    would round RoPE frequencies to bf16 (0.3% off, whole radians of angle at position 1000). Here device moves
    (and ``to_empty``) still apply, but a buffer that was fp32 comes back as its fp32 self, on the new device.
    FSDP1's ``buffer_dtype`` casts by assigning ``buffer.data``, around ``_apply``: ``forward`` calls
    :meth:`check_tables`, which recomputes such a table (subclasses define ``reset_buffers``). Learned positions are
    parameters and follow the model; this is only for tables computed from the config.
    """

    def _apply(self, fn, recurse=True):
        kept = {name: b for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)  # the move kept, the cast undone (exact: from before)
        return self

    def check_tables(self) -> None:
        """Recomputes the tables, in fp32 on their device, if something cast them past ``_apply``: a dtype check
        per call, a recompute once per such cast."""
        if any(b.dtype != torch.float32 for b in self._buffers.values() if b is not None and b.is_floating_point()):
            self.reset_buffers()


class SinusoidalPositions(Fp32Tables):
    """Adds the sinusoidal table to token embeddings; nothing to learn, nothing saved. The table stays fp32
    (see :class:`Fp32Tables`); ``forward`` returns it in the dtype asked for (the embeddings')."""

    def __init__(self, *, max_positions: int, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.max_positions, self.dim, self.base = max_positions, dim, base
        self.register_buffer("table", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device("cpu"):  # also when the model is being built on the meta device
            table = sinusoidal_table(self.max_positions, self.dim, base=self.base)
        self.table = table.to(self.table.device if self.table.device.type != "meta" else "cpu")

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, C), in ``dtype`` (default fp32): added to bf16 embeddings, an fp32 table would promote
        the activations to fp32."""
        self.check_tables()
        table = self.table[position_ids]  # (B, T, C) fp32
        return table if dtype is None else table.to(dtype)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, *, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, (head_dim / 2,), with Hugging Face's ``rope_type`` variants.

    ``scaling`` is HF's ``rope_parameters``/``rope_scaling`` dict: ``None`` or ``{"rope_type": "default"}``,
    ``{"rope_type": "linear", "factor"}`` (position interpolation) or ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1+).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, **{k: scaling[k] for k in _LLAMA3_KEYS})
    raise ValueError(f"unsupported rope_type {kind!r}; supported: ['default', 'linear', 'llama3']")


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama3_scale(inv_freq, *, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    # Long wavelengths are divided by `factor`, short ones kept, and the band between blended smoothly.
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(Fp32Tables):
    """Maps position ids to the (cos, sin) pair that :func:`apply_rotary` rotates queries and keys by.

    ``inv_freq`` stays fp32 under any module cast (:class:`Fp32Tables`), as in Hugging Face models; angles are
    computed in fp32 and only cos/sin are cast to the activation dtype, as HF's ``LlamaRotaryEmbedding`` does."""

    def __init__(self, *, head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        # Derived, not saved: recomputed after `to_empty` when a model is built on the meta device.
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(self.head_dim, theta=self.theta, scaling=self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu")

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 whatever the model dtype: bf16 positions lose whole radians past a few hundred tokens.
        self.check_tables()
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, H, T, D) by per-position angles (B, T, D), in the half-split layout HF's LLaMA uses."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
    return x * cos + _rotate_half(x) * sin


# ------------------------------------------------------------------------------------- T5 relative
def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of ``key_pos - query_pos``: exact buckets for small distances, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)  # a decoder only looks back
    max_exact = num_buckets // 2
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
    )
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class T5RelativeBias(nn.Module):
    """A learned scalar per (head, distance bucket), added to attention scores: (1, H, Tq, Tk), or (B, H, Tq, Tk)
    for queries whose positions differ by row (``at``)."""

    def __init__(self, *, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_len: int, k_len: int, *, offset: int = 0) -> torch.Tensor:
        """Bias for queries at positions ``offset .. offset + q_len`` over keys ``0 .. k_len``: (1, H, Tq, Tk)."""
        device = self.relative_attention_bias.weight.device
        return self.at(torch.arange(q_len, device=device) + offset, torch.arange(k_len, device=device))[None]

    def at(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bias for queries at positions ``q_pos`` (..., Tq) over keys at ``k_pos`` (Tk,): (..., H, Tq, Tk). A
        (B, Tq) ``q_pos`` gives each row its own queries' positions (rows of different lengths decoded together)."""
        buckets = relative_position_bucket(
            k_pos - q_pos[..., None],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # (..., Tq, Tk)
        return self.relative_attention_bias(buckets).movedim(-1, -3)  # (..., H, Tq, Tk)
