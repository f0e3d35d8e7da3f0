"""AdamW with decoupled weight decay on matrices only (fp32 master weights for bf16/fp16 parameters), and warmup +
cosine/linear/constant schedules."""

import contextlib
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


class MasterAdamW(torch.optim.AdamW):
    """AdamW that steps half-precision (bf16/fp16) parameters through fp32 master copies kept in its state.

    A bf16 weight keeps 8 significant bits, so an AdamW update of about ``lr`` rounds away whenever it is below half
    a bf16 step of the weight: at lr 2e-5 most matrix entries never move and a norm weight of 1.0 (step 2^-7) never
    does. Here each half-precision parameter has an fp32 master (``state[p]["master"]``); the step runs on the
    masters with fp32 gradients and fp32 moments, then the parameter gets the master rounded to its dtype, so small
    updates accumulate in the master until they move the weight. fp32 parameters step as in ``torch.optim.AdamW``.
    Memory per half-precision weight: 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) = 16 bytes, as fp32
    weights under bf16-mixed, with bf16 compute and activations. Saved and loaded with the optimizer state, in fp32.
    """

    @contextlib.contextmanager
    def _as_fp32(self, grads: bool):
        """Inside, each half-precision parameter holds its fp32 master (and, with ``grads``, an fp32 copy of its
        gradient), so that AdamW's own step, state creation and state loading all run in fp32. On exit the
        parameters get back their own storage (which DDP buckets or views may hold), the master rounded into it,
        and the master is kept in the state. (It is stored only after AdamW has initialized the state: AdamW
        initializes an empty state only.)"""
        swapped = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.bfloat16, torch.float16):
                    continue
                master = self.state[p].get("master") if p in self.state else None
                data, grad = p.data, p.grad
                p.data = master if master is not None else data.float()
                p.grad = grad.float() if grads and grad is not None else None
                swapped.append((p, data, grad))
        try:
            yield
        finally:
            for p, data, grad in swapped:
                master = p.data
                p.data, p.grad = data, grad
                if grads and "step" in self.state.get(p, {}):  # stepped (a parameter without a gradient is not)
                    with torch.no_grad():
                        data.copy_(master)
                    self.state[p]["master"] = master

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # gradients first (Lightning clips them in the closure), then the fp32 step
            with torch.enable_grad():
                loss = closure()
        with self._as_fp32(grads=True):
            super().step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded moments to their parameter's dtype: loading against fp32 parameters keeps them fp32.
        with self._as_fp32(grads=False):
            super().load_state_dict(state_dict)


def adamw(
    groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, allow_fused: bool = True
) -> torch.optim.AdamW:
    """``MasterAdamW``, fused (one kernel for all parameters) where allowed and the parameters' devices allow it.

    Lightning refuses to clip gradients under mixed precision with a fused optimizer (it would unscale them
    itself), so the caller disallows fusing in that case.
    """
    params = [p for g in groups for p in g["params"]]
    fused = allow_fused and bool(params)
    fused = fused and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params)
    try:
        return MasterAdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    except (RuntimeError, TypeError):  # e.g. a dtype or device the fused kernel does not cover
        return MasterAdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


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
