"""Gradient accumulation and data parallelism weighted by labelled tokens, as one big batch.

Each micro-batch backpropagates its loss *sum* over its labelled tokens; before the optimizer step the accumulated
gradients are divided by the labelled-token count of the whole window (every micro-batch on every data-parallel
rank), found with one small all-reduce. So a 2-token answer weighs 2 tokens, not as much as a 62-token one, and
the step equals one batch of all the window's rows: HF's ``num_items_in_batch``, torchtune's ``scale_grads``. The
count is made on the device, after the batch: no look-ahead in the data and no host sync (masked LM draws its
masks in the step), and any task whose loss is a token mean plugs in by returning that mean and its count.
"""

from collections.abc import Iterable

import torch


class TokenWindow:
    """The loss sum and labelled tokens of this rank's micro-batches since the last optimizer step.

    Lightning divides every micro-batch's loss by ``accumulate_grad_batches`` (also in an epoch's last, shorter
    window) and DDP/FSDP average gradients over the data-parallel ranks; ``finish``'s factor undoes both and divides
    by the window's tokens instead.
    """

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None  # (2,) loss sum, labelled tokens

    def add(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor | int) -> None:
        n = torch.as_tensor(n_tokens, device=loss_sum.device)
        part = torch.stack([loss_sum.detach().float(), n.float()])  # (2,)
        self.totals = part if self.totals is None else self.totals + part

    def finish(self, strategy, accumulate: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gradient factor, the window's token-mean loss over all ranks), and starts the next window; ``None``
        when nothing was added. One all-reduce (of 2 numbers) over all ranks."""
        if self.totals is None:
            return None
        totals, self.totals = strategy.reduce(self.totals.clone(), reduce_op="sum"), None
        replicas = (getattr(strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1)
        # Ranks of one data shard (a tensor-parallel group) all counted it: keep one count per shard.
        tokens = totals[1] * (replicas / getattr(strategy, "world_size", 1))
        return accumulate * replicas / tokens.clamp(min=1), totals[0] / totals[1].clamp(min=1)


def scale_gradients(parameters: Iterable[torch.nn.Parameter], factor: torch.Tensor) -> None:
    """Multiplies every existing gradient by ``factor`` (a device scalar: no host sync), in place."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(factor.to(p.grad.dtype))


def reaches_gradients(strategy) -> bool:
    """Whether the gradients are the parameters' ``.grad`` before the optimizer step, for ``scale_gradients``: not
    under DeepSpeed, whose engine keeps them partitioned in its own buffers (and accumulates by its own count)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return not isinstance(strategy, DeepSpeedStrategy)
