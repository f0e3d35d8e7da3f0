"""Serving an encoder-decoder (T5): each request's tokens are those ``generate`` gives it alone, whatever runs beside
it (rows of different source and decoder lengths, joining and leaving between steps); the real ``openai`` client
against a T5 server gets ``finetune generate``'s text."""

import copy
import os
import queue
import subprocess
import sys
import threading

import openai
import pytest
import torch
import transformers as T

from finetune import inference
from finetune.generation import EncoderDecoderStepper, SamplingConfig
from finetune.nn import SlotKVCache
from finetune.serving.engine import EncoderDecoderRunner, Engine, Request
from finetune.serving.text import TextOut
from tests.conftest import T5, make_tokenizer
from tests.serving.test_engine import alone, run_all, wait_idle
from tests.serving.test_server import ROOT, Server, greedy

SOURCES = [
    "the quick brown fox jumps over the lazy dog", "hello", "one two three four five six seven eight nine ten",
    "a cat sat", "hello world, this is a tiny corpus", "positive negative neutral", "the moon",
]  # fmt: skip


def tiny_t5(folder):
    """A random T5 v1.1 with unit-scale weights (greedy outputs vary with the source) and a T5-style tokenizer."""
    make_tokenizer(folder, "t5")
    config = T.T5Config(**{**T5, "vocab_size": 320}, pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 * p.size(-1) ** -0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def loaded(t5_dir):
    return inference.load(t5_dir)


def request(loaded, source, sampling, events):
    emit = lambda e: ("finish_reason" in e or "error" in e) and events.put(e)  # noqa: E731
    return Request(loaded.encode(source), sampling, [], TextOut(loaded.tokenizer, []), emit)


# ------------------------------------------------------------------------------------------ the engine
def test_concurrent_t5_requests_equal_generate_alone(loaded):
    """Sources of different lengths and max_tokens, more requests than rows: rows join and leave between steps."""
    jobs = [(s, SamplingConfig(max_new_tokens=2 + 3 * i, temperature=0.0)) for i, s in enumerate(SOURCES)]
    assert len({len(loaded.encode(s)) for s, _ in jobs}) > 3
    got = run_all(loaded, jobs, max_batch=3)
    assert got == [alone(loaded, s, sampling) for s, sampling in jobs]


def test_seeded_t5_sampling_is_reproducible_beside_other_requests(loaded):
    seeded = ("the lazy dog", SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=40, seed=7))
    others = [(s, SamplingConfig(max_new_tokens=7, temperature=1.0)) for s in SOURCES[:4]]
    first = run_all(loaded, [seeded])[0]
    beside = run_all(loaded, [*others[:2], seeded, *others[2:]])[2]
    assert first == beside == alone(loaded, *seeded)


def test_t5_rows_step_with_each_rows_own_logits_as_they_join_and_leave(loaded):
    """Each step's logits of every row are those of its own ``EncoderDecoderStepper`` while rows of other source and
    decoder lengths join (prefill) and leave (drop) between steps. In float64, to 1e-12: what differs is only the
    rounding of a padded, masked 3-row step against a 1-row one (in fp32 up to 3e-5 on these unit-scale logits of
    magnitude 6; the greedy tokens are equal, see above)."""
    model = copy.deepcopy(loaded.model).double()
    runner = EncoderDecoderRunner(model, max_batch=3, max_source=64, max_new=16)
    rows = []  # rows[i]: the stepper of row i, in the runner's order

    def join(source: str) -> None:
        ids = torch.tensor([loaded.encode(source)])
        stepper = EncoderDecoderStepper(model, ids, None, 16)
        first = runner.prefill([ids[0].tolist()])
        torch.testing.assert_close(first, stepper.start(), rtol=0, atol=0)  # alone: exactly generate's first step
        rows.append(stepper)

    with torch.inference_mode():
        join(SOURCES[0])
        join(SOURCES[1])
        for step in range(5):
            if step == 1:
                join(SOURCES[2])  # a third source length, one decoder position behind
            if step == 3:
                runner.drop(0)  # the last row moves into row 0
                rows[0] = rows.pop()
            toks = [(7 * step + 3 * i) % 300 + 5 for i in range(len(rows))]
            assert runner.cross[0].key_mask() is not None  # sources of different lengths: padded, masked
            batched = runner.decode(toks)  # (rows, V)
            for i, stepper in enumerate(rows):
                ref = stepper.step(torch.tensor([toks[i]]))  # (1, V)
                torch.testing.assert_close(batched[i : i + 1], ref, rtol=0, atol=1e-12)
    runner.reset()
    assert runner.cache[0].rows == runner.cross[0].rows == 0


