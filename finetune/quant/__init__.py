"""Weight-only quantization for inference: one quantizer (``core``) that feeds both our quantized linear layers
(``linear``, through PyTorch's int8/int4 matmul kernels) and the GGUF writer; whole models and quantized folders in
``model``. The NF4 base of QLoRA training is ``finetune.quantize``."""

from finetune.quant.core import Quantized, dequantize, quantize_weight
from finetune.quant.linear import QuantLinear
from finetune.quant.model import QuantConfig, load_quantized, quantize_model, save_quantized

__all__ = [
    "QuantConfig",
    "QuantLinear",
    "Quantized",
    "dequantize",
    "load_quantized",
    "quantize_model",
    "quantize_weight",
    "save_quantized",
]
