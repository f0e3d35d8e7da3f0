"""The chunked loss (``finetune.nn.loss``) for models whose last step is a plain linear output head that the task
cannot call apart from the model (encoder-decoders, masked LM heads with a transform before the decoder): the model
runs with its head handing back its input, so the head's input states come out where the logits would, and the loss
applies the head chunk by chunk. No (B, T, V) logits are held; one mechanism for both backends."""

from contextlib import contextmanager

import torch
from torch import nn

from finetune.models.hub import SUPPORTED_MODEL_TYPES
from finetune.nn.loss import linear_cross_entropy


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def head_bypassed(head: nn.Linear):
    """Within the block, calling ``head`` returns its input unchanged (hooks still run): the instance's ``forward``
    shadows the class's, and is removed again on exit."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def fusable_head(task, head: nn.Module | None) -> nn.Linear | None:
    """``head`` when the chunked loss can stand in for it: a plain ``nn.Linear`` (not an adapter's wrapper or a
    ``modules_to_save`` copy), on a model family whose HF code we mirror (so the head is known to be applied last,
    as is: no logit scaling or soft-capping after it). ``None`` under FSDP2/tensor parallelism, whose head weight is
    sharded outside the model's forward."""
    if task.device_mesh is not None or head is None or type(head) is not nn.Linear:
        return None
    if task.is_hf and task.model.config.model_type not in SUPPORTED_MODEL_TYPES:
        return None
    return head


def head_loss(
    forward, head: nn.Linear, labels: torch.Tensor, *, preds: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Runs ``forward()`` (which returns what the head outputs, (B, T, V)) with the head bypassed, then the chunked
    cross-entropy of the head over its input against ``labels`` (B, T). Returns (token-mean loss, labelled tokens,
    argmax predictions (B, T) when ``preds``)."""
    with head_bypassed(head):
        h = forward()  # (B, T, C): the head's input
    return linear_cross_entropy(h, head.weight, labels, bias=head.bias, preds=preds)
