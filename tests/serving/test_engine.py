"""The continuous-batching engine: each request's tokens are those it gets alone from ``generate``, whatever runs
beside it; seeded sampling is reproducible; rows join and leave between steps; the slot cache keeps rows apart."""

import queue
import threading
import time

import pytest
import torch

from finetune import inference
from finetune.generation import SamplingConfig, generate
from finetune.nn import KVCache, SlotKVCache
from finetune.nn.attention import _write_index
from finetune.serving.engine import Engine, EngineThread, QueueFull, Request, Runner, prefill_groups
from finetune.serving.text import TextOut
from tests.test_inference import tiny_llama

PROMPTS = [
    "once", "the cat sat on the mat and", "one two three four five six seven eight nine", "hello how",
    "user assistant hello", "the dog ran after the ball. the cat", "twelve", "I am fine, thank you. what",
]  # fmt: skip


prefill = Runner.prefill


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return inference.load(tiny_llama(tmp_path_factory.mktemp("llama")))


def wait_idle(engine, tries: int = 100) -> None:
    """Waits (bounded) until nothing runs or waits: the last rows are dropped at the end of the step that finished
    them, so the count reaches 0 a moment after their final events."""
    for _ in range(tries):
        if engine.counts == (0, 0):
            break
        time.sleep(0.05)
    assert engine.counts == (0, 0)


def run_all(loaded, jobs, *, max_batch=8, queued=False, **engine_options):
    """Submits every (prompt, SamplingConfig) at once; returns each one's generated ids (after asserting every one
    finished, none failed). ``queued``: all are queued before the engine starts, so its first step admits (and
    prefills together) as many as it has rows. ``engine_options``: the ``Engine``'s (a draft, metrics)."""
    engine = Engine(loaded.model, max_batch=max_batch, max_queue=64, **engine_options)
    if not queued:
        engine.start()
    done: queue.Queue = queue.Queue()
    reqs = []
    try:
        for prompt, sampling in jobs:
            emit = lambda e: ("finish_reason" in e or "error" in e) and done.put(e)  # noqa: E731
            r = Request(loaded.encode(prompt), sampling, [], TextOut(loaded.tokenizer, []), emit)
            reqs.append(r)
            engine.submit(r)
        if queued:
            engine.start()
        events = [done.get(timeout=60) for _ in jobs]
        assert all("finish_reason" in e for e in events), events
        wait_idle(engine)
    finally:
        engine.stop(timeout=10)
    return [r.generated for r in reqs]


def alone(loaded, prompt, sampling):
    """The tokens ``generate`` gives the prompt on its own (no stop token, like the engine's requests here): after
    the prompt (decoders) or the decoder's start token (encoder-decoders)."""
    ids = torch.tensor([loaded.encode(prompt)])
    out = generate(loaded.model, ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                   top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed, eos_token_id=[])  # fmt: skip
    return out[0, 1 if loaded.model.is_encoder_decoder else ids.size(1) :].tolist()


