"""Continuous batching: requests join and leave the running batch between decode steps.

Each running request owns one row of a ``SlotKVCache`` (its own length and positions) and its own sampling
parameters and seeded generator. A new request is prefilled (alone exactly as ``generate`` runs a prompt; with the
others admitted in the same step, as one right-padded batch), its keys and values copied into a free row, and from
the next step on it decodes with the others. The ``Scheduler`` only decides (who waits, who runs, who leaves); the
``Runner`` only runs the model; the ``Engine`` owns both, and its steps run on an ``EngineThread`` (one for every
engine of a process).
An encoder-decoder (T5) has an ``EncoderDecoderRunner`` of the same surface (``make_runner`` picks it): each source
is encoded once, alone, when its request is admitted, and the decoders of all rows step together.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from finetune.generation import (
    DRAFT_TOKENS,
    SamplingConfig,
    accept,
    check_context,
    context_length,
    next_token,
    propose,
)
from finetune.nn import SlotKVCache
from finetune.serving.text import TextOut


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass(eq=False)
class Request:
    """One generation. ``emit`` receives its events, from the engine thread: ``{"text": delta}`` as text becomes
    final, then ``{"finish_reason": "stop"|"length", "prompt_tokens": n, "completion_tokens": m}``, or
    ``{"error": message}``. Setting ``cancelled`` (a client that left) frees its row at the next step."""

    ids: list[int]
    sampling: SamplingConfig
    stop_ids: list[int]
    text: TextOut
    emit: Callable[[dict], None]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    last: float | None = None  # when its latest token came

    finish_reason: str | None = None
    generator: torch.Generator | None = None


class Scheduler:
    """Who waits and who runs. ``running[i]`` is the request in row i of the runner's cache; a finished row is
    replaced by the last one (as ``SlotKVCache.drop`` moves it), so the two stay aligned."""

    def __init__(self, *, max_batch: int, max_queue: int) -> None:
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def submit(self, request: Request) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """The waiting requests to start now, first come first served, as many as there are free rows."""
        out = []
        while self.waiting and len(self.running) + len(out) < self.max_batch:
            r = self.waiting.popleft()
            if not r.cancelled:
                out.append(r)
        return out

    def remove(self, i: int) -> Request:
        r, last = self.running[i], self.running.pop()
        if i < len(self.running):
            self.running[i] = last
        return r


# An encoder-decoder's relative positions (T5) set no limit, so the server sets one on the source it encodes and the
# tokens it decodes (both size the caches); 512 is the input length T5 was pretrained at.
ENCODER_DECODER_LIMIT = 512


def make_runner(model, *, max_batch: int, headroom: int = 0, max_source: int = ENCODER_DECODER_LIMIT,
                max_new: int = ENCODER_DECODER_LIMIT) -> "Runner":  # fmt: skip
    """The runner for ``model``: an ``EncoderDecoderRunner`` (``max_source``/``max_new`` bound its requests) for an
    encoder-decoder, else a ``Runner`` (its context bounds them)."""
    if model.is_encoder_decoder:
        return EncoderDecoderRunner(model, max_batch=max_batch, max_source=max_source, max_new=max_new)
    return Runner(model, max_batch=max_batch, headroom=headroom)


def prefill_groups(requests: list[Request], *, waste: float = 2.0) -> list[list[Request]]:
    """Requests in groups prefilled together, longest prompts first: a group grows while its right-padded size (rows
    times its longest prompt) stays within ``waste`` times its real tokens, so padding at most doubles the work."""
    groups: list[list[Request]] = []
    for r in sorted(requests, key=lambda r: -len(r.ids)):
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * len(g[0].ids) <= waste * (sum(len(x.ids) for x in g) + len(r.ids)):
            g.append(r)
        else:
            groups.append([r])
    return groups


class Runner:
    """Runs a decoder-only model: new prompts (``prefill``), then tokens appended to every row (``forward``).

    ``headroom``: positions past the context a row may be fed, as padding whose outputs nobody reads (a speculative
    block is as long for every row, also for a row with fewer tokens left); they get the last position id, and the
    row is rewound past them."""

    def __init__(self, model, *, max_batch: int, headroom: int = 0) -> None:
        ctx = context_length(model)
        if ctx is None:
            raise ValueError("Runner runs decoder-only models; an encoder-decoder's is an EncoderDecoderRunner "
                             "(make_runner)")  # fmt: skip
        self.model, self.device, self.context = model, next(model.parameters()).device, ctx[0]
        self.window = getattr(model.config, "sliding_window", None)
        self.cache = model.make_cache(max_batch, ctx[0] + headroom, kind=SlotKVCache)

    def check(self, prompt_len: int, max_new_tokens: int, *, whose: str = "the model's") -> None:
        """Raises ValueError, naming both numbers, for a request that does not fit (see ``check_context``)."""
        check_context(self.model, prompt_len, max_new_tokens, whose=whose)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Runs prompts into new rows (the last ones, in order). Returns each one's last logits, (n, V).

        One prompt runs on its own, exactly as ``generate`` runs it. Several run as one batch, right-padded to the
        longest: causal attention keeps a real token from seeing the padding after it, so each row's keys, values
        and logits are its own (up to the batched matmuls' rounding), at one forward's cost instead of n."""
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        batch = self.model.make_cache(len(prompts), T)
        x = torch.tensor([p + p[-1:] * (T - len(p)) for p in prompts], dtype=torch.long, device=self.device)  # (n, T)
        h = self.model(x, cache=batch, head=False)  # (n, T, C)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(h[torch.arange(len(prompts), device=self.device), last])  # (n, V)
        for slots, c in zip(self.cache, batch, strict=True):
            k, v = c.get()  # (n, H_kv, T, D)
            for b, n in enumerate(lengths):
                slots.put(k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        return logits

    @torch.inference_mode()
    def forward(self, ids: list[list[int]], keep: int = 1) -> torch.Tensor:
        """Appends ids[b] (T tokens, the same T for every row) to row b at its own positions. Returns the logits of
        each row's last ``keep`` tokens, (rows, keep, V). Rows of one length (always so for one row) run exactly as a
        ``generate`` step: no mask, no position ids."""
        first = self.cache[0]
        x = torch.tensor(ids, dtype=torch.long, device=self.device)  # (rows, T)
        T = x.size(1)
        mask = first.mask(T, self.device, window=self.window)  # (rows, 1, T, size + T) or None
        positions = first.positions(T, self.device)  # (rows, T) or None
        if first.size + T > self.context:  # padding past a row's end: any valid position (its outputs go unread)
            if positions is None:
                positions = torch.arange(first.size, first.size + T, device=self.device)[None]  # (1, T)
            positions = positions.clamp(max=self.context - 1)
        return self.model(x, attention_mask=mask, position_ids=positions, cache=self.cache, logits_to_keep=keep)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Appends one token to each row (row i gets tokens[i]). Returns (rows, V) logits."""
        return self.forward([[t] for t in tokens])[:, -1]

    def rewind(self, lengths: list[int]) -> None:
        """Row b keeps its first ``lengths[b]`` positions."""
        for c in self.cache:
            c.rewind(lengths)

    @property
    def lengths(self) -> list[int]:
        return self.cache[0].lengths

    def _slots(self) -> list[SlotKVCache]:
        """Every slot cache a row lives in."""
        return self.cache

    def drop(self, row: int) -> None:
        for c in self._slots():
            c.drop(row)

    def reset(self) -> None:
        """Frees every row."""
        for c in self._slots():
            c.reset()


class EncoderDecoderRunner(Runner):
    """Runs an encoder-decoder (T5), with the ``Runner``'s surface. A request's source is encoded once, alone, at
    ``prefill`` (as ``generate`` runs one prompt), which also decodes the start token; its cross-attention keys and
    values go into a row of per-layer slot caches (rows of different source lengths are padded to the longest in
    use and hidden by a key-padding mask), its decoder self-attention into a row of ``self.cache``, and each step
    then decodes every row, with the relative position bias of each row's own positions. Rows of one source length
    and one decoder length (always so for one row) step exactly as ``EncoderDecoderStepper``: no mask, no positions.

    ``max_source``: the longest source a request may have; ``max_new``: the most tokens it may ask for. Both size
    the caches (at most), so memory is bounded; ``check`` refuses requests over them."""

    def __init__(self, model, *, max_batch: int, max_source: int = ENCODER_DECODER_LIMIT,
                 max_new: int = ENCODER_DECODER_LIMIT) -> None:  # fmt: skip
        if not model.is_encoder_decoder:
            raise ValueError("EncoderDecoderRunner runs encoder-decoders; a decoder-only model's is a Runner")
        for name, value in (("max_source", max_source), ("max_new", max_new)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model, self.device = model, next(model.parameters()).device
        self.max_source, self.max_new = max_source, max_new
        self.start = model.config.decoder_start_token_id
        self.cache = model.make_cache(max_batch, 1 + max_new, kind=SlotKVCache)  # the start token, then tokens
        self.cross = model.make_cross_cache(max_batch, max_source, kind=SlotKVCache)

    def check(self, prompt_len: int, max_new_tokens: int, *, whose: str = "the model's") -> None:
        """Raises ValueError, naming both numbers, for a source or a max_new_tokens over this runner's bounds."""
        if prompt_len > self.max_source:
            raise ValueError(f"prompt is {prompt_len} tokens, over the {self.max_source} this server encodes for "
                             f"{whose} encoder (--max-source-tokens): shorten the prompt")  # fmt: skip
        if max_new_tokens > self.max_new:
            raise ValueError(f"max_new_tokens {max_new_tokens} is over the {self.max_new} tokens this server decodes "
                             f"for an encoder-decoder (--max-tokens-limit)")  # fmt: skip

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Encodes each source alone and decodes the start token over it (as ``generate`` does), into new rows (the
        last ones, in order). Returns the logits of each one's first token, (n, V)."""
        return torch.cat([self._prefill(ids) for ids in prompts])

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, S)
        single, cross = self.model.make_cache(1, 1 + self.max_new), self.model.make_cross_cache(1, len(ids))
        start = torch.full((1, 1), self.start, dtype=torch.long, device=self.device)
        logits = self.model.decode(start, self.model.encode(x), cache=single, cross_cache=cross)[:, -1]  # (1, V)
        for slots, c in zip([*self.cache, *self.cross], [*single, *cross], strict=True):
            slots.put(*c.get())
        return logits

    @torch.inference_mode()
    def forward(self, ids: list[list[int]], keep: int = 1) -> torch.Tensor:
        """Appends ids[b] (T tokens, the same T for every row) to row b's decoder. Returns the logits of each row's
        last ``keep`` tokens, (rows, keep, V)."""
        first = self.cache[0]
        x = torch.tensor(ids, dtype=torch.long, device=self.device)  # (rows, T)
        T = x.size(1)
        logits = self.model.decode(
            x,
            None,  # the cross caches hold the encoder's keys and values
            encoder_mask=self.cross[0].key_mask(self.device),  # (rows, S) or None
            decoder_attention_mask=first.mask(T, self.device),  # (rows, 1, T, size + T) or None
            position_ids=first.positions(T, self.device),  # (rows, T) or None
            cache=self.cache,
            cross_cache=self.cross,
        )  # (rows, T, V)
        return logits[:, -keep:]

    def _slots(self) -> list[SlotKVCache]:
        return [*self.cache, *self.cross]


