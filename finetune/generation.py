"""Token generation with KV caches: greedy, temperature, top-k, top-p; batched prompts with left padding.

``generate`` works for decoder-only models (GPT-2, LLaMA) and encoder-decoders (T5), told apart by
``model.is_encoder_decoder``. For decoder-only models there is also ``speculative_generate`` (a small draft model
proposes, the target verifies a block of tokens per forward pass) and ``Session`` (a KV cache kept between calls,
for chat).

A prompt plus ``max_new_tokens`` must fit the model's context (its position table, or the length it was trained
at for RoPE models): a request that does not is refused with a ``ValueError``, never silently truncated.
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


def context_length(model) -> tuple[int, str] | None:
    """(positions a decoder-only model takes, the config field that says so); None for encoder-decoders, whose
    relative positions (T5) set no limit. Works for Hugging Face models too (their configs use the same names)."""
    if getattr(model, "is_encoder_decoder", False) or getattr(model.config, "is_encoder_decoder", False):
        return None
    for name in ("n_positions", "max_position_embeddings"):  # GPT-2's name, then everyone else's
        n = getattr(model.config, name, None)
        if n is not None:
            return n, name
    return None


def check_context(model, prompt_len: int, max_new_tokens: int, *, whose: str = "the model's") -> None:
    """Refuses a prompt that, with ``max_new_tokens`` more, does not fit the model's context (no silent clamping:
    a caller asking for 64 tokens and getting 10 would not know why)."""
    ctx = context_length(model)
    if ctx is None:
        return
    n, name = ctx
    if prompt_len >= n:
        raise ValueError(
            f"prompt is {prompt_len} tokens, at or over {whose} context of {n} ({name}), with max_new_tokens "
            f"{max_new_tokens} to come: shorten the prompt"
        )
    if prompt_len + max_new_tokens > n:
        raise ValueError(
            f"prompt is {prompt_len} tokens and max_new_tokens {max_new_tokens}, over {whose} context of {n} "
            f"({name}): shorten the prompt or lower max_new_tokens to {n - prompt_len}"
        )


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
    Raises ValueError when T + max_new_tokens is over a decoder's context (see ``check_context``).
    Returns (B, T + n) for decoders (prompt + new tokens), (B, 1 + n) for encoder-decoders (start + new).
    """
    cfg = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    check_context(model, input_ids.size(1), cfg.max_new_tokens)
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
    stop_ids = torch.tensor(stops, dtype=torch.long, device=logits.device) if stops else None
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    new = []
    for i in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, generator)  # (B,)
        if stop_ids is not None:  # without stop ids every row runs to max_new_tokens: nothing to track
            tok = torch.where(done, pad_token_id, tok)
            done |= torch.isin(tok, stop_ids)
        new.append(tok)
        if streamer is not None:
            streamer(tok)
        if i == cfg.max_new_tokens - 1 or (stop_ids is not None and bool(done.all())):  # one host sync per token
            break
        logits = stepper.step(tok)
    return torch.cat([stepper.prefix, torch.stack(new, dim=1)], dim=1)


class DecoderStepper:
    """Runs the prompt once through a decoder-only model, then one token at a time against its KV caches."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        B, T = input_ids.shape
        self.model, self.prefix = model, input_ids
        self.cache = model.make_cache(B, T + max_new_tokens)
        self.mask = self.positions = None  # no padding: both implied (positions count on from the cache length)
        if attention_mask is not None and not bool(attention_mask.all()):
            # The mask of the whole run, allocated once; step t reads its first T + t columns (no per-step cat).
            self.mask = attention_mask.new_ones(B, T + max_new_tokens, dtype=torch.long)
            self.mask[:, :T] = attention_mask
            # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
            self.positions = (self.mask[:, :T].cumsum(-1) - 1).clamp(min=0)  # (B, T)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        mask = None if self.mask is None else self.mask[:, : self.cache[0].size + ids.size(1)]
        logits = self.model(ids, attention_mask=mask, position_ids=self.positions, cache=self.cache, logits_to_keep=1)
        return logits[:, -1]  # (B, V)

    def start(self) -> torch.Tensor:
        return self._run(self.prefix)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            self.positions = self.positions[:, -1:] + 1  # (B, 1)
        return self._run(tok[:, None])


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


# ---------------------------------------------------------------------------------------- speculative decoding
@dataclass
class SpeculativeStats:
    """What a ``speculative_generate`` call did: draft tokens proposed and accepted, forward passes per model."""

    proposed: int = 0
    accepted: int = 0
    target_forward_passes: int = 0
    draft_forward_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


def _probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution ``next_token`` samples from: temperature, then top-k/top-p. (N, V) -> (N, V) float."""
    return filter_logits(logits.float() / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p).softmax(-1)


