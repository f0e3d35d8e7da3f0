"""AdamW with decoupled weight decay on matrices only, and warmup + cosine/linear/constant schedules."""

import math
from typing import Literal

import torch
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (norms, biases, embeddings).

    Embeddings are found by module type, so a head tied to the embedding is not decayed either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(
    groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, allow_fused: bool = True
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where allowed and the parameters' devices and dtypes allow it.

    Lightning refuses to clip gradients under mixed precision with a fused optimizer (it would unscale them
    itself), so the caller disallows fusing in that case.
    """
    params = [p for g in groups for p in g["params"]]
    fused = allow_fused and bool(params)
    fused = fused and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    except (RuntimeError, TypeError):  # e.g. a dtype or device the fused kernel does not cover
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` >= 1 is a number of steps; below 1 it is a fraction of ``total_steps``."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 (steps, or a fraction of training below 1), got {warmup}")
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def lr_lambda(step: int, *, warmup: int, total: int, schedule: Schedule, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay
