"""The quantizer and ``QuantLinear``: every layer against its dequantized reference, through the kernels and the
fallback, for int8 per channel and int4 with every group size."""

import pytest
import torch
from torch import nn

from finetune.quant import QuantLinear, dequantize, quantize_weight
from finetune.quant.core import pack_nibbles, unpack_nibbles


def _linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize("bits, group, symmetric", [(8, None, True), (8, 32, True), (4, 32, True), (4, 32, False),
                                                    (4, 64, False), (4, 128, False), (4, 40, False)])  # fmt: skip
def test_quantizer_error_is_within_half_a_step(bits, group, symmetric):
    """Every weight is within half a quantization step of its value (symmetric int4 clips the other sign past 7/8
    of the extreme: one step); the levels stay in range; groups are the asked size (40: a short last group)."""
    w = torch.randn(24, 100) * torch.linspace(0.1, 3, 24)[:, None]  # rows of different scales
    qw = quantize_weight(w, bits=bits, group_size=group, symmetric=symmetric)
    lo, hi = qw.levels
    assert qw.q.dtype == torch.int8 and int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    assert qw.scale.shape == (24, -(-100 // (group or 100)))
    step = qw.scale.abs().repeat_interleave(qw.group_size, 1)[:, :100]
    bound = step if (symmetric and bits == 4) else step / 2
    assert ((dequantize(qw) - w).abs() <= bound + 1e-6).all()
    if symmetric:  # the largest magnitude of each group is exact
        assert qw.zero is None
        assert torch.allclose(dequantize(qw).abs().amax(1), w.abs().amax(1))


def test_quantizer_hand_example():
    """A 1x4 row, int4 symmetric: scale = -1.6 / -8 = 0.2, levels round(w / 0.2) = [-8, 2, 5, 0]."""
    qw = quantize_weight(torch.tensor([[-1.6, 0.4, 1.0, 0.0]]), bits=4, symmetric=True)
    assert qw.q.tolist() == [[-8, 2, 5, 0]]
    torch.testing.assert_close(qw.scale, torch.tensor([[0.2]]))


def test_nibbles_round_trip_odd_width():
    q = torch.randint(-8, 8, (5, 33), dtype=torch.int8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, 33), q)


# (in, out, bits, group, uses a kernel): out=24 is not a multiple of 16 and K=100 not of the group: fallback.
CASES = [
    (96, 64, 8, None, True),
    (112, 63, 8, None, True),  # any N
    (104, 64, 8, None, False),  # K % 16 != 0: the bf16 int8 kernel would be wrong or crash, so it is not tried
    (128, 64, 4, 32, True),
    (128, 64, 4, 64, True),
    (256, 32, 4, 128, True),
    (128, 24, 4, 32, False),  # N % 16 != 0: the int4 packer refuses
    (100, 64, 4, 32, False),  # K % group != 0
    (96, 64, 8, 32, False),  # grouped int8: no kernel
]


@pytest.mark.parametrize("n_in, n_out, bits, group, kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_equals_dequantized_reference(n_in, n_out, bits, group, kernel, dtype):
    lin = _linear(n_in, n_out)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group, symmetric=bits == 8)
    x = torch.randn(2, 5, n_in).to(dtype)  # (B, T, K)
    ref = (x.float() @ q.dequantized_weight().t() + lin.bias.detach()).to(dtype)
    got = q(x)
    assert got.shape == (2, 5, n_out) and got.dtype == dtype
    assert (q.kernel(x.device, dtype) is not None) == kernel
    # the fallback multiplies in fp32; the kernels in bf16 (inputs and outputs rounded to it, sums in fp32)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 and not kernel else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_fp32_inputs_run_the_kernels_in_bf16(bits, group):
    """The int kernels' fp32 paths are not vectorized on CPU (10-40x slower at batch 1), so an fp32 input is rounded
    to bf16, multiplied by the bf16 kernel and the output cast back: exactly the bf16 kernel's numbers, in fp32."""
    q = QuantLinear.from_linear(_linear(128, 64, bias=False), bits=bits, group_size=group, symmetric=bits == 8)
    x = torch.randn(3, 128)
    got = q(x)
    assert got.dtype == torch.float32 and q.kernel(x.device, torch.float32) is not None
    assert torch.equal(got, q(x.bfloat16()).float())


def test_layer_is_close_to_the_full_precision_layer():
    """int8 per channel and int4 g32 against the unquantized layer: relative output errors of the right size."""
    lin = _linear(256, 64, bias=False)
    x = torch.randn(16, 256)
    full = lin(x).detach()
    for bits, group, bound in ((8, None, 0.01), (4, 32, 0.15)):
        got = QuantLinear.from_linear(lin, bits=bits, group_size=group, symmetric=bits == 8)(x)
        rel = ((got - full).norm() / full.norm()).item()
        assert rel < bound, (bits, rel)


def test_moving_the_layer_repacks():
    """Packed kernels belong to a device and dtype: a cast drops them, and the next call packs again."""
    q = QuantLinear.from_linear(_linear(64, 32), bits=4, group_size=32, symmetric=False)
    x = torch.randn(3, 64)
    before = q(x)
    assert q._kernels
    q.to(torch.float64).to(torch.float32)
    assert not q._kernels
    torch.testing.assert_close(q(x), before)