class EngineThread:
    """The thread that runs engines' steps: each engine with work takes one step in turn, so that every engine of a
    process (the model and each ``--adapter``) runs its model on one thread.

    Torch work on two live threads leaves two OpenMP pools, and libgomp then throttles its workers' spinning (they
    outnumber the cores), so every small op of a step pays a futex wake-up: two engines on threads of their own
    decoded 3.4x slower each on 2 cores once both had run (3.6 against 1.07 ms a token, measured). The thread starts
    with its first engine and ends with its last."""

    def __init__(self) -> None:
        self.wake = threading.Condition()  # shared with its engines: one lock for every queue it watches
        self.engines: list[Engine] = []
        self._thread: threading.Thread | None = None

    def add(self, engine: "Engine") -> None:
        with self.wake:
            self.engines.append(engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="finetune-engine", daemon=True)
                self._thread.start()
            self.wake.notify_all()

    def remove(self, engine: "Engine", timeout: float | None = None) -> None:
        """Waits (up to ``timeout``) until the thread no longer steps ``engine``, whose ``stop`` flag is set; the
        thread ends with the last engine."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        with self.wake:
            self.wake.notify_all()
            while engine in self.engines and self._thread is not None and left() != 0.0:
                self.wake.wait(left())
            thread = self._thread if not self.engines else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(left())

    def _loop(self) -> None:
        with torch.inference_mode():  # the cache's tensors are inference tensors: every write happens in this mode
            while True:
                with self.wake:
                    while True:
                        kept = [e for e in self.engines if not e._stop]
                        if len(kept) != len(self.engines):
                            self.engines = kept
                            self.wake.notify_all()  # a stop() waits for its engine to leave
                        if not self.engines:
                            self._thread = None
                            return
                        ready = [e for e in self.engines if e.scheduler.running or e.scheduler.waiting]
                        if ready:
                            break
                        self.wake.wait()
                for engine in ready:
                    engine._turn()


class Engine:
    """Admits, prefills, decodes, and hands each request its text; its steps run on an ``EngineThread`` (its own,
    or one that several engines share: ``thread``).

    With a ``draft`` model (same vocabulary; ``finetune.inference.check_draft``) every step is a speculative one, as
    ``generation.speculative_generate`` does for one prompt, for all rows at once: the draft, in KV slots of its own,
    proposes up to ``draft_tokens`` tokens for each row (row by row its own count: what its ``max_new_tokens``
    leaves), the target scores every row's block in one forward, each row keeps what ``generation.accept`` keeps, and
    both caches rewind each row to its own length."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        metrics=None,
        draft=None,
        draft_tokens=DRAFT_TOKENS,
        max_source_tokens: int = ENCODER_DECODER_LIMIT,
        max_new_tokens: int = ENCODER_DECODER_LIMIT,
        thread: EngineThread | None = None,
    ) -> None:
        """``max_source_tokens``, ``max_new_tokens``: an encoder-decoder's bounds (``EncoderDecoderRunner``); a
        decoder-only model's context bounds its requests. ``thread``: the ``EngineThread`` to step on (default: one
        of its own)."""
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        if draft is not None and (model.is_encoder_decoder or draft.is_encoder_decoder):
            raise ValueError("--draft: speculative decoding is for decoder-only models; an encoder-decoder (T5) is "
                             "served without a draft")  # fmt: skip
        headroom = draft_tokens if draft is not None else 0
        self.scheduler = Scheduler(max_batch=max_batch, max_queue=max_queue)
        self.runner = make_runner(model, max_batch=max_batch, headroom=headroom, max_source=max_source_tokens,
                                  max_new=max_new_tokens)  # fmt: skip
        self.draft = None if draft is None else Runner(draft, max_batch=max_batch, headroom=headroom)
        self.draft_tokens = draft_tokens
        self.metrics = metrics
        self.thread = thread or EngineThread()
        self._wake = self.thread.wake
        self._stop = False

    # ---------------------------------------------------------------------------------- front end side
    def start(self) -> "Engine":
        self.thread.add(self)
        return self

    def submit(self, request: Request) -> None:
        """Queues a request (raises ``QueueFull``); thread-safe."""
        with self._wake:
            self.scheduler.submit(request)
            self._gauges()
            self._wake.notify_all()  # all: the condition is the thread's, which stop() calls may wait on too

    def cancel(self, request: Request) -> None:
        with self._wake:
            request.cancelled = True
            self._wake.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Stops taking steps (what runs or waits is dropped); returns once the thread has left this engine."""
        with self._wake:
            self._stop = True
        self.thread.remove(self, timeout)

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raises ValueError, naming the numbers, for a request the model (or the draft) cannot take."""
        self.runner.check(prompt_len, max_new_tokens)
        if self.draft is not None:
            self.draft.check(prompt_len, max_new_tokens, whose="the draft model's")

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    # ---------------------------------------------------------------------------------- engine thread
    def _turn(self) -> None:
        """One step, on the ``EngineThread``: admits what may start, then ``step``."""
        with self._wake:
            if self._stop:
                return
            admitted = self.scheduler.admit()
            self._gauges()
        try:
            self.step(admitted)
        except Exception as e:  # a failing step fails its requests, not the server
            with self._wake:
                for i in reversed(range(len(self.scheduler.running))):
                    self.scheduler.remove(i).emit({"error": f"generation failed: {type(e).__name__}: {e}"})
                for runner in (self.runner, self.draft):
                    if runner is not None:
                        runner.reset()
                for r in admitted:
                    if r.finish_reason is None and r not in self.scheduler.running:
                        r.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
                self._gauges()

    def step(self, admitted: list[Request]) -> None:
        """Decodes one token for every running request, then prefills the admitted ones (their first token); drops
        the rows that finished or were cancelled."""
        sched = self.scheduler
        self._drop_finished()
        if sched.running and self.draft is not None:
            self._speculate()
        elif sched.running:
            logits = self.runner.decode([r.generated[-1] for r in sched.running])  # (rows, V)
            argmax = logits.argmax(-1).tolist()  # every greedy row's token, in one host sync
            for i, r in enumerate(sched.running):
                self._sample(r, logits[i : i + 1], argmax[i])
        for group in prefill_groups(admitted):
            prompts = [r.ids for r in group]
            logits = self.runner.prefill(prompts)  # (len(group), V)
            if self.draft is not None:
                self.draft.prefill(prompts)
            with self._wake:
                sched.running.extend(group)
            for i, r in enumerate(group):
                if r.sampling.seed is not None:  # as ``generate`` seeds its own generator, on the model's device
                    r.generator = torch.Generator(device=self.runner.device).manual_seed(r.sampling.seed)
                self._sample(r, logits[i : i + 1])
        self._drop_finished()

    def _drop_finished(self) -> None:
        if not any(r.cancelled or r.finish_reason is not None for r in self.scheduler.running):
            return  # the common step: nothing to lock, drop or count
        with self._wake:
            for i in reversed(range(len(self.scheduler.running))):  # descending: a moved row was already checked
                r = self.scheduler.running[i]
                if r.cancelled or r.finish_reason is not None:
                    self.scheduler.remove(i)
                    self.runner.drop(i)
                    if self.draft is not None:
                        self.draft.drop(i)
            self._gauges()

    def _speculate(self) -> None:
        """One speculative step for every running row (see the class docstring). Row b's context is its prompt and
        tokens; the target holds all of it but the last token, the draft all but the last one or two."""
        rows = self.scheduler.running
        ks = [min(self.draft_tokens, r.sampling.max_new_tokens - len(r.generated) - 1) for r in rows]
        k = max(ks)  # the block every row is fed; a row past its own ks[b] is fed padding (its argmax), unread
        lengths = [len(r.ids) + len(r.generated) for r in rows]
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list] = [[] for _ in rows]
        block = [[r.generated[-1]] for r in rows]  # what the target is fed: the last token, then the drafts
        if k:
            # Every row feeds the draft the same number of tokens: one that lacks one re-feeds its last.
            lag = max(n - d for n, d in zip(lengths, self.draft.lengths, strict=True))
            self.draft.rewind([n - lag for n in lengths])
            feed = [(r.ids[-lag:] + r.generated)[-lag:] for r in rows]
            for j in range(k):
                logits = self.draft.forward(feed)[:, -1]  # (rows, V)
                argmax = logits.argmax(-1).tolist()
                for b, r in enumerate(rows):
                    tok, q = argmax[b], None  # greedy rows' proposal (and every row's padding)
                    if j < ks[b]:
                        if r.sampling.temperature:
                            tok, q = propose(logits[b : b + 1], r.sampling, r.generator)
                        drafts[b].append(tok)
                        qs[b].append(q)
                    block[b].append(tok)
                feed = [blk[-1:] for blk in block]
        logits = self.runner.forward(block, keep=k + 1)  # (rows, k + 1, V)
        kept = []
        for b, r in enumerate(rows):
            n, nxt = accept(drafts[b], qs[b], logits[b, : ks[b] + 1], r.sampling, r.generator)
            if self.metrics is not None:
                self.metrics.drafted(ks[b], n)
            kept.append(n)
            for tok in [*drafts[b][:n], nxt]:
                self._take(r, tok)
                if r.finish_reason is not None or r.cancelled:
                    break
        self.runner.rewind([n + m for n, m in zip(lengths, kept, strict=True)])
        self.draft.rewind([min(d, n + m) for d, n, m in zip(self.draft.lengths, lengths, kept, strict=True)])

    def _sample(self, r: Request, logits: torch.Tensor, argmax: int | None = None) -> None:
        """The request's next token from (1, V) logits (``argmax``: their argmax, when known)."""
        if r.cancelled:
            return
        greedy = r.sampling.temperature == 0 and argmax is not None
        self._take(r, argmax if greedy else int(next_token(logits, r.sampling, r.generator)))

    def _take(self, r: Request, tok: int) -> None:
        """Appends a token to the request: its text, and its end when it has come (nothing, once cancelled)."""
        if r.cancelled:
            return
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token(r, now)
        r.last = now
        r.generated.append(tok)
        reason = None
        if tok in r.stop_ids:
            reason, delta = "stop", r.text.end()  # what was held back (a stop string's beginning, a half character)
        else:
            delta = r.text.push(tok)
            if r.text.stopped:
                reason = "stop"
            elif len(r.generated) >= r.sampling.max_new_tokens:
                reason = "length"
                delta += r.text.end()
        if delta:
            r.emit({"text": delta})
        if reason is not None:
            r.finish_reason = reason
            # what the model read: a text-format run's prompt counts the BOS it starts with (Loaded.encode)
            usage = {"prompt_tokens": len(r.ids), "completion_tokens": len(r.generated)}
            if self.metrics is not None:
                self.metrics.finished(r, now)
            r.emit({"finish_reason": reason, **usage})

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.counts(*self.counts)
