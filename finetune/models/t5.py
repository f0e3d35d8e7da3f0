"""T5: encoder-decoder with RMSNorm pre-norm blocks, relative position bias, unscaled attention.

v1.0 (ReLU MLP, output head tied to the embedding and fed d_model^-0.5-scaled states) and
v1.1 (gated-GELU MLP, untied head, no scaling) differ only in config.
"""

from dataclasses import dataclass

import torch
from torch import nn

from finetune.models.base import Backbone, HFConfigMixin
from finetune.models.family import Family
from finetune.models.keymap import KeyMap
from finetune.nn import MLP, Attention, AttentionNames, GatedMLP, PreNormBlock, RMSNorm, T5RelativeBias, build_mask
from finetune.nn.dropout import Dropout

T5_NAMES = AttentionNames(q="q", k="k", v="v", o="o")


@dataclass
class T5Config(HFConfigMixin):
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0) | "gated-gelu" (v1.1) | "gated-ACT" | "ACT"
    tie_word_embeddings: bool = True  # output head shares the embedding (v1.0)
    scale_decoder_outputs: bool | None = None  # None: = tie_word_embeddings, as T5's code always did
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0
    model_type = "t5"
    architecture = "T5ForConditionalGeneration"

    def __post_init__(self) -> None:
        self.num_decoder_layers = self.num_decoder_layers or self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        act = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # HF's historical special case


