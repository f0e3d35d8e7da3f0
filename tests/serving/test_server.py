"""``finetune serve`` as a user runs it: a subprocess on 127.0.0.1 and an ephemeral port, called with the real
``openai`` client (every call bounded by a timeout), stopped by pid in a finally."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from finetune import inference
from tests.test_inference import text_run, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["once", "the cat sat on the mat and", "one two three four five six seven eight nine", "hello how",
           "user assistant", "the dog ran after the ball. the", "twelve", "I am fine, thank you. what"]  # fmt: skip


class Server:
    """``finetune serve MODEL --port 0 ...`` in a subprocess; ``url`` once /health answers 200."""

    def __init__(self, model: Path, *args: str, timeout: float = 180) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "finetune.cli", "serve", str(model), "--port", "0", "--device", "cpu", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = self.proc.stdout.readline()  # "finetune serve: listening on http://127.0.0.1:PORT"
            match = re.search(r"http://[\d.]+:(\d+)", line)
            assert match, f"no address printed: {line!r} {self.proc.stderr.read() if self.proc.poll() else ''}"
            self.url = f"http://127.0.0.1:{match.group(1)}"
            deadline = time.monotonic() + timeout
            while True:
                assert self.proc.poll() is None, self.proc.stderr.read()
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not load in time"
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), timeout=60,
                             max_retries=0, **kw)  # fmt: skip

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **kw)

    def running(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(re.search(r"^finetune_requests_running (\S+)$", text, re.M).group(1))

    def generated(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(re.search(r"^finetune_generation_tokens_total (\S+)$", text, re.M).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return inference.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-batch", "4")
    try:
        yield s
    finally:
        s.stop()


def greedy(loaded, prompt: str, n: int) -> str:
    """What ``finetune generate MODEL --prompt P --temperature 0 --max-new-tokens n`` prints after the prompt."""
    return inference.complete(loaded, prompt, inference.Sampling(n, 0.0, None, None, 0))[0]


# ------------------------------------------------------------------------------------------ the API
def test_completion_chat_and_models(server, loaded, model_dir):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [model_dir.name]
    out = client.completions.create(model=model_dir.name, prompt="the cat sat", max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(loaded, "the cat sat", 12)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(loaded.encode("the cat sat"))
    chat = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hello"}],
                                          max_completion_tokens=10, temperature=0)  # fmt: skip
    expected = inference.Chat(loaded, inference.Sampling(10, 0.0, None, None, 0)).say("hello")
    assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"


def test_streaming_gives_the_same_text_and_usage(server, model_dir):
    client = server.client()
    kw = dict(model=model_dir.name, prompt="once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    chat = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0, stream=True)  # fmt: skip
    parts = [c.choices[0].delta.content or "" for c in chat]
    again = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)  # fmt: skip
    assert "".join(parts) == again.choices[0].message.content


def test_stop_strings_are_cut_exactly(server, model_dir):
    client = server.client()
    kw = dict(model=model_dir.name, prompt="the dog ran", max_tokens=24, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[5:8]
    assert stop.strip(), text  # a visible stop string from the middle of the answer
    out = client.completions.create(**kw, stop=[stop, "never appears"])
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(server, model_dir):
    client = server.client()
    kw = dict(model=model_dir.name, prompt="hello how", max_tokens=16, temperature=1.0)
    a, b, c = (client.completions.create(**kw, seed=s).choices[0].text for s in (3, 3, 4))
    assert a == b and a != c


def test_eight_concurrent_greedy_requests_equal_separate_generate_calls(server, loaded, model_dir):
    client = server.client()
    sizes = [3 + 3 * i for i in range(8)]
    got: dict[int, tuple] = {}

    def call(i: int) -> None:
        out = client.completions.create(model=model_dir.name, prompt=PROMPTS[i], max_tokens=sizes[i], temperature=0)
        got[i] = (out.choices[0].text, out.usage.completion_tokens)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got[i][0] for i in range(8)] == [greedy(loaded, PROMPTS[i], sizes[i]) for i in range(8)]
    assert [got[i][1] for i in range(8)] == sizes  # the tiny model never says EOS in these few tokens


# ------------------------------------------------------------------------------------------ errors
def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status and body["type"]
    return body["message"]


def test_errors_name_the_field_and_the_server_still_answers(server, loaded, model_dir):
    name = model_dir.name
    ok = {"model": name, "prompt": "the cat", "max_tokens": 4, "temperature": 0}
    assert "not valid JSON" in error(server.post("/v1/completions", content=b"{nope"), 400)
    assert error(server.post("/v1/completions", json={**ok, "max_tokens": "many"}), 400).startswith("max_tokens:")
    assert error(server.post("/v1/completions", json={**ok, "temperature": [1]}), 400).startswith("temperature:")
    msg = error(server.post("/v1/completions", json={**ok, "max_tokens": 300}), 400)
    assert "prompt is 2 tokens and max_tokens 300" in msg and "context of 256" in msg
    assert error(server.post("/v1/completions", json={**ok, "prompt": ""}), 400) == "prompt: is empty"
    assert "only n=1" in error(server.post("/v1/completions", json={**ok, "n": 2}), 400)
    assert "'other'" in error(server.post("/v1/completions", json={**ok, "model": "other"}), 404)
    assert "messages" in error(server.post("/v1/chat/completions", json={"model": name, "messages": []}), 400)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        server.client().completions.create(model=name, prompt="x", n=3)
    out = server.post("/v1/completions", json=ok).json()
    assert out["choices"][0]["text"] == greedy(loaded, "the cat", 4)


def test_openai_fields_the_server_does_not_implement_are_refused_unless_they_ask_for_nothing(server, loaded, model_dir):
    """A penalty, logit bias, logprobs or tools silently not applied would change the answer without saying so: a
    400 names the field. At their neutral values (what some clients always send) they are accepted."""
    name = model_dir.name
    ok = {"model": name, "prompt": "the cat", "max_tokens": 4, "temperature": 0}
    msg = error(server.post("/v1/completions", json={**ok, "frequency_penalty": 0.5}), 400)
    assert msg == "frequency_penalty: not supported by this server (got 0.5); leave it out"
    assert error(server.post("/v1/completions", json={**ok, "echo": True}), 400).startswith("echo: not supported")
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert error(server.post("/v1/chat/completions", json={**chat, "logprobs": True}), 400).startswith("logprobs:")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert error(server.post("/v1/chat/completions", json={**chat, "tools": tools}), 400).startswith("tools:")
    with pytest.raises(openai.BadRequestError, match="presence_penalty: not supported"):
        server.client().completions.create(model=name, prompt="x", presence_penalty=1.0)
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": None, "echo": False, "best_of": 1,
               "logit_bias": {}, "response_format": {"type": "text"}}  # fmt: skip
    out = server.post("/v1/completions", json={**ok, **neutral}).json()
    assert out["choices"][0]["text"] == greedy(loaded, "the cat", 4)


def test_a_client_leaving_mid_stream_frees_its_row(server, model_dir):
    """The client leaves after its first chunk: the row is freed long before the request's 250 tokens (reading
    ``running`` while streaming would race a tiny model that finishes in well under a second)."""
    before = server.generated()
    body = {"model": model_dir.name, "prompt": "once", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 20
    while server.running() != 0:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.1)
    assert server.generated() - before < 250, "the request ran to its end after its client left"


# ------------------------------------------------------------------------------------------ limits, SIGTERM
@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "key.txt"
    key.write_text("s3cret\n")
    s = Server(model_dir, "--api-key-file", str(key), "--max-batch", "1", "--max-queue", "1",
               "--max-body-bytes", "2000", "--max-tokens-limit", "200", "--name", "tiny")  # fmt: skip
    try:
        yield s
    finally:
        s.stop()


def test_api_key_body_size_queue_and_token_limits(guarded):
    ok = {"model": "tiny", "prompt": "the cat", "max_tokens": 4}
    auth = {"Authorization": "Bearer s3cret"}
    assert "no API key" in error(guarded.post("/v1/completions", json=ok), 401)
    assert "wrong" in error(guarded.post("/v1/completions", json=ok, headers={"Authorization": "Bearer no"}), 401)
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200  # public
    assert httpx.get(f"{guarded.url}/metrics", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        guarded.client().models.list()
    assert [m.id for m in guarded.client(api_key="s3cret").models.list().data] == ["tiny"]
    assert "limit of 2000" in error(
        guarded.post("/v1/completions", json={**ok, "prompt": "x" * 3000}, headers=auth), 413
    )
    assert "limit of 200" in error(guarded.post("/v1/completions", json={**ok, "max_tokens": 201}, headers=auth), 400)
    statuses = []

    def call() -> None:
        statuses.append(guarded.post("/v1/completions", json={**ok, "max_tokens": 150}, headers=auth))

    threads = [threading.Thread(target=call) for _ in range(5)]  # one runs, one waits, the rest are refused
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) >= 2 and 429 in codes, codes
    assert all("queue is full" in error(r, 429) for r in statuses if r.status_code == 429)
    assert guarded.post("/v1/completions", json=ok, headers=auth).json()["usage"]["completion_tokens"] == 4


def test_sigterm_finishes_the_running_request_and_exits_0(guarded, loaded):
    body = {"model": "tiny", "prompt": "once", "max_tokens": 60, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer s3cret"}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            if not events:
                guarded.proc.send_signal(signal.SIGTERM)  # after the first token
            events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    assert "".join(c["text"] for c in chunks) == greedy(loaded, "once", 60)  # the whole answer, after SIGTERM
    assert guarded.proc.wait(timeout=60) == 0


# ------------------------------------------------------------------------------------------ soak
def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


@pytest.mark.slow
def test_soak_mixed_requests_all_answered_and_memory_flat(server, loaded, model_dir):
    """200 requests from 8 threads: plain, streamed, cancelled mid-stream, invalid. Every valid one gets exactly its
    greedy text; afterwards nothing runs, and the server's memory has not grown past warm-up noise."""
    name, prompts = model_dir.name, PROMPTS[:4]
    expected = {(p, n): greedy(loaded, p, n) for p in prompts for n in (1, 3, 5)}
    failures: list[str] = []

    def one(i: int) -> None:
        p, n = prompts[i % 4], (1, 3, 5)[i % 3]
        body = {"model": name, "prompt": p, "max_tokens": n, "temperature": 0}
        kind = i % 4
        if kind == 0:
            text = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
        elif kind == 1:
            with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1] if json.loads(d)["choices"])
        elif kind == 2:  # leaves after the first event
            body = {**body, "max_tokens": 100, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                next(r.iter_lines())
            return
        else:
            r = server.post("/v1/completions", json={**body, "n": 2})
            if r.status_code != 400:
                failures.append(f"invalid request answered {r.status_code}")
            return
        if text != expected[(p, n)]:
            failures.append(f"{p!r} {n}: {text!r} != {expected[(p, n)]!r}")

    def run(count: int) -> None:
        it = iter(range(count))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                one(i)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)

    run(32)  # warm-up: caches grown, allocator settled
    before = rss_kib(server.proc.pid)
    run(168)
    after = rss_kib(server.proc.pid)
    assert not failures, failures[:5]
    deadline = time.monotonic() + 20
    while server.running() != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert after - before < 30_000, (before, after)  # KiB