def test_concurrent_greedy_requests_equal_generate_alone(loaded):
    jobs = [(p, SamplingConfig(max_new_tokens=3 + 4 * i, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    got = run_all(loaded, jobs, max_batch=4)  # more requests than rows: some join as others leave
    assert got == [alone(loaded, p, s) for p, s in jobs]


def test_requests_admitted_together_are_prefilled_together_and_equal_generate_alone(loaded, monkeypatch):
    jobs = [(p, SamplingConfig(max_new_tokens=2 + 3 * i, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    jobs.append(("the cat sat", SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=40, seed=7)))
    groups = []
    monkeypatch.setattr(Runner, "prefill", lambda self, prompts: groups.append(len(prompts)) or prefill(self, prompts))
    got = run_all(loaded, jobs, max_batch=6, queued=True)
    assert got == [alone(loaded, p, s) for p, s in jobs]
    assert groups[0] > 1  # the first step's admissions ran as one batch (or a few)


def test_prompts_prefilled_together_get_the_keys_values_and_logits_each_gets_alone(loaded):
    """A right-padded batch of prompts of different lengths: each row's logits and cached keys/values are those of
    its prompt run alone (within 1e-5: a batched matmul rounds unlike a one-row one), each row has its own length,
    and the next step decodes every row as it would alone."""
    model = loaded.model
    prompts = [loaded.encode(p) for p in PROMPTS[1:4]]
    assert len({len(p) for p in prompts}) == 3
    runner = Runner(model, max_batch=4)
    with torch.inference_mode():
        logits = runner.prefill(prompts)  # (3, V)
        assert runner.lengths == [len(p) for p in prompts]
        nxt = runner.decode([5, 9, 17])  # (3, V)
        for b, ids in enumerate(prompts):
            single = model.make_cache(1, 64)
            ref = model(torch.tensor([ids]), cache=single, logits_to_keep=1)[:, -1]  # (1, V)
            torch.testing.assert_close(logits[b : b + 1], ref, rtol=1e-5, atol=1e-5)
            for slots, c in zip(runner.cache, single, strict=True):
                k, v = c.get()  # (1, H_kv, T, D)
                torch.testing.assert_close(slots.k[b : b + 1, :, : len(ids)], k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(slots.v[b : b + 1, :, : len(ids)], v, rtol=1e-5, atol=1e-5)
            ref = model(torch.tensor([[[5, 9, 17][b]]]), cache=single, logits_to_keep=1)[:, -1]
            torch.testing.assert_close(nxt[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_prefill_groups_bound_the_padding_to_twice_the_prompts():
    def group(lengths):
        reqs = [Request([1] * n, SamplingConfig(), [], None, None) for n in lengths]
        return [[len(r.ids) for r in g] for g in prefill_groups(reqs)]

    assert group([2, 10, 1, 9]) == [[10, 9, 2, 1]]  # 4 rows of 10 = 40 positions for 22 tokens: within 2x
    assert group([10, 100, 10]) == [[100, 10], [10]]  # a third row of 100 would be 300 for 120
    assert group([7]) == [[7]] and group([]) == []


def test_engines_sharing_a_thread_step_in_turn_on_it_and_stop_one_by_one(loaded):
    """Two engines (the model and an adapter, as ``serve`` runs them) on one ``EngineThread``: requests to both,
    at once, get generate's tokens, every step runs on that one thread (one OpenMP pool), an engine stopped leaves
    the other serving, and the thread ends with the last."""
    thread = EngineThread()
    engines = [Engine(loaded.model, max_batch=4, thread=thread).start() for _ in range(2)]
    done: queue.Queue = queue.Queue()
    jobs = [(p, SamplingConfig(max_new_tokens=3 + 2 * i, temperature=0.0)) for i, p in enumerate(PROMPTS[:6])]
    reqs, threads = [], set()

    def emit(event: dict, i: int) -> None:
        threads.add(threading.get_ident())
        if "finish_reason" in event:
            done.put(i)

    try:
        for i, (prompt, sampling) in enumerate(jobs):
            r = Request(loaded.encode(prompt), sampling, [], TextOut(loaded.tokenizer, []), lambda e, i=i: emit(e, i))
            reqs.append(r)
            engines[i % 2].submit(r)
        for _ in jobs:
            done.get(timeout=60)
        assert [r.generated for r in reqs] == [alone(loaded, p, s) for p, s in jobs]
        assert len(threads) == 1 and threads != {threading.get_ident()}
        engines[0].stop(timeout=10)
        assert thread.engines == [engines[1]]
        r = Request(loaded.encode(PROMPTS[1]), SamplingConfig(5, 0.0), [], TextOut(loaded.tokenizer, []),
                    lambda e: "finish_reason" in e and done.put("last"))  # fmt: skip
        engines[1].submit(r)
        assert done.get(timeout=60) == "last" and r.generated == alone(loaded, PROMPTS[1], SamplingConfig(5, 0.0))
    finally:
        for e in engines:
            e.stop(timeout=10)
    assert thread.engines == [] and thread._thread is None


def test_seeded_sampling_is_reproducible_beside_other_requests(loaded):
    seeded = ("the cat sat", SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=40, seed=7))
    others = [(p, SamplingConfig(max_new_tokens=9, temperature=1.0)) for p in PROMPTS[:5]]
    first = run_all(loaded, [seeded])[0]
    beside = run_all(loaded, [*others[:2], seeded, *others[2:]])[2]
    assert first == beside == alone(loaded, *seeded)


def test_batched_step_logits_match_a_single_row(loaded):
    """Rows of different lengths decoded together give each row's own logits, within 1e-5 absolute plus 1e-5
    relative (a 3-row matmul and a masked attention round unlike a 1-row unmasked one); the layers' caches share
    one write index."""
    model = loaded.model
    slots = model.make_cache(3, 64, kind=SlotKVCache)
    prompts = [loaded.encode(p) for p in PROMPTS[1:4]]
    singles = []
    with torch.inference_mode():
        for ids in prompts:
            single = model.make_cache(1, 64)
            model(torch.tensor([ids]), cache=single)
            for s, c in zip(slots, single, strict=True):
                s.put(*c.get())
            singles.append(single)
        nxt = [5, 9, 17]
        mask = slots[0].mask()
        pos = torch.tensor(slots[0].lengths)[:, None]
        before = _write_index.cache_info()
        batched = model(torch.tensor(nxt)[:, None], attention_mask=mask, position_ids=pos, cache=slots)[:, -1]
        after = _write_index.cache_info()  # every layer writes at the same places: built once for the step
        assert (after.misses - before.misses, after.hits - before.hits) == (1, len(slots) - 1)
        for i, single in enumerate(singles):
            ref = model(torch.tensor([[nxt[i]]]), cache=single)[:, -1]
            torch.testing.assert_close(batched[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_rows_of_one_length_step_exactly_as_generate_does(loaded):
    """One row (or rows sharing a length) needs no mask and no position ids: the runner's step is ``generate``'s
    own KV-cache step, and its logits equal it bit for bit."""
    model, ids = loaded.model, loaded.encode(PROMPTS[1])
    runner = Runner(model, max_batch=4)
    single = model.make_cache(1, 64)
    with torch.inference_mode():
        assert torch.equal(runner.prefill([ids]), model(torch.tensor([ids]), cache=single, logits_to_keep=1)[:, -1])
        for tok in (5, 9, 17):
            assert runner.cache[0].mask() is None and runner.cache[0].positions() is None
            ref = model(torch.tensor([[tok]]), cache=single, logits_to_keep=1)[:, -1]
            assert torch.equal(runner.decode([tok]), ref)
        runner.prefill([ids + [5, 9, 17]])  # a second row of the same length: still one write, no mask
        assert runner.lengths == [len(ids) + 3] * 2 and runner.cache[0].mask() is None


def test_rows_of_different_lengths_append_blocks_and_rewind_each_to_its_own_length(loaded):
    """What speculative decoding needs: T tokens appended to rows of different lengths in one forward give each
    row's own logits (within 1e-5), and each row rewinds to its own length, after which it decodes as if the
    rejected tokens had never been fed."""
    model = loaded.model
    runner = Runner(model, max_batch=3)
    prompts = [loaded.encode(p) for p in PROMPTS[1:4]]
    blocks = [[5, 9, 17], [3, 4, 6], [7, 8, 2]]
    keep = [1, 3, 0]  # tokens of its block each row keeps
    with torch.inference_mode():
        for ids in prompts:
            runner.prefill([ids])
        batched = runner.forward(blocks, keep=3)  # (3, 3, V)
        runner.rewind([len(ids) + k for ids, k in zip(prompts, keep, strict=True)])
        nxt = runner.decode([11, 12, 13])  # (3, V)
        for i, ids in enumerate(prompts):
            single = model.make_cache(1, 64)
            model(torch.tensor([ids]), cache=single)
            ref = model(torch.tensor([blocks[i]]), cache=single, logits_to_keep=3)[0]  # (3, V)
            torch.testing.assert_close(batched[i], ref, rtol=1e-5, atol=1e-5)
            single = model.make_cache(1, 64)
            ref = model(torch.tensor([ids + blocks[i][: keep[i]] + [11 + i]]), cache=single, logits_to_keep=1)[0]
            torch.testing.assert_close(nxt[i : i + 1], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot rewind rows of lengths"):
        runner.rewind([len(prompts[0]) + 99, 0, 0])


def test_slot_cache_drop_moves_the_last_row():
    c = SlotKVCache(batch_size=3, max_len=8, n_kv_heads=1, head_dim=2)
    for n in (2, 4, 3):
        c.put(torch.full((1, 1, n, 2), float(n)), torch.full((1, 1, n, 2), -float(n)))
    c.drop(0)
    assert c.rows == 2 and c.lengths == [3, 4] and c.size == 4
    assert torch.equal(c.k[0, 0, :3], torch.full((3, 2), 3.0))
    assert c.mask()[:, 0, 0].tolist() == [[True, True, True, True, False], [True] * 5]  # (rows, 1, T, S)
    with pytest.raises(ValueError, match="appends to each of its 2 rows"):
        c.update(torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))
    assert isinstance(c, KVCache)


def test_full_queue_is_refused(loaded):
    engine = Engine(loaded.model, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    r = lambda: Request([3], SamplingConfig(1), [], TextOut(loaded.tokenizer, []), lambda e: None)  # noqa: E731
    engine.submit(r())
    with pytest.raises(QueueFull, match="1 requests waiting"):
        engine.submit(r())


def test_slot_cache_rows_read_only_finite_values_where_they_never_wrote():
    """A shorter row reads (masked) positions it never wrote; masking can't hide NaN there, so the buffers must
    start finite. Memory just freed with NaN in it is what a fresh ``torch.empty`` would likely reuse."""
    for _ in range(20):
        poison = torch.full((1, 1, 64, 8), float("nan"))
        del poison
        c = SlotKVCache(batch_size=4, max_len=64, n_kv_heads=1, head_dim=8)
        for n in (3, 17, 5):
            c.put(torch.ones(1, 1, n, 8), torch.ones(1, 1, n, 8))
        c.drop(1)
        c.put(torch.ones(1, 1, 40, 8), torch.ones(1, 1, 40, 8))  # grows the buffers
        k, v = c.update(torch.ones(3, 1, 1, 8), torch.ones(3, 1, 1, 8))
        assert torch.isfinite(k).all() and torch.isfinite(v).all()


def test_requests_arriving_one_by_one_beside_running_ones_all_finish(loaded):
    """Staggered arrivals: each new row joins running rows of other lengths (the case that read NaN garbage)."""
    engine = Engine(loaded.model, max_batch=8, max_queue=64).start()
    events: queue.Queue = queue.Queue()
    try:
        for round_ in range(4):
            for i, p in enumerate(PROMPTS[:5]):
                emit = lambda e, i=i: ("finish_reason" in e or "error" in e) and events.put(e)  # noqa: E731
                sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=round_ * 10 + i)
                engine.submit(Request(loaded.encode(p), sampling, [], TextOut(loaded.tokenizer, []), emit))
                time.sleep(0.003 * i)
            finished = [events.get(timeout=60) for _ in range(5)]
            assert all("finish_reason" in e for e in finished), finished
    finally:
        engine.stop(timeout=10)
