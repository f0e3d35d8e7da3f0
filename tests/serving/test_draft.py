"""``serve --draft``: speculative decoding inside the continuous-batching engine. Greedy tokens equal ``generate``'s
(with another draft, and with the target as its own draft, where every proposal is kept); seeded sampling is
reproducible beside other requests and, alone, equals ``speculative_generate``'s; a draft of another vocabulary is
refused at start; the counters count."""

import queue
import re
import threading

import httpx
import pytest
import torch

from finetune import inference
from finetune.generation import SamplingConfig, speculative_generate
from finetune.serving.engine import Engine, Request
from finetune.serving.metrics import Metrics
from finetune.serving.text import TextOut
from tests.serving.test_engine import PROMPTS, alone, wait_idle
from tests.serving.test_engine import run_all as run_engine
from tests.serving.test_server import Server, greedy
from tests.test_inference import tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    target = tiny_llama(tmp_path_factory.mktemp("target"))
    draft = tiny_llama(tmp_path_factory.mktemp("draft"), seed=1, layers=1, hidden=32)  # same tokenizer, other weights
    return target, draft


@pytest.fixture(scope="module")
def loaded(folders):
    return inference.load(folders[0])


@pytest.fixture(scope="module")
def draft(folders):
    return inference.load(folders[1])


def run_all(loaded, draft_model, jobs, *, max_batch=8, draft_tokens=3):
    """Every (prompt, SamplingConfig) submitted at once to an engine with a draft; (each one's ids, metrics)."""
    metrics = Metrics()
    got = run_engine(loaded, jobs, max_batch=max_batch, draft=draft_model, draft_tokens=draft_tokens, metrics=metrics)
    return got, metrics


def counted(metrics: Metrics) -> tuple[float, float]:
    return metrics.draft_proposed._value.get(), metrics.draft_accepted._value.get()


def test_greedy_with_another_draft_equals_generate_for_concurrent_requests(loaded, draft):
    jobs = [(p, SamplingConfig(max_new_tokens=2 + 3 * i, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    got, metrics = run_all(loaded, draft.model, jobs, max_batch=4)  # rows join and leave, of other lengths
    assert got == [alone(loaded, p, s) for p, s in jobs]
    proposed, accepted = counted(metrics)
    assert proposed > 0 and 0 <= accepted < proposed  # another model: some proposals rejected


def test_greedy_with_the_target_as_its_draft_keeps_every_proposal(loaded):
    jobs = [(p, SamplingConfig(max_new_tokens=5 + 2 * i, temperature=0.0)) for i, p in enumerate(PROMPTS[:4])]
    got, metrics = run_all(loaded, loaded.model, jobs, draft_tokens=4)
    assert got == [alone(loaded, p, s) for p, s in jobs]
    proposed, accepted = counted(metrics)
    # each request: a first token from the prefill, then steps of min(4, what is left - 1) proposals each
    assert proposed == accepted == sum(s.max_new_tokens - 1 - (s.max_new_tokens - 1 + 4) // 5 for _, s in jobs)


def test_seeded_sampling_with_a_draft_is_reproducible_beside_other_requests(loaded, draft):
    seeded = ("the cat sat", SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=40, seed=7))
    others = [(p, SamplingConfig(max_new_tokens=9, temperature=1.0)) for p in PROMPTS[:5]]
    first = run_all(loaded, draft.model, [seeded])[0][0]
    beside = run_all(loaded, draft.model, [*others[:2], seeded, *others[2:]])[0][2]
    again = run_all(loaded, draft.model, [seeded, *others])[0][0]
    assert first == beside == again and len(first) == 16
    # alone, the same tokens as `generate --draft` with that seed (the same steps, the same draws)
    ids = torch.tensor([loaded.encode(seeded[0])])
    s = seeded[1]
    ref, _ = speculative_generate(loaded.model, draft.model, ids, max_new_tokens=16, num_draft_tokens=3,
                                  temperature=s.temperature, top_k=s.top_k, seed=s.seed, eos_token_id=[])  # fmt: skip
    assert first == ref[0, ids.size(1) :].tolist()
    other_seed = run_all(loaded, draft.model, [(seeded[0], SamplingConfig(16, 1.0, 40, None, 8))])[0][0]
    assert other_seed != first


def test_server_with_a_draft_answers_concurrent_requests_as_generate_and_counts_drafts(folders, loaded):
    target, small = folders
    server = Server(target, "--max-batch", "4", "--draft", str(small), "--draft-tokens", "3")
    try:
        client, sizes, got = server.client(), [4 + 3 * i for i in range(6)], {}

        def call(i: int) -> None:
            kw = dict(model=target.name, prompt=PROMPTS[i], max_tokens=sizes[i], temperature=0)
            if i % 2:
                got[i] = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
            else:
                got[i] = client.completions.create(**kw).choices[0].text

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got[i] for i in range(6)] == [greedy(loaded, PROMPTS[i], sizes[i]) for i in range(6)]
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        proposed = float(re.search(r"^finetune_draft_tokens_proposed_total (\S+)$", text, re.M).group(1))
        accepted = float(re.search(r"^finetune_draft_tokens_accepted_total (\S+)$", text, re.M).group(1))
        assert proposed > 0 and 0 <= accepted <= proposed
    finally:
        server.stop()


def test_a_draft_of_another_vocabulary_is_refused_at_start(folders, stand_in):
    import subprocess
    import sys

    from tests.serving.test_server import ROOT

    cmd = [sys.executable, "-m", "finetune.cli", "serve", str(folders[0]), "--port", "0", "--draft",
           str(stand_in("llama"))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={"PYTHONPATH": str(ROOT),
                          "PATH": "/usr/bin:/bin", "HOME": "/tmp"})  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"--draft {stand_in('llama')}: its tokenizer differs from the target's" in proc.stderr


def test_a_cancelled_request_with_a_draft_frees_its_rows_and_leaves_the_others_exact(loaded, draft):
    engine = Engine(loaded.model, max_batch=4, draft=draft.model, draft_tokens=3).start()
    done: queue.Queue = queue.Queue()
    jobs = [(p, SamplingConfig(max_new_tokens=12, temperature=0.0)) for p in PROMPTS[:3]]
    reqs = []
    try:
        for i, (prompt, sampling) in enumerate(jobs):
            emit = lambda e, i=i: ("finish_reason" in e and done.put(i)) or (i == 1 and engine.cancel(reqs[1]))  # noqa: E731
            reqs.append(Request(loaded.encode(prompt), sampling, [], TextOut(loaded.tokenizer, []), emit))
        for r in reqs:
            engine.submit(r)
        assert sorted(done.get(timeout=60) for _ in range(2)) == [0, 2]
        wait_idle(engine)
        assert engine.draft.lengths == [] and engine.runner.lengths == []
    finally:
        engine.stop(timeout=10)
    assert [reqs[i].generated for i in (0, 2)] == [alone(loaded, *jobs[i]) for i in (0, 2)]
    assert len(reqs[1].generated) < 12
