"""BERT: token + position + token-type embeddings, post-norm encoder, pooler, and the MLM or classification head."""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from finetune.models.base import Backbone, HFConfigMixin
from finetune.models.family import Family
from finetune.models.keymap import KeyMap
from finetune.nn import MLP, Attention, AttentionNames, Dropout, LayerNorm, PostNormBlock, activation, build_mask

HEADS = {None: "BertModel", "mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification"}


@dataclass
class BertConfig(HFConfigMixin):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    head: str | None = None  # None (encoder + pooler), "mlm" or "classification"
    add_pooler: bool | None = None  # None: yes unless head == "mlm", as in HF
    id2label: dict | None = None  # classification labels; their count is the head's width
    tie_word_embeddings: bool = True  # the MLM decoder shares the word embeddings
    model_type = "bert"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"BERT head must be one of {list(HEADS)}, got {self.head!r}")
        if self.add_pooler is None:
            self.add_pooler = self.head != "mlm"
        if self.head == "classification" and not self.id2label:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        if self.id2label:
            self.id2label = {int(k): v for k, v in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label or {})

    @property
    def architecture(self) -> str:
        return HEADS[self.head]

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position_embedding_type {d['position_embedding_type']!r} is not supported")
        arch = (d.get("architectures") or ["BertModel"])[0]
        head = {
            "BertForMaskedLM": "mlm",
            "BertForPreTraining": "mlm",
            "BertForSequenceClassification": "classification",
        }
        config = cls.from_dict({"head": head.get(arch), **d})
        if arch == "BertForPreTraining":
            config.add_pooler = True
        return config

    def to_hf(self) -> dict:
        d = self.to_dict()
        del d["head"], d["add_pooler"]
        if not d["id2label"]:
            del d["id2label"]
        return d


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, C)
    pooler_output: torch.Tensor | None  # (B, C)
    logits: torch.Tensor | None  # (B, T, vocab) for MLM, (B, num_labels) for classification


class MLMHead(nn.Module):
    """dense -> act -> LayerNorm -> decoder (tied to the word embeddings, with its own bias)."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.act = activation(c.hidden_act)
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        return self.decoder(self.norm(self.act(self.dense(x))))


class Bert(Backbone):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            PostNormBlock(
                attn=Attention(
                    dim=c.hidden_size,
                    n_heads=c.num_attention_heads,
                    qkv_bias=True,
                    o_bias=True,
                    dropout=c.attention_probs_dropout_prob,
                    names=AttentionNames(q="query", k="key", v="value", o="dense"),
                ),
                attn_norm=LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
                mlp=MLP(
                    dim=c.hidden_size,
                    hidden_dim=c.intermediate_size,
                    act=c.hidden_act,
                    bias=True,
                    names=("intermediate", "output"),
                ),
                mlp_norm=LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
                dropout=c.hidden_dropout_prob,
            )
            for _ in range(c.num_hidden_layers)
        )
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if c.add_pooler else None
        self.mlm_head = MLMHead(c) if c.head == "mlm" else None
        if c.head == "classification":
            if not c.add_pooler:
                raise ValueError("BERT sequence classification reads the pooled output: add_pooler must be true")
            p = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
            self.classifier_dropout = Dropout(p)
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        self.init_weights()

    def tie_weights(self) -> None:
        if self.mlm_head is not None and self.config.tie_word_embeddings:
            self.mlm_head.decoder.weight = self.word_embeddings.weight

    def forward(self, input_ids, *, attention_mask=None, token_type_ids=None, position_ids=None) -> BertOutput:
        """input_ids, attention_mask (1 = token), token_type_ids, position_ids: (B, T)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.drop(self.embed_norm(x + self.position_embeddings(position_ids)))  # (B, T, C)
        mask, _ = build_mask(q_len=T, k_len=T, padding_mask=attention_mask, causal=False, device=input_ids.device)
        for layer in self.layers:
            x = self.run_layer(layer, x, mask=mask)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, C)
        logits = None
        if self.mlm_head is not None:
            logits = self.mlm_head(x)  # (B, T, V)
        elif self.config.head == "classification":
            logits = self.classifier(self.classifier_dropout(pooled))  # (B, num_labels)
        return BertOutput(x, pooled, logits)


FAMILY = Family(
    model_types=("bert",),
    config_cls=BertConfig,
    model_cls=Bert,
    hf_prefix="bert.",
    tied=("mlm_head.decoder.weight", "word_embeddings.weight"),
    heads=("pooler", "mlm_head", "classifier"),
    key_map=KeyMap(
        (
            ("word_embeddings.*", "bert.embeddings.word_embeddings.*"),
            ("position_embeddings.*", "bert.embeddings.position_embeddings.*"),
            ("token_type_embeddings.*", "bert.embeddings.token_type_embeddings.*"),
            ("embed_norm.*", "bert.embeddings.LayerNorm.*"),
            ("layers.{i}.attn.dense.*", "bert.encoder.layer.{i}.attention.output.dense.*"),
            ("layers.{i}.attn.*", "bert.encoder.layer.{i}.attention.self.*"),
            ("layers.{i}.attn_norm.*", "bert.encoder.layer.{i}.attention.output.LayerNorm.*"),
            ("layers.{i}.mlp.intermediate.*", "bert.encoder.layer.{i}.intermediate.dense.*"),
            ("layers.{i}.mlp.output.*", "bert.encoder.layer.{i}.output.dense.*"),
            ("layers.{i}.mlp_norm.*", "bert.encoder.layer.{i}.output.LayerNorm.*"),
            ("pooler.*", "bert.pooler.dense.*"),
            ("mlm_head.dense.*", "cls.predictions.transform.dense.*"),
            ("mlm_head.norm.*", "cls.predictions.transform.LayerNorm.*"),
            ("mlm_head.decoder.*", "cls.predictions.decoder.*"),
            ("classifier.*", "classifier.*"),
        )
    ),
    # HF's MLM head holds its output bias twice, tied: `predictions.bias` is the one older checkpoints carry.
    aliases={"cls.predictions.bias": "cls.predictions.decoder.bias"},
    # A buffer; the next-sentence head of BertForPreTraining, unused here.
    ignored=(r"position_ids$", r"^cls\.seq_relationship\."),
)