def test_text_run_is_served_as_it_generates(tmp_path, stand_in):
    """A run trained on text documents ([bos] text [eos], its gpt2 tokenizer adding no bos) answers as `finetune
    generate` does, from [bos] text; its usage counts the bos the model reads."""
    run = text_run(tmp_path, stand_in)
    loaded = inference.load(run, ckpt="last")
    s = Server(run, "--ckpt", "last", "--name", "ft")
    try:
        for prompt in ("the lazy dog", "a cat sat on"):
            out = s.client().completions.create(model="ft", prompt=prompt, max_tokens=8, temperature=0)
            assert out.choices[0].text == greedy(loaded, prompt, 8)
            assert out.usage.prompt_tokens == len(loaded.tokenizer(prompt)["input_ids"]) + 1
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_accepted_connections_send_without_nagle():
    """Each response is written in pieces (headers, body, stream chunks); with Nagle on, every piece after the first
    waited for the client's delayed ACK (40 ms per keep-alive request, measured before the fix)."""
    import socket

    from finetune.serving.server import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    try:
        sock.listen(1)
        assert sock.proto == socket.IPPROTO_TCP  # what asyncio checks before it sets NODELAY itself
        client = socket.create_connection(sock.getsockname(), timeout=10)
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_quantized_serving_answers_as_the_quantized_model_generates(model_dir, tmp_path):
    """``serve --quantize int4`` answers as ``finetune generate --quantize int4``, which is not the float model's
    answer (so the flag reached the model); with ``--adapter`` it is refused, naming both."""
    from finetune.quant import QuantConfig

    quantized = inference.load(model_dir, quantize=QuantConfig(4, 32))
    plain = inference.load(model_dir)
    expected = [greedy(quantized, prompt, 12) for prompt in PROMPTS[:4]]
    assert expected != [greedy(plain, prompt, 12) for prompt in PROMPTS[:4]]
    s = Server(model_dir, "--quantize", "int4", "--group-size", "32", "--name", "q")
    try:
        for prompt, text in zip(PROMPTS[:4], expected, strict=True):
            out = s.client().completions.create(model="q", prompt=prompt, max_tokens=12, temperature=0)
            assert out.choices[0].text == text
    finally:
        s.stop()
    cmd = [sys.executable, "-m", "finetune.cli", "serve", str(model_dir), "--port", "0", "--quantize", "int8",
           "--adapter", f"ft={tmp_path}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert "--quantize: not with --adapter" in done.stderr
