"""Feed-forward layers: a plain two-layer MLP and the gated variants (SwiGLU, GEGLU)."""

import torch
import torch.nn.functional as F
from torch import nn

from finetune.nn.dropout import Dropout


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the formula HF writes out op by op.

    Here it is one ``F.gelu(approximate="tanh")`` kernel each way: the same function to rounding (within 5e-7 in fp32;
    bf16 is rounded once instead of after every op), where the written-out form runs 9 elementwise kernels forward,
    more backward, and keeps 5 intermediates of (B, T, 4C) for the backward (a third of a GPT-2 step's elementwise
    time on the CPU at 128 wide)."""
    return F.gelu(x, approximate="tanh")


# Activation names as they appear in Hugging Face configs (`hidden_act`, `activation_function`, ...).
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,  # the same kernel under the name HF gives its one-kernel form
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """``down(act(up(x)))``. Module names are given so they follow the checkpoint's (``c_fc``/``c_proj``, ...)."""

    def __init__(
        self,
        *,
        dim: int,
        hidden_dim: int,
        act: str,
        bias: bool,
        dropout: float = 0.0,
        names: tuple[str, str] = ("up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        self.act_name, self.act = act, activation(act)
        self.dropout = Dropout(dropout)  # on the hidden activations (T5); 0 elsewhere
        self.names = names
        self.add_module(names[0], nn.Linear(dim, hidden_dim, bias=bias))
        self.add_module(names[1], nn.Linear(hidden_dim, dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        up, down = (getattr(self, n) for n in self.names)
        return down(self.dropout(self.act(up(x))))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with ``act="silu"`` (LLaMA), GEGLU with ``act="gelu_new"`` (T5 v1.1)."""

    def __init__(
        self,
        *,
        dim: int,
        hidden_dim: int,
        act: str,
        bias: bool = False,
        dropout: float = 0.0,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        self.act_name, self.act = act, activation(act)
        self.dropout = Dropout(dropout)
        self.names = names
        self.add_module(names[0], nn.Linear(dim, hidden_dim, bias=bias))
        self.add_module(names[1], nn.Linear(dim, hidden_dim, bias=bias))
        self.add_module(names[2], nn.Linear(hidden_dim, dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        gate, up, down = (getattr(self, n) for n in self.names)
        h = self.act(gate(x)) * up(x)
        return down(self.dropout(h) if self.training and self.dropout.p > 0 else h)  # no no-op call per token
