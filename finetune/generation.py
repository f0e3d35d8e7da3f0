"""Token generation with KV caches: greedy, temperature, top-k, top-p; batched prompts with left padding.

Works for decoder-only models (GPT-2, LLaMA) and encoder-decoders (T5), told apart by ``model.is_encoder_decoder``.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """``temperature == 0`` means greedy (argmax). ``top_k``/``top_p`` filter before sampling, as HF's warpers do."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, *, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Sets logits outside the top-k / nucleus to -inf. logits: (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Picks one token per row. logits: (B, V) -> (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _stop_ids(eos_token_id, stop_token_ids: Iterable[int] | None) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return ids + list(stop_token_ids or [])


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: Iterable[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generates up to ``max_new_tokens`` per prompt.

    input_ids, attention_mask: (B, T) prompts, left-padded when of unequal length (mask 0 on padding).
    eos_token_id defaults to the model config's; generation of a row stops at any of eos/stop tokens, and
    the row is then filled with ``pad_token_id`` (default: the config's, else the first stop id), like HF.
    ``streamer`` receives each step's new tokens, (B,).
    Returns (B, T + n) for decoders (prompt + new tokens), (B, 1 + n) for encoder-decoders (start + new).
    """
    cfg = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    mc = model.config
    stops = _stop_ids(mc.eos_token_id if eos_token_id is None else eos_token_id, stop_token_ids)
    if pad_token_id is None:
        pad_token_id = mc.pad_token_id if mc.pad_token_id is not None else (stops[0] if stops else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    stepper = (EncoderDecoderStepper if model.is_encoder_decoder else DecoderStepper)(
        model, input_ids, attention_mask, cfg.max_new_tokens
    )
    logits = stepper.start()  # (B, V)
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=logits.device)
    new = []
    for i in range(cfg.max_new_tokens):
        tok = torch.where(done, pad_token_id, next_token(logits, cfg, generator))  # (B,)
        new.append(tok)
        if streamer is not None:
            streamer(tok)
        done |= torch.isin(tok, stop_ids)
        if i == cfg.max_new_tokens - 1 or bool(done.all()):  # one host sync per token, for early stopping
            break
        logits = stepper.step(tok)
    return torch.cat([stepper.prefix, torch.stack(new, dim=1)], dim=1)


class DecoderStepper:
    """Runs the prompt once through a decoder-only model, then one token at a time against its KV caches."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        B, T = input_ids.shape
        self.model, self.prefix = model, input_ids
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.padded = not bool(mask.all())  # without padding the mask is implied, and SDPA runs its fast path
        self.mask = mask
        # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self.cache = model.make_cache(B, T + max_new_tokens)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.mask if self.padded else None
        return self.model(ids, attention_mask=mask, position_ids=positions, cache=self.cache)[:, -1]  # (B, V)

    def start(self) -> torch.Tensor:
        return self._run(self.prefix, self.positions)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions[:, -1:] + 1  # (B, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(tok)[:, None]], dim=1)
        return self._run(tok[:, None], self.positions)


class EncoderDecoderStepper:
    """Encodes the source once; the decoder keeps a self-attention cache and a cross-attention cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        B, S = input_ids.shape
        self.model, self.source_mask = model, attention_mask
        self.encoder_out = model.encode(input_ids, attention_mask)  # (B, S, C)
        start = model.config.decoder_start_token_id
        self.prefix = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
        self.cache = model.make_cache(B, 1 + max_new_tokens)
        self.cross_cache = model.make_cross_cache(B, S)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode(
            ids, self.encoder_out, encoder_mask=self.source_mask, cache=self.cache, cross_cache=self.cross_cache
        )
        return logits[:, -1]  # (B, V)

    def start(self) -> torch.Tensor:
        return self._run(self.prefix)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self._run(tok[:, None])
