"""LLaMA (2 and 3), and the variants that differ only in config: Mistral (sliding window), Qwen2 (qkv bias).

RMSNorm pre-norm blocks, rotary positions, SwiGLU MLP, grouped-query attention.
"""

from dataclasses import dataclass

import torch
from torch import nn

from finetune.models.base import DecoderLM, HFConfigMixin
from finetune.models.family import Family
from finetune.models.keymap import KeyMap
from finetune.nn import Attention, GatedMLP, PreNormBlock, RMSNorm, RotaryEmbedding, build_mask


@dataclass
class LlamaConfig(HFConfigMixin):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_parameters beyond theta: {"rope_type": "llama3", ...}
    attention_bias: bool = False  # bias on q, k, v (and o unless o_bias says otherwise)
    o_bias: bool | None = None  # None: = attention_bias; Qwen2 has qkv bias without o bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"  # "llama" | "mistral" | "qwen2": which HF class to_hf writes

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.o_bias is None:
            self.o_bias = self.attention_bias

    @property
    def architecture(self) -> str:
        return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            self.model_type
        ]

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        rope = dict(d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {})  # v5 and v4 spellings
        d["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.pop("rope_type", rope.pop("type", "default"))  # "type" in older configs
        d["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
        if d.get("model_type") == "qwen2":
            d.update(attention_bias=True, o_bias=False)  # fixed in Qwen2's code, not in its config
            if d.get("use_sliding_window"):
                raise ValueError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
            d["sliding_window"] = None
        return cls.from_dict(d)

    def to_hf(self) -> dict:
        d = self.to_dict()
        d["rope_parameters"] = {
            "rope_type": "default",
            **(d.pop("rope_scaling") or {}),
            "rope_theta": d.pop("rope_theta"),
        }
        o_bias = d.pop("o_bias")
        if self.model_type == "qwen2":
            if not (self.attention_bias and not o_bias):
                raise ValueError("Qwen2 checkpoints have q/k/v bias and no o bias; this config differs")
            d.pop("attention_bias")
        elif o_bias != self.attention_bias:
            raise ValueError(f"model_type {self.model_type!r} cannot express o_bias != attention_bias")
        if self.model_type == "llama":
            d.pop("sliding_window")
        return d


class Llama(DecoderLM):
    embedding = "embed_tokens"

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rope = RotaryEmbedding(head_dim=c.head_dim, theta=c.rope_theta, scaling=c.rope_scaling)
        self.layers = nn.ModuleList(
            PreNormBlock(
                attn_norm=RMSNorm(c.hidden_size, eps=c.rms_norm_eps),
                attn=Attention(
                    dim=c.hidden_size,
                    n_heads=c.num_attention_heads,
                    n_kv_heads=c.num_key_value_heads,
                    head_dim=c.head_dim,
                    qkv_bias=c.attention_bias,
                    o_bias=c.o_bias,
                    dropout=c.attention_dropout,
                ),
                mlp_norm=RMSNorm(c.hidden_size, eps=c.rms_norm_eps),
                mlp=GatedMLP(dim=c.hidden_size, hidden_dim=c.intermediate_size, act=c.hidden_act, bias=c.mlp_bias),
            )
            for _ in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.init_weights()

    def features(
        self, input_ids, *, attention_mask=None, position_ids=None, segment_ids=None, cache=None
    ) -> torch.Tensor:
        """Hidden states (B, T, C) after the final norm; arguments as in ``forward``."""
        T = input_ids.size(1)
        position_ids, past = self.positions(input_ids, position_ids, cache)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        rope = self.rope(position_ids, x.dtype)  # cos, sin: (B, T, D)
        mask, is_causal = build_mask(
            q_len=T,
            k_len=past + T,
            padding_mask=attention_mask,
            segment_ids=segment_ids,
            causal=True,
            sliding_window=self.config.sliding_window,
            device=input_ids.device,
        )
        for i, layer in enumerate(self.layers):
            x = self.run_layer(layer, x, mask=mask, is_causal=is_causal, rope=rope, cache=cache[i] if cache else None)
        return self.norm(x)


FAMILY = Family(
    model_types=("llama", "mistral", "qwen2"),
    config_cls=LlamaConfig,
    model_cls=Llama,
    hf_prefix="model.",
    tied=("lm_head.weight", "embed_tokens.weight"),
    heads=("lm_head",),
    key_map=KeyMap(
        (
            ("embed_tokens.*", "model.embed_tokens.*"),
            ("layers.{i}.attn_norm.*", "model.layers.{i}.input_layernorm.*"),
            ("layers.{i}.attn.*", "model.layers.{i}.self_attn.*"),
            ("layers.{i}.mlp_norm.*", "model.layers.{i}.post_attention_layernorm.*"),
            ("layers.{i}.mlp.*", "model.layers.{i}.mlp.*"),
            ("norm.*", "model.norm.*"),
            ("lm_head.*", "lm_head.*"),
        )
    ),
    ignored=(r"rotary_emb\.inv_freq$",),
    # Megatron's split: q/k/v and gate/up by output (heads), o/down by input, vocabulary-sharded embedding and head.
    tensor_parallel={
        **dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), "colwise"),
        **dict.fromkeys(("o_proj", "down_proj"), "rowwise"),
        "embed_tokens": "embedding",
        "lm_head": "head",
    },
)
