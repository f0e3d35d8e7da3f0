"""``QuantLinear``: a linear layer whose weight is kept quantized (``core.Quantized``) and multiplied through the
int8/int4 weight-only kernels PyTorch ships, or a plain dequantize-then-matmul where no kernel takes the shape.

The kernels' packed layouts depend on the device (and CPU), so they are made from the plain int8 tensors on the
first forward on a device and dtype, and checked once there against the dequantized reference: a kernel that
refuses the shape, or disagrees, leaves that layer on the fallback.

The kernels run in 16-bit activations (``KERNEL_DTYPE``): an fp32 input is rounded to bf16 for the product, which
accumulates in fp32, and the output is cast back. On CPU (torch 2.13) only their bf16/fp16 paths are vectorized: at
batch 1, fp32 inputs made ``_weight_int8pack_mm`` 9x and ``_weight_int4pack_mm_for_cpu`` 25-40x slower than
``F.linear`` on the fp32 weight, and bf16 inputs make them 2.5x faster than it (``scripts/bench_quant_kernels.py``).
"""

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from finetune.quant.core import Quantized, dequantize, quantize_weight

Kernel = Callable[[torch.Tensor], torch.Tensor]  # (M, K) -> (M, N)
aten = torch.ops.aten


def _int8_per_channel(qw: Quantized, dtype: torch.dtype) -> Kernel | None:
    """``_weight_int8pack_mm``: symmetric int8, one scale per output channel (CPU; other devices where built)."""
    if qw.bits != 8 or qw.zero is not None or qw.scale.size(1) != 1:
        return None
    if qw.q.size(1) % 16:  # torch 2.13's bf16 CPU kernel returns garbage or crashes (nothing to catch) on such widths
        return None
    q, scale = qw.q, qw.scale[:, 0].to(dtype)  # (N, K) int8, (N,)
    return lambda x: aten._weight_int8pack_mm(x, q, scale)


def _scales_and_zeros(qw: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """(G, N, 2): the int4 kernels' [scale, zero] per group, for w = (u - 8) * scale + zero with u = q + 8."""
    zero = qw.zero if qw.zero is not None else torch.zeros_like(qw.scale)
    return torch.stack((qw.scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)


def _int4_grouped(qw: Quantized, dtype: torch.dtype) -> Kernel | None:
    """``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` (tinygemm, bf16) on CUDA."""
    if qw.bits != 4:
        return None
    u = (qw.q.to(torch.int32) + 8).contiguous()  # (N, K) in [0, 15]
    g, sz = qw.group_size, _scales_and_zeros(qw, dtype)
    if u.device.type == "cpu":
        packed = aten._convert_weight_to_int4pack_for_cpu(u, 1)
        return lambda x: aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
    pairs = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # (N, K / 2), the CUDA packer's input
    packed = aten._convert_weight_to_int4pack(pairs, 8)
    return lambda x: aten._weight_int4pack_mm(x, packed, g, sz)


KERNELS = (_int8_per_channel, _int4_grouped)  # each returns None for weights it is not for
KERNEL_DTYPE = {torch.float32: torch.bfloat16}  # input dtype -> the dtype the kernels multiply in (others: their own)


def _in_dtype(kernel: Kernel, compute: torch.dtype, dtype: torch.dtype) -> Kernel:
    """``kernel`` (made for ``compute`` inputs) taking and returning ``dtype``."""
    if compute == dtype:
        return kernel
    return lambda x: kernel(x.to(compute)).to(dtype)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` quantized: buffers ``qweight`` (N, K) int8, ``scale`` (N, G) and, for
    asymmetric groups, ``zero`` (N, G); ``bias`` (N,) as in the original layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        G = -(-in_features // group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, G, device=device))
        self.register_buffer("zero", None if symmetric else torch.empty(out_features, G, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self._kernels: dict[tuple, Kernel | None] = {}  # (device, dtype) -> packed kernel, or None: fallback

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int | None, symmetric: bool) -> "QuantLinear":
        w = linear.weight.detach()  # (N, K)
        qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
        new = cls(linear.in_features, linear.out_features, bits=bits, group_size=qw.group_size, symmetric=symmetric,
                  bias=linear.bias is not None, device=w.device, dtype=w.dtype)  # fmt: skip
        new.qweight.copy_(qw.q)
        new.scale.copy_(qw.scale)
        if qw.zero is not None:
            new.zero.copy_(qw.zero)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    @property
    def quantized(self) -> Quantized:
        return Quantized(self.qweight, self.scale.float(), None if self.zero is None else self.zero.float(),
                         self.bits, self.group_size)  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized, dtype)  # (N, K)

    def _apply(self, fn, recurse=True):
        self._kernels = {}  # packed for the old device or dtype
        return super()._apply(fn, recurse)

    def kernel(self, device: torch.device, dtype: torch.dtype) -> Kernel | None:
        """The packed kernel for inputs of this device and dtype (made and checked on first use), or None."""
        key = (device, dtype)
        if key not in self._kernels:
            self._kernels[key] = self._make_kernel(dtype)
        return self._kernels[key]

    def _make_kernel(self, dtype: torch.dtype) -> Kernel | None:
        qw = self.quantized
        compute = KERNEL_DTYPE.get(dtype, dtype)
        gen = torch.Generator(device=self.qweight.device).manual_seed(0)
        x = torch.randn(3, self.in_features, generator=gen, device=self.qweight.device).to(compute)  # (3, K)
        ref = F.linear(x.float(), dequantize(qw))  # (3, N)
        for make in KERNELS:
            try:
                kernel = make(qw, compute)
                if kernel is None:
                    continue
                got = kernel(x).float()
            except (RuntimeError, NotImplementedError):
                continue  # the kernel refuses this shape, dtype or device
            tol = (1e-4 if compute == torch.float32 else 3e-2) * ref.abs().max().item() + 1e-5
            if got.shape == ref.shape and (got - ref).abs().max().item() <= tol:
                return _in_dtype(kernel, compute, dtype)
            warnings.warn(f"QuantLinear {tuple(qw.q.shape)}: the {make.__name__} kernel disagrees with the "
                          "dequantized weight; using the dequantize fallback", stacklevel=2)  # fmt: skip
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) -> (..., N)."""
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = self.kernel(x.device, x.dtype)
        y = kernel(x2.contiguous()) if kernel is not None else F.linear(x2, self.dequantized_weight(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + ("" if self.group_size == self.in_features else f" g{self.group_size}")
        return f"in={self.in_features}, out={self.out_features}, {kind}, bias={self.bias is not None}"
