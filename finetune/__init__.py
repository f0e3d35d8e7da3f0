"""finetune: train and fine-tune transformers with Lightning."""

import logging

# bitsandbytes (imported by peft) warns at import, on CPUs with AVX512-bf16, that the optional `kernels` package is
# missing. Its fallback is fine, and quantize.py turns that CPU path off anyway, so the warning would only add noise
# to every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