def test_one_t5_row_steps_exactly_as_generate_does(loaded):
    """One row needs no mask, no position ids, no key-padding mask: each step equals ``generate``'s bit for bit."""
    model, ids = loaded.model, torch.tensor([loaded.encode(SOURCES[0])])
    runner = EncoderDecoderRunner(model, max_batch=4, max_source=64, max_new=16)
    with torch.inference_mode():  # as generate runs
        stepper = EncoderDecoderStepper(model, ids, None, 16)
        assert torch.equal(runner.prefill([ids[0].tolist()]), stepper.start())
        for tok in (5, 9, 17, 200):
            first = runner.cache[0]
            assert first.mask() is None and first.positions() is None and runner.cross[0].key_mask() is None
            assert torch.equal(runner.decode([tok]), stepper.step(torch.tensor([tok])))


def test_cancelled_t5_request_frees_its_rows(loaded):
    engine = Engine(loaded.model, max_batch=2, max_queue=8).start()
    events: queue.Queue = queue.Queue()
    first = threading.Event()
    try:
        long = request(loaded, SOURCES[0], SamplingConfig(max_new_tokens=400, temperature=0.0), events)
        emit = long.emit
        long.emit = lambda e: (first.set(), emit(e))
        engine.submit(long)
        assert first.wait(timeout=60)
        engine.cancel(long)
        wait_idle(engine)
        assert len(long.generated) < 400 and long.finish_reason is None
        runner = engine.runner
        assert runner.cache[0].rows == 0 and runner.cross[0].rows == 0
        short = request(loaded, SOURCES[3], SamplingConfig(max_new_tokens=5, temperature=0.0), events)
        engine.submit(short)  # the freed row serves the next request
        assert "finish_reason" in events.get(timeout=60)
        assert short.generated == alone(loaded, SOURCES[3], short.sampling)
    finally:
        engine.stop(timeout=10)


def test_t5_bounds_and_draft_are_refused_with_their_numbers(loaded):
    engine = Engine(loaded.model, max_batch=2, max_source_tokens=8, max_new_tokens=20)
    assert isinstance(engine.runner.cache[0], SlotKVCache) and engine.runner.cache[0].max_len == 21
    assert engine.runner.cross[0].max_len == 8  # memory bounded: at most 8 source positions per row
    with pytest.raises(ValueError, match=r"prompt is 9 tokens, over the 8 this server encodes"):
        engine.check(9, 5)
    with pytest.raises(ValueError, match=r"max_new_tokens 21 is over the 20 tokens this server decodes"):
        engine.check(8, 21)
    engine.check(8, 20)
    with pytest.raises(ValueError, match="speculative decoding is for decoder-only models"):
        Engine(loaded.model, draft=loaded.model)


# ------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(t5_dir):
    s = Server(t5_dir, "--max-batch", "3", "--max-source-tokens", "40")
    try:
        yield s
    finally:
        s.stop()


def test_t5_completions_equal_generate_also_concurrently(server, loaded, t5_dir):
    client = server.client()
    out = client.completions.create(model=t5_dir.name, prompt=SOURCES[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(loaded, SOURCES[0], 12)
    assert out.usage.prompt_tokens == len(loaded.encode(SOURCES[0]))
    results: dict = {}

    def ask(i: int, source: str) -> None:
        got = client.completions.create(model=t5_dir.name, prompt=source, max_tokens=4 + 2 * i, temperature=0)
        results[i] = got.choices[0].text

    threads = [threading.Thread(target=ask, args=(i, s)) for i, s in enumerate(SOURCES[:5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {i: greedy(loaded, s, 4 + 2 * i) for i, s in enumerate(SOURCES[:5])}


def test_t5_streaming_gives_the_same_text_and_usage(server, t5_dir):
    client = server.client()
    kw = dict(model=t5_dir.name, prompt=SOURCES[2], max_tokens=15, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_t5_stop_strings_are_cut_exactly(server, t5_dir):
    client = server.client()
    kw = dict(model=t5_dir.name, prompt=SOURCES[0], max_tokens=20, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[4:7]
    assert stop.strip(), text
    out = client.completions.create(**kw, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"


def test_t5_chat_and_requests_over_the_bounds_get_a_400_naming_why(server, t5_dir):
    client = server.client()
    with pytest.raises(
        openai.BadRequestError, match="is an encoder-decoder .T5., which has no chat; send its input to "
    ):
        client.chat.completions.create(model=t5_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    long = " ".join(SOURCES)
    with pytest.raises(openai.BadRequestError, match=r"prompt is \d+ tokens, over the 40 this server encodes"):
        client.completions.create(model=t5_dir.name, prompt=long, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens 513 is over the 512 tokens this server decodes"):
        client.completions.create(model=t5_dir.name, prompt="hello", max_tokens=513)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft", "T5"], "--draft: speculative decoding is for decoder-only models"),
        (["--quantize", "int8"], "weight-only quantization is for decoder-only language models, not T5"),
    ],
    ids=["draft", "quantize"],
)
def test_t5_with_a_draft_or_quantized_is_refused_at_startup(t5_dir, flags, message):
    flags = [str(t5_dir) if f == "T5" else f for f in flags]
    cmd = [sys.executable, "-m", "finetune.cli", "serve", str(t5_dir), "--port", "0", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2
    assert message in done.stderr
