"""The continuous-batching engine: each request's tokens are those it gets alone from ``generate``, whatever runs
beside it; seeded sampling is reproducible; rows join and leave between steps; the slot cache keeps rows apart."""

import queue
import time

import pytest
import torch

from finetune import inference
from finetune.generation import SamplingConfig, generate
from finetune.nn import KVCache, SlotKVCache
from finetune.serving.engine import Engine, QueueFull, Request
from finetune.serving.text import TextOut
from tests.test_inference import tiny_llama

PROMPTS = [
    "once", "the cat sat on the mat and", "one two three four five six seven eight nine", "hello how",
    "user assistant hello", "the dog ran after the ball. the cat", "twelve", "I am fine, thank you. what",
]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return inference.load(tiny_llama(tmp_path_factory.mktemp("llama")))


def run_all(loaded, jobs, *, max_batch=8):
    """Submits every (prompt, SamplingConfig) at once; returns each one's generated ids and finish event."""
    engine = Engine(loaded.model, max_batch=max_batch, max_queue=64).start()
    done: queue.Queue = queue.Queue()
    reqs = []
    try:
        for i, (prompt, sampling) in enumerate(jobs):
            emit = lambda e, i=i: "finish_reason" in e and done.put(i)  # noqa: E731
            r = Request(loaded.encode(prompt), sampling, [], TextOut(loaded.tokenizer, []), emit)
            reqs.append(r)
            engine.submit(r)
        for _ in jobs:
            done.get(timeout=60)
        for _ in range(100):  # the last rows are dropped at the end of the step that finished them
            if engine.counts == (0, 0):
                break
            time.sleep(0.05)
        assert engine.counts == (0, 0)
    finally:
        engine.stop(timeout=10)
    return [r.generated for r in reqs]


def alone(loaded, prompt, sampling):
    ids = torch.tensor([loaded.encode(prompt)])
    out = generate(loaded.model, ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                   top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed, eos_token_id=[])  # fmt: skip
    return out[0, ids.size(1) :].tolist()


def test_concurrent_greedy_requests_equal_generate_alone(loaded):
    jobs = [(p, SamplingConfig(max_new_tokens=3 + 4 * i, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    got = run_all(loaded, jobs, max_batch=4)  # more requests than rows: some join as others leave
    assert got == [alone(loaded, p, s) for p, s in jobs]


def test_seeded_sampling_is_reproducible_beside_other_requests(loaded):
    seeded = ("the cat sat", SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=40, seed=7))
    others = [(p, SamplingConfig(max_new_tokens=9, temperature=1.0)) for p in PROMPTS[:5]]
    first = run_all(loaded, [seeded])[0]
    beside = run_all(loaded, [*others[:2], seeded, *others[2:]])[2]
    assert first == beside == alone(loaded, *seeded)


def test_batched_step_logits_match_a_single_row(loaded):
    """Rows of different lengths decoded together give each row's own logits, within 1e-5 absolute plus 1e-5
    relative (a 3-row matmul and a masked attention round unlike a 1-row unmasked one)."""
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
        batched = model(torch.tensor(nxt)[:, None], attention_mask=mask, position_ids=pos, cache=slots)[:, -1]
        for i, single in enumerate(singles):
            ref = model(torch.tensor([[nxt[i]]]), cache=single)[:, -1]
            torch.testing.assert_close(batched[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_slot_cache_drop_moves_the_last_row():
    c = SlotKVCache(batch_size=3, max_len=8, n_kv_heads=1, head_dim=2)
    for n in (2, 4, 3):
        c.put(torch.full((1, 1, n, 2), float(n)), torch.full((1, 1, n, 2), -float(n)))
    c.drop(0)
    assert c.rows == 2 and c.lengths == [3, 4] and c.size == 4
    assert torch.equal(c.k[0, 0, :3], torch.full((3, 2), 3.0))
    assert c.mask().tolist() == [[True, True, True, True, False], [True] * 5]
    with pytest.raises(ValueError, match="one token to each of its 2 rows"):
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
