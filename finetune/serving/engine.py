"""Continuous batching: requests join and leave the running batch between decode steps.

Each running request owns one row of a ``SlotKVCache`` (its own length and positions) and its own sampling
parameters and seeded generator. A new request is prefilled alone (exactly as ``generate`` runs a prompt), its keys
and values copied into a free row, and from the next step on it decodes with the others. The ``Scheduler`` only
decides (who waits, who runs, who leaves); the ``Runner`` only runs the model; the ``Engine`` thread owns both.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from finetune.generation import SamplingConfig, context_length, next_token
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


class Runner:
    """Runs the model: a prompt alone (``prefill``), then one token for every row (``decode``)."""

    def __init__(self, model, *, max_batch: int) -> None:
        ctx = context_length(model)
        if ctx is None:
            raise ValueError("serving batches decoder-only models; this model is an encoder-decoder")
        self.model, self.device = model, next(model.parameters()).device
        self.cache = model.make_cache(max_batch, ctx[0], kind=SlotKVCache)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Runs a prompt on its own (as ``generate`` does) into a new row (the last). Returns its logits, (1, V)."""
        single = self.model.make_cache(1, len(ids))
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.model(x, cache=single, logits_to_keep=1)[:, -1]  # (1, V)
        for slots, c in zip(self.cache, single, strict=True):
            slots.put(*c.get())
        return logits

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Appends one token to each row (row i gets tokens[i]) at its own position. Returns (rows, V) logits."""
        first = self.cache[0]
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (rows, 1)
        positions = torch.tensor(first.lengths, dtype=torch.long, device=self.device)[:, None]  # (rows, 1)
        mask = first.mask(self.device)  # (rows, size + 1)
        return self.model(x, attention_mask=mask, position_ids=positions, cache=self.cache, logits_to_keep=1)[:, -1]

    def drop(self, row: int) -> None:
        for c in self.cache:
            c.drop(row)


class Engine:
    """The thread that owns the model: admits, prefills, decodes, and hands each request its text."""

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 64, metrics=None) -> None:
        self.scheduler = Scheduler(max_batch=max_batch, max_queue=max_queue)
        self.runner = Runner(model, max_batch=max_batch)
        self.metrics = metrics
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="finetune-engine", daemon=True)

    # ---------------------------------------------------------------------------------- front end side
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        """Queues a request (raises ``QueueFull``); thread-safe."""
        with self._wake:
            self.scheduler.submit(request)
            self._gauges()
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    # ---------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        with torch.inference_mode():  # the cache's tensors are inference tensors: every write happens in this mode
            self._run()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.scheduler.running and not self.scheduler.waiting:
                    self._wake.wait()
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
                        self.runner.drop(i)
                    for r in admitted:
                        if r.finish_reason is None and r not in self.scheduler.running:
                            r.emit({"error": f"generation failed: {type(e).__name__}: {e}"})
                    self._gauges()

    def step(self, admitted: list[Request]) -> None:
        """Decodes one token for every running request, then prefills the admitted ones (their first token); drops
        the rows that finished or were cancelled."""
        sched = self.scheduler
        self._drop_finished()
        if sched.running:
            logits = self.runner.decode([r.generated[-1] for r in sched.running])  # (rows, V)
            argmax = logits.argmax(-1).tolist()  # every greedy row's token, in one host sync
            for i, r in enumerate(sched.running):
                self._sample(r, logits[i : i + 1], argmax[i])
        for r in admitted:
            if r.sampling.seed is not None:  # as ``generate`` seeds its own generator, on the model's device
                r.generator = torch.Generator(device=self.runner.device).manual_seed(r.sampling.seed)
            logits = self.runner.prefill(r.ids)
            with self._wake:
                sched.running.append(r)
            self._sample(r, logits)
        self._drop_finished()

    def _drop_finished(self) -> None:
        with self._wake:
            for i in reversed(range(len(self.scheduler.running))):  # descending: a moved row was already checked
                r = self.scheduler.running[i]
                if r.cancelled or r.finish_reason is not None:
                    self.scheduler.remove(i)
                    self.runner.drop(i)
            self._gauges()

    def _sample(self, r: Request, logits: torch.Tensor, argmax: int | None = None) -> None:
        """The request's next token from (1, V) logits (``argmax``: their argmax, when known), its text, and its
        end when it has come."""
        if r.cancelled:
            return
        greedy = r.sampling.temperature == 0 and argmax is not None
        tok = argmax if greedy else int(next_token(logits, r.sampling, r.generator))
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
            usage = {"prompt_tokens": len(r.ids), "completion_tokens": len(r.generated)}
            if self.metrics is not None:
                self.metrics.finished(r, now)
            r.emit({"finish_reason": reason, **usage})

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.counts(*self.counts)