class T5(Backbone):
    is_encoder_decoder = True

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = self.config = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = Dropout(c.dropout_rate)
        bias = lambda bidirectional: T5RelativeBias(  # noqa: E731
            n_heads=c.num_heads,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
            bidirectional=bidirectional,
        )
        self.encoder_bias = bias(True)  # only the first layer of each stack has one; all layers share it
        self.encoder = nn.ModuleList(self._block(cross=False) for _ in range(c.num_layers))
        self.encoder_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.decoder_bias = bias(False)
        self.decoder = nn.ModuleList(self._block(cross=True) for _ in range(c.num_decoder_layers))
        self.decoder_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.init_weights()

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder  # the stack that decodes token by token, so the one with KV caches

    def _block(self, *, cross: bool) -> PreNormBlock:
        c = self.config
        attn = lambda: Attention(  # noqa: E731
            dim=c.d_model, n_heads=c.num_heads, head_dim=c.d_kv, scale=1.0, dropout=c.dropout_rate, names=T5_NAMES
        )
        norm = lambda: RMSNorm(c.d_model, eps=c.layer_norm_epsilon)  # noqa: E731
        if c.is_gated:
            mlp = GatedMLP(
                dim=c.d_model, hidden_dim=c.d_ff, act=c.act, dropout=c.dropout_rate, names=("wi_0", "wi_1", "wo")
            )
        else:
            mlp = MLP(
                dim=c.d_model, hidden_dim=c.d_ff, act=c.act, bias=False, dropout=c.dropout_rate, names=("wi", "wo")
            )
        return PreNormBlock(
            attn_norm=norm(),
            attn=attn(),
            mlp_norm=norm(),
            mlp=mlp,
            dropout=c.dropout_rate,
            cross_attn_norm=norm() if cross else None,
            cross_attn=attn() if cross else None,
        )

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @staticmethod
    def _additive(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """T5 adds the position bias to the scores, so masks become -inf-like additive terms on top of it."""
        if mask is None:
            return bias
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) token ids -> encoder states (B, S, C)."""
        S = input_ids.size(1)
        x = self.drop(self.shared(input_ids))  # (B, S, C)
        mask, _ = build_mask(q_len=S, k_len=S, padding_mask=attention_mask, causal=False, device=x.device)
        bias = self._additive(self.encoder_bias(S, S).to(x.dtype), mask)  # (B|1, H, S, S)
        for layer in self.encoder:
            x = self.run_layer(layer, x, mask=bias)
        return self.drop(self.encoder_norm(x))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_out: torch.Tensor,
        *,
        encoder_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache=None,
        cross_cache=None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) decoder ids over encoder states (B, S, C) -> logits (B, T, V).

        ``encoder_out`` may be None once ``cross_cache`` holds the encoder's keys and values. ``position_ids`` (B, T):
        each row's own query positions (rows of different lengths in a ``SlotKVCache``, whose
        ``decoder_attention_mask`` is then the whole (B, 1, T, K) mask); default: counting on from the cached length.
        """
        T = decoder_input_ids.size(1)
        past = cache[0].size if cache else 0
        x = self.drop(self.shared(decoder_input_ids))  # (B, T, C)
        mask, _ = build_mask(
            q_len=T, k_len=past + T, padding_mask=decoder_attention_mask, causal=True, materialize=True, device=x.device
        )
        if position_ids is None:
            bias = self.decoder_bias(T, past + T, offset=past)  # (1, H, T, K)
        else:
            bias = self.decoder_bias.at(position_ids, torch.arange(past + T, device=x.device))  # (B, H, T, K)
        self_bias = self._additive(bias.to(x.dtype), mask)  # (B|1, H, T, K)
        context_mask = None
        if encoder_mask is not None:  # (B, 1, 1, S) additive
            context_mask = torch.zeros(encoder_mask.shape, dtype=x.dtype, device=x.device)
            context_mask = context_mask.masked_fill(~encoder_mask.bool(), torch.finfo(x.dtype).min)[:, None, None]
        for i, layer in enumerate(self.decoder):
            x = self.run_layer(
                layer,
                x,
                mask=self_bias,
                cache=cache[i] if cache else None,
                context=encoder_out,
                context_mask=context_mask,
                cross_cache=cross_cache[i] if cross_cache else None,
            )
        x = self.drop(self.decoder_norm(x))
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x)

    def forward(
        self, input_ids, *, decoder_input_ids, attention_mask=None, decoder_attention_mask=None
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V)."""
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(
            decoder_input_ids, encoder_out, encoder_mask=attention_mask, decoder_attention_mask=decoder_attention_mask
        )

    def make_cross_cache(self, batch_size: int, source_len: int, **kw):
        """One cross-attention cache per decoder layer (``kw``: ``make_cache``'s, e.g. ``kind=SlotKVCache``)."""
        return self.make_cache(batch_size, source_len, attr="cross_attn", **kw)


def _stack(ours: str, hf: str, sub: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{ours}.{{i}}.{o}.*", f"{hf}.block.{{i}}.layer.{h}.*") for o, h in sub)


FAMILY = Family(
    model_types=("t5",),
    config_cls=T5Config,
    model_cls=T5,
    tied=("lm_head.weight", "shared.weight"),
    heads=("lm_head",),
    key_map=KeyMap(
        (
            ("shared.*", "shared.*"),
            (
                "encoder_bias.relative_attention_bias.*",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.*",
            ),
            *_stack(
                "encoder",
                "encoder",
                (
                    ("attn_norm", "0.layer_norm"),
                    ("attn", "0.SelfAttention"),
                    ("mlp_norm", "1.layer_norm"),
                    ("mlp", "1.DenseReluDense"),
                ),
            ),
            ("encoder_norm.*", "encoder.final_layer_norm.*"),
            (
                "decoder_bias.relative_attention_bias.*",
                "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.*",
            ),
            *_stack(
                "decoder",
                "decoder",
                (
                    ("attn_norm", "0.layer_norm"),
                    ("attn", "0.SelfAttention"),
                    ("cross_attn_norm", "1.layer_norm"),
                    ("cross_attn", "1.EncDecAttention"),
                    ("mlp_norm", "2.layer_norm"),
                    ("mlp", "2.DenseReluDense"),
                ),
            ),
            ("decoder_norm.*", "decoder.final_layer_norm.*"),
            ("lm_head.*", "lm_head.*"),
        )
    ),
    # Tied copies of `shared`, and a cross-attention bias some checkpoints carry but T5 never uses.
    ignored=(r"^(encoder|decoder)\.embed_tokens\.weight$", r"EncDecAttention\.relative_attention_bias\.weight$"),
)
