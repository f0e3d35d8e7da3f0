"""What every from-scratch model shares: weight init, KV caches, gradient checkpointing, tying."""

import math
from dataclasses import asdict, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.nn import Attention, KVCache


class HFConfigMixin:
    """Config dataclasses use Hugging Face's field names, so conversion is mostly picking fields."""

    @classmethod
    def from_dict(cls, d: dict):
        """Builds the config from the keys that are fields; other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, d: dict):
        """From a Hugging Face ``config.json`` dict; families with renamed or derived fields override this."""
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf(self) -> dict:
        """The fields of the Hugging Face config this one maps to."""
        return self.to_dict()


class Backbone(nn.Module):
    """Base class of the from-scratch models.

    Subclasses set ``self.layers`` (an ``nn.ModuleList`` of blocks) and call ``self.init_weights()`` last.
    """

    config: HFConfigMixin
    is_encoder_decoder = False
    init_std = 0.02
    # Projections that write into the residual stream, initialized with std init_std / sqrt(2 * layers) (GPT-2),
    # so the stream's variance does not grow with depth.
    scaled_residual_init: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def hf_name(self, name: str) -> str | None:
        """The Hugging Face name of one of our parameter (or ``module.suffix``) names, by the family's key map."""
        from finetune.models.hub import _family_of_model

        return _family_of_model(self).key_map.to_hf(name)

    def hf_layout(self) -> list[tuple[str, str, bool]]:
        """(our name, HF key, transposed) of each tensor of the HF checkpoint; see ``hub.hf_layout``."""
        from finetune.models.hub import hf_layout

        return hf_layout(self)

    # ------------------------------------------------------------------------------------------ init
    def init_weights(self, module: nn.Module | None = None) -> None:
        """GPT/BERT-style init: N(0, init_std) matrices and embeddings, zero biases, unit norms."""
        layers = getattr(self, "layers", ())
        for name, m in (module or self).named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scaled = name.rpartition(".")[2] in self.scaled_residual_init and len(layers)
                nn.init.normal_(m.weight, std=self.init_std / (math.sqrt(2 * len(layers)) if scaled else 1))
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if hasattr(m, "weight") and not isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.tie_weights()

    def reset_buffers(self) -> None:
        """Recomputes derived buffers (rotary frequencies, ...) after ``to_empty``; see ``from_hf``."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_buffers"):
                m.reset_buffers()

    def tie_weights(self) -> None:
        """Shares the output projection with the input embedding where the config says so."""

    # --------------------------------------------------------------------------------------- running
    def run_layer(self, layer: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Runs one block, through activation checkpointing when it is on and we are training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, use_reentrant=False, **kwargs)
        return layer(x, **kwargs)

    def make_cache(
        self, batch_size: int, max_len: int, *, layers=None, attr: str = "attn", kind: type[KVCache] = KVCache
    ) -> list[KVCache]:
        """One KV cache per layer (``self.layers`` by default), holding up to ``max_len`` positions. Nothing is
        allocated here: each cache grows with what is written to it, in the activations' dtype and device.
        ``kind=SlotKVCache``: rows that are separate sequences of their own lengths (the serving engine's)."""
        caches = []
        for layer in self.layers if layers is None else layers:
            attn: Attention = getattr(layer, attr)
            caches.append(
                kind(batch_size=batch_size, max_len=max_len, n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim)
            )
        return caches


class DecoderLM(Backbone):
    """A decoder-only language model: ``features`` (B, T) -> (B, T, C), then ``lm_head`` -> (B, T, V).

    Subclasses name their input embedding in ``embedding``; the head shares it when the config ties them.
    """

    embedding: str

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = getattr(self, self.embedding).weight

    @staticmethod
    def positions(input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache) -> tuple[torch.Tensor, int]:
        """Position ids (default: counting on from the cached length) and that cached length."""
        past = cache[0].size if cache else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.size(1), device=input_ids.device)[None]  # (1, T)
        return position_ids, past

    def features(
        self, input_ids, *, attention_mask=None, position_ids=None, segment_ids=None, cache=None
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids,
        *,
        attention_mask=None,
        position_ids=None,
        segment_ids=None,
        cache=None,
        logits_to_keep=0,
        head: bool = True,
    ) -> torch.Tensor:
        """input_ids: (B, T); attention_mask: (B, T_past + T), 1 = token; segment_ids: (B, T) packed-sample numbers
        (0 = padding), with ``position_ids`` restarting in each sample; cache: from ``make_cache``.
        ``logits_to_keep`` > 0 projects only the last that many positions (generation needs only the last one: a
        long prompt's (T, vocab_size) logits are skipped). Returns logits (B, T or logits_to_keep, vocab_size).
        ``head=False`` returns the final hidden states (B, T, C) instead, for a loss that applies ``lm_head`` itself
        (``nn.loss``); through ``forward``, so that hooks on the model (FSDP's weight gathering) still run."""
        h = self.features(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, segment_ids=segment_ids, cache=cache
        )
        if not head:
            return h
        return self.lm_head(h[:, -logits_to_keep:] if 0 < logits_to_keep < h.size(1) else h)
