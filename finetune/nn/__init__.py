"""From-scratch building blocks; each is small and tested on its own (tests/nn)."""

from finetune.nn.attention import Attention, AttentionNames, KVCache, SlotKVCache, build_mask
from finetune.nn.blocks import PostNormBlock, PreNormBlock
from finetune.nn.dropout import Dropout
from finetune.nn.mlp import MLP, GatedMLP, activation
from finetune.nn.norms import LayerNorm, RMSNorm
from finetune.nn.positions import (
    RotaryEmbedding,
    SinusoidalPositions,
    T5RelativeBias,
    apply_rotary,
    relative_position_bucket,
    rope_inv_freq,
    sinusoidal_table,
)

__all__ = [
    "MLP",
    "Attention",
    "AttentionNames",
    "Dropout",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "PostNormBlock",
    "PreNormBlock",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SlotKVCache",
    "T5RelativeBias",
    "activation",
    "apply_rotary",
    "build_mask",
    "relative_position_bucket",
    "rope_inv_freq",
    "sinusoidal_table",
]
