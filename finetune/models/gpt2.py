"""GPT-2: learned positions, pre-norm LayerNorm blocks, tanh-GELU MLP, fused qkv, tied output head."""

from dataclasses import dataclass

import torch
from torch import nn

from finetune.models.base import DecoderLM, HFConfigMixin
from finetune.models.family import Family
from finetune.models.keymap import KeyMap
from finetune.nn import MLP, Attention, AttentionNames, Dropout, LayerNorm, PreNormBlock, build_mask


@dataclass
class GPT2Config(HFConfigMixin):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True  # False: raw q.k scores
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class GPT2(DecoderLM):
    embedding = "wte"
    scaled_residual_init = ("c_proj",)  # attention and MLP output projections, as GPT-2 (and HF) initialize them

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.drop = Dropout(c.embd_pdrop)
        head_dim = c.n_embd // c.n_head
        self.layers = nn.ModuleList(
            PreNormBlock(
                attn_norm=LayerNorm(c.n_embd, eps=c.layer_norm_epsilon),
                attn=Attention(
                    dim=c.n_embd,
                    n_heads=c.n_head,
                    qkv_bias=True,
                    o_bias=True,
                    scale=(head_dim**-0.5 if c.scale_attn_weights else 1.0)
                    / (i + 1 if c.scale_attn_by_inverse_layer_idx else 1),
                    dropout=c.attn_pdrop,
                    names=AttentionNames(qkv="c_attn", o="c_proj"),
                ),
                mlp_norm=LayerNorm(c.n_embd, eps=c.layer_norm_epsilon),
                mlp=MLP(
                    dim=c.n_embd,
                    hidden_dim=c.n_inner or 4 * c.n_embd,
                    act=c.activation_function,
                    bias=True,
                    names=("c_fc", "c_proj"),
                ),
                dropout=c.resid_pdrop,
            )
            for i in range(c.n_layer)
        )
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.init_weights()

    def features(
        self, input_ids, *, attention_mask=None, position_ids=None, segment_ids=None, cache=None
    ) -> torch.Tensor:
        """Hidden states (B, T, C) after the final norm; arguments as in ``forward``."""
        T = input_ids.size(1)
        position_ids, past = self.positions(input_ids, position_ids, cache)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        mask, is_causal = build_mask(
            q_len=T,
            k_len=past + T,
            padding_mask=attention_mask,
            segment_ids=segment_ids,
            causal=True,
            device=input_ids.device,
        )
        for i, layer in enumerate(self.layers):
            x = self.run_layer(layer, x, mask=mask, is_causal=is_causal, cache=cache[i] if cache else None)
        return self.ln_f(x)


FAMILY = Family(
    model_types=("gpt2",),
    config_cls=GPT2Config,
    model_cls=GPT2,
    hf_prefix="transformer.",
    tied=("lm_head.weight", "wte.weight"),
    heads=("lm_head",),
    key_map=KeyMap(
        (
            ("wte.*", "transformer.wte.*"),
            ("wpe.*", "transformer.wpe.*"),
            ("layers.{i}.attn_norm.*", "transformer.h.{i}.ln_1.*"),
            ("layers.{i}.attn.*", "transformer.h.{i}.attn.*"),
            ("layers.{i}.mlp_norm.*", "transformer.h.{i}.ln_2.*"),
            ("layers.{i}.mlp.*", "transformer.h.{i}.mlp.*"),
            ("ln_f.*", "transformer.ln_f.*"),
            ("lm_head.*", "lm_head.*"),
        )
    ),
    # HF's GPT-2 uses Conv1D, whose weight is the transpose of nn.Linear's.
    transposed=(r"\.(c_attn|c_proj|c_fc)\.weight$",),
    # Old checkpoints carry the causal mask as buffers.
    ignored=(r"\.attn\.(masked_)?bias$",),
    # c_attn is fused [q; k; v]: each rank takes its heads of all three. Positions (wpe) stay replicated.
    tensor_parallel={
        "c_attn": "colwise_qkv",
        "c_fc": "colwise",
        "c_proj": "rowwise",
        "wte": "embedding",
        "lm_head": "head",
    },  # fmt: skip
)
