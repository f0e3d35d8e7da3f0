"""Transformer blocks: pre-norm (GPT-2, LLaMA, T5) and post-norm (BERT), with optional cross-attention."""

import torch
from torch import nn

from finetune.nn.attention import Attention
from finetune.nn.dropout import Dropout


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PreNormBlock(nn.Module):
    """``x + attn(norm(x))`` [``+ cross_attn(norm(x), context)``] ``+ mlp(norm(x))``.

    Norms and sublayers are injected, so one block serves GPT-2 (LayerNorm, GELU MLP), LLaMA (RMSNorm,
    SwiGLU, RoPE) and the T5 encoder and decoder (RMSNorm, relative bias, cross-attention).
    """

    def __init__(
        self,
        *,
        attn: Attention,
        attn_norm: nn.Module,
        mlp: nn.Module,
        mlp_norm: nn.Module,
        cross_attn: Attention | None = None,
        cross_attn_norm: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (cross_attn is None) != (cross_attn_norm is None):
            raise ValueError("cross_attn and cross_attn_norm go together")
        self.attn_norm, self.attn = attn_norm, attn
        self.cross_attn_norm, self.cross_attn = cross_attn_norm, cross_attn
        self.mlp_norm, self.mlp = mlp_norm, mlp
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask=None,
        is_causal: bool = False,
        rope=None,
        cache=None,
        context=None,
        context_mask=None,
        cross_cache=None,
    ) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        # Dropout only where it does something: decoding runs this once per layer per token, and a no-op module
        # call costs as much as a small matmul there.
        drop = self.dropout if self.training and self.dropout.p > 0 else _identity
        x = x + drop(self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache))
        if self.cross_attn is not None:
            h = self.cross_attn(self.cross_attn_norm(x), context=context, mask=context_mask, cache=cross_cache,
                                cross=True)  # fmt: skip
            x = x + drop(h)
        return x + drop(self.mlp(self.mlp_norm(x)))


class PostNormBlock(nn.Module):
    """``norm(x + attn(x))`` then ``norm(x + mlp(x))``: the original Transformer's and BERT's layout."""

    def __init__(
        self, *, attn: Attention, attn_norm: nn.Module, mlp: nn.Module, mlp_norm: nn.Module, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.attn, self.attn_norm = attn, attn_norm
        self.mlp, self.mlp_norm = mlp, mlp_norm
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, *, mask=None, is_causal: bool = False, rope=None, cache=None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))
