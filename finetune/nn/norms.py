"""Normalization layers."""

import torch
import torch.nn.functional as F
from torch import nn

# LayerNorm is torch's own (BERT, GPT-2); re-exported so models import every block from one place.
LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA, T5): ``weight * x / sqrt(mean(x^2) + eps)``, no mean, no bias.

    The statistic is computed in fp32 and cast back before the weight, as Hugging Face does, so that
    bf16 runs match theirs bit for bit. ``F.rms_norm`` does the normalization in one kernel (forward and backward
    give the same bits as the written-out formula, in fewer passes over memory).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim must be positive, got {dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
