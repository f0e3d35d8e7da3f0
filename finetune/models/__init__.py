"""From-scratch model families and their conversion to and from Hugging Face checkpoints."""

from finetune.models.bert import Bert, BertConfig
from finetune.models.gpt2 import GPT2, GPT2Config
from finetune.models.hub import FAMILIES, SUPPORTED_MODEL_TYPES, from_config, from_hf, hf_config, hf_state_dict, to_hf
from finetune.models.llama import Llama, LlamaConfig
from finetune.models.t5 import T5, T5Config

__all__ = [
    "FAMILIES",
    "GPT2",
    "SUPPORTED_MODEL_TYPES",
    "T5",
    "Bert",
    "BertConfig",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "T5Config",
    "from_config",
    "from_hf",
    "hf_config",
    "hf_state_dict",
    "to_hf",
]