DRAFT_TOKENS = 4  # tokens a draft model proposes per step, unless told otherwise (generate --draft, serve --draft)


def propose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """A draft model's proposal from its logits (1, V): (token, q), q the draft's distribution (V,) it was sampled
    from, None when greedy (the argmax; nothing to compare in ``accept``)."""
    if cfg.temperature == 0:
        return int(logits[0].argmax()), None
    q = _probs(logits, cfg)[0]
    return int(torch.multinomial(q, 1, generator=generator)), q


def accept(drafts: list[int], q: list, logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """The target's verdict on k draft tokens, from its logits (k + 1, V) at the k drafts and the position after:
    (n, token), the first n drafts kept and the target's token after them.

    Greedy: a draft is kept while it is the target's argmax, and the token is the argmax after them. Sampling (q: the
    draft's distribution at each draft, from ``propose``): draft x is kept with probability min(1, p(x) / q(x)); at
    the first rejection the token is drawn from max(0, p - q) renormalized, and when all are kept, from p."""
    k = len(drafts)
    if cfg.temperature == 0:
        best = logits.argmax(-1).tolist()  # (k + 1,)
        n = next((i for i in range(k) if drafts[i] != best[i]), k)
        return n, best[n]
    p = _probs(logits, cfg)  # (k + 1, V)
    n = 0
    for i, x in enumerate(drafts):  # keep x with probability min(1, p(x) / q(x)), i.e. when u * q(x) < p(x)
        u = torch.rand((), device=logits.device, generator=generator)
        if not bool(u * q[i][x] < p[i, x]):
            break
        n += 1
    # Rejected at n: draw from the part of p the draft under-proposes; all kept: a bonus token from p.
    rest = (p[n] - q[n]).clamp(min=0) if n < k else p[n]
    if not bool(rest.sum() > 0):  # p == q up to rounding: the residual is empty, p itself is right
        rest = p[n]
    return n, int(torch.multinomial(rest, 1, generator=generator))


def _truncate(cache: list, size: int) -> None:
    for c in cache:
        c.truncate(size)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 64,
    num_draft_tokens: int = DRAFT_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: Iterable[int] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generates from ``target`` with a smaller ``draft`` model proposing tokens (Leviathan et al. 2023;
    Chen et al. 2023): the draft runs ``num_draft_tokens`` cheap steps, the target scores all of them in one forward
    pass, and the longest acceptable prefix is kept, plus one token from the target. Decoder-only models, one prompt.
    The first token is the target's, sampled after its prefill exactly as ``generate`` samples it (the same seed
    draws the same first token); speculation starts from the second. The serving engine runs the same steps, so a
    seeded request served alone with ``--draft`` gets these tokens.

    Greedy (``temperature == 0``): a draft token is kept when it is the target's argmax, so the output is the
    target's own greedy output (``generate(target, ...)``), token for token up to float ties between a block
    forward and single-token steps. Sampling: draft token x is kept with probability min(1, p(x) / q(x)) (p: the
    target's distribution, q: the draft's, both after the same temperature/top-k/top-p); on rejection a token is
    drawn from max(0, p - q), renormalized; when every draft is kept, a bonus token from p. The output then has
    exactly the target's sampling distribution. ``seed`` makes it reproducible.

    input_ids: (1, T). Both models keep a KV cache; rejected drafts are dropped from both (``KVCache.truncate``).
    ``streamer`` receives each token, (1,), once it is final. eos/stop tokens end generation as in ``generate``.
    Returns ((1, T + n) prompt + new tokens, SpeculativeStats).
    """
    cfg = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    for model, name in ((target, "target"), (draft, "draft")):
        if model.is_encoder_decoder:
            raise ValueError(f"speculative decoding is for decoder-only models; the {name} is an encoder-decoder")
    if input_ids.dim() != 2 or input_ids.size(0) != 1:
        shape = tuple(input_ids.shape)
        raise ValueError(f"speculative decoding takes one prompt: input_ids of shape (1, T), got {shape}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}): the draft must share the target's tokenizer"
        )
    T, n_max = input_ids.size(1), cfg.max_new_tokens
    check_context(target, T, n_max)
    check_context(draft, T, n_max, whose="the draft model's")
    eos = target.config.eos_token_id if eos_token_id is None else eos_token_id
    stops = {int(i) for i in _stop_ids(eos, stop_token_ids)}
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    # Both caches hold a prefix of `tokens`; each forward feeds what its cache lacks. The target never holds more
    # than T + n_max - 1 tokens (the last token is sampled, not fed), nor does the draft.
    target_cache, draft_cache = target.make_cache(1, T + n_max), draft.make_cache(1, T + n_max)
    tokens = input_ids[0].tolist()
    new: list[int] = []
    stats = SpeculativeStats()

    def run(model, cache, ids: list[int], keep: int) -> torch.Tensor:  # -> logits of the last `keep` ids, (keep, V)
        x = torch.tensor([ids], dtype=torch.long, device=device)
        return model(x, cache=cache, logits_to_keep=keep)[0]

    def take(tok: int) -> bool:  # appends a final token; True when generation is over
        tokens.append(tok)
        new.append(tok)
        if streamer is not None:
            streamer(torch.tensor([tok], device=device))
        return tok in stops or len(new) == n_max

    def result() -> tuple[torch.Tensor, SpeculativeStats]:
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=device)], dim=1), stats

    # 0. The first token is the target's own, sampled after its prefill as ``generate`` samples it (and as the
    #    serving engine does when it admits a request, so a seeded request draws the same numbers in both);
    #    speculation starts from the second. The draft reads the prompt too, to propose after that first token.
    first = next_token(run(target, target_cache, tokens, 1), cfg, generator)  # (1,)
    stats.target_forward_passes += 1
    if take(int(first)):
        return result()
    run(draft, draft_cache, tokens[:-1], 1)
    stats.draft_forward_passes += 1
    while True:
        # 1. The draft proposes k tokens, one forward each; no more than would fit in max_new_tokens with the
        #    target's token after them.
        k = min(num_draft_tokens, n_max - len(new) - 1)
        drafts, q = [], []  # q: the draft's distribution at each proposal (sampling only)
        for _ in range(k):
            logits = run(draft, draft_cache, (tokens + drafts)[draft_cache[0].size :], 1)  # (1, V)
            stats.draft_forward_passes += 1
            tok, dist = propose(logits, cfg, generator)
            drafts.append(tok)
            q.append(dist)
        # 2. The target scores the k drafts, and the position after them, in one forward.
        logits = run(target, target_cache, (tokens + drafts)[target_cache[0].size :], k + 1)  # (k + 1, V)
        stats.target_forward_passes += 1
        # 3. Keep the longest acceptable prefix of the drafts, then one token from the target.
        n, nxt = accept(drafts, q, logits, cfg, generator)
        stats.proposed += k
        stats.accepted += n
        # 4. Forget the rejected drafts: the target's cache holds all k, the draft's the first k - 1 (the last draft
        #    was sampled, not fed). What stays is `tokens` + the kept drafts; `nxt` is fed in the next round.
        _truncate(target_cache, len(tokens) + n)
        _truncate(draft_cache, min(draft_cache[0].size, len(tokens) + n))
        for tok in drafts[:n] + [nxt]:
            if take(tok):
                return result()


# ---------------------------------------------------------------------------------------------------- chat
class Session:
    """A decoder-only model's KV cache kept between calls, so a conversation is run through the model once.

    Each ``generate`` call feeds only the new tokens (a user turn) after everything before, then samples an answer.
    The answer's last token is fed lazily, at the start of the next call, so the cache plus that pending token
    always hold the whole conversation. Batch 1. ``max_len`` (default: the model's context) bounds the conversation.

        s = Session(model)
        a1 = s.generate(turn1_ids, max_new_tokens=64, stop_ids=[eos])
        a2 = s.generate(turn2_ids, max_new_tokens=64, stop_ids=[eos])  # = greedy on turn1 + a1 + turn2 from scratch
    """

    def __init__(self, model, *, max_len: int | None = None) -> None:
        if model.is_encoder_decoder:
            raise ValueError("a Session keeps a decoder-only model's KV cache; this model is an encoder-decoder")
        ctx = context_length(model)
        if max_len is None:
            if ctx is None:
                raise ValueError("the model's config names no context length: give max_len")
            max_len = ctx[0]
        elif ctx is not None and max_len > ctx[0]:
            raise ValueError(f"max_len {max_len} is over the model's context of {ctx[0]} ({ctx[1]})")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.model, self.max_len = model, max_len
        self.device = next(model.parameters()).device
        self.cache = model.make_cache(1, max_len)
        self.pending: list[int] = []  # the last answer's last token: part of the conversation, not yet in the cache

    def __len__(self) -> int:
        """Tokens of the conversation so far: those in the cache and the pending one."""
        return self.cache[0].size + len(self.pending)

    def reset(self) -> None:
        """Forgets the conversation (keeps the cache's memory)."""
        _truncate(self.cache, 0)
        self.pending = []

    @torch.inference_mode()
    def generate(
        self,
        new_ids,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        stop_ids: Iterable[int] = (),
        streamer: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Feeds ``new_ids`` (list[int] or a 1-D tensor) after the conversation so far, then samples until a token of
        ``stop_ids`` or ``max_new_tokens``. Returns the new tokens, the stop token included; ``streamer`` gets each
        as an int. Raises ValueError, before touching anything, when the conversation plus ``new_ids`` plus
        ``max_new_tokens`` is over ``max_len``; a call that fails midway (a raising streamer, Ctrl-C) is rolled back,
        so the session is as before the call either way."""
        cfg = SamplingConfig(max_new_tokens, temperature, top_k, top_p)
        if isinstance(new_ids, torch.Tensor):
            if new_ids.dim() != 1:
                raise ValueError(f"new_ids must be a list of ids or a 1-D tensor, got shape {tuple(new_ids.shape)}")
            new_ids = new_ids.tolist()
        new_ids = [int(i) for i in new_ids]
        if not new_ids and not len(self):
            raise ValueError("the session is empty: give new_ids to start the conversation")
        total = len(self) + len(new_ids) + cfg.max_new_tokens
        if total > self.max_len:
            raise ValueError(
                f"the conversation is {len(self)} tokens, with {len(new_ids)} new and max_new_tokens "
                f"{cfg.max_new_tokens} it would be {total}, over the session's max_len of {self.max_len}: reset the "
                f"session or lower max_new_tokens"
            )
        size, pending, stops = self.cache[0].size, self.pending, {int(i) for i in stop_ids}
        out: list[int] = []
        try:
            feed = pending + new_ids
            for _ in range(cfg.max_new_tokens):
                x = torch.tensor([feed], dtype=torch.long, device=self.device)
                logits = self.model(x, cache=self.cache, logits_to_keep=1)[:, -1]  # (1, V)
                tok = int(next_token(logits, cfg, generator))
                out.append(tok)
                if streamer is not None:
                    streamer(tok)
                if tok in stops:
                    break
                feed = [tok]
        except BaseException:
            _truncate(self.cache, size)
            self.pending = pending
            raise
        self.pending = out[-1:]
        return out
