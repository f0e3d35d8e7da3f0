"""4-bit NF4 base weights for QLoRA, through ``bitsandbytes`` (its ``Linear4bit`` runs on CPU and GPU, and peft
wraps it with its own QLoRA layer).

Blocks of 64 weights share one absmax scale; the scales are themselves quantized to 8 bits ("double
quantization", as in the QLoRA paper), so a weight costs about 4.13 bits.
"""

import torch
from torch import nn

BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("quantize: nf4 needs bitsandbytes: pip install 'finetune[qlora]'") from None
    return bnb


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a transformers ``Conv1D`` (which stores (in, out))."""
    return module.weight.detach().t() if type(module).__name__ == "Conv1D" else module.weight.detach()


def quantize_nf4(model: nn.Module, names: list[str], compute_dtype: torch.dtype | None = None) -> None:
    """Replaces each named linear layer by a frozen NF4 ``Linear4bit`` that dequantizes and multiplies in
    ``compute_dtype`` (default: the layer's dtype). Training sets it from the run's precision: the weights are still
    fp32 when the model is quantized, before Lightning casts it, and ``Linear4bit`` keeps the dtype it is given."""
    bnb = _bnb()
    for name in names:
        old = model.get_submodule(name)
        weight = _linear_weight(old)
        out_features, in_features = weight.shape
        new = bnb.nn.Linear4bit(
            in_features, out_features, bias=old.bias is not None, compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=True, quant_type="nf4", device="meta",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=BLOCKSIZE
        )
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        new = new.to(weight.device)  # moving a Params4bit quantizes it
        # bitsandbytes 0.50's repacking for its AVX512-bf16 CPU inference kernel fails on double-quantized weights
        # (a reshape error in eval mode); the plain dequantize-and-matmul path is exact and works everywhere.
        new.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.is_loaded_in_4bit = True  # peft then wraps these layers with its bnb LoRA layer


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) as the NF4 base layer sees it: quantized and dequantized, in ``weight``'s dtype."""
    bnb = _bnb()
    q, state = bnb.functional.quantize_4bit(
        weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(q, state).to(weight.dtype)


def nbytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored, NF4 blocks and their quantization statistics included."""
    total = 0
    for m in model.modules():
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += _state_bytes(state)
    return total


def _state_bytes(state) -> int:
    tensors = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
