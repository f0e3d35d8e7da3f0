"""Benchmark ``finetune serve`` under load, side by side with what a user would otherwise run, on one model folder.

    python scripts/bench_serve.py [--model HF_FOLDER] [--tokens 32] [--requests 16] [--levels 1 2 4 8] [--rounds 3]
        [--no-hf] [--baseline CHECKOUT] [--draft-levels 1 8] [--draft-layers 28] [--only-draft]

Traffic goes to 127.0.0.1 only. Every request asks for exactly ``--tokens`` tokens (the benchmark's copy of the
model has no EOS, so no request ends early), streamed through the ``openai`` async client; each concurrency level
sends ``--requests`` requests. Rows: offline ``finetune generate`` one prompt at a time (inference.complete, what the
command runs), ``finetune serve`` (continuous batching, --max-batch 8), ``finetune serve --max-batch 1`` (what
batching buys), and ``transformers serve`` on the same folder; then ``finetune serve`` on a deeper target with and
without ``--draft`` the model (see ``deep_target``). Default model: a random LLaMA of the quickstart's shape (1M
parameters) with the quickstart tokenizer. Every server stays up for the whole run, and each of ``--rounds`` rounds
measures all of them, so a busy moment of the machine hits every row; the table gives medians and (min-max) over
rounds, and each ratio is taken within a round.
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


def model_folder(src: str | None, out: Path) -> Path:
    """A copy of ``src`` (or the quickstart-shaped random LLaMA) without EOS ids, so every request runs to N."""
    import torch
    import transformers as T

    if src:
        shutil.copytree(src, out)
    else:
        tok = T.AutoTokenizer.from_pretrained(ROOT / "recipes/data/quickstart/tokenizer")
        config = T.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=True)  # fmt: skip
        torch.manual_seed(0)
        T.LlamaForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        f = out / name
        if f.is_file():
            d = json.loads(f.read_text())
            d["eos_token_id"] = None
            f.write_text(json.dumps(d))
    return out


def deep_target(small: Path, out: Path, extra_layers: int) -> Path:
    """``small`` with ``extra_layers`` more decoder layers whose output projections (o_proj, down_proj) are zero: the
    same function (a zero layer adds 0 to the residual stream), at the cost of the deeper model. As the target of
    ``small`` drafting for it, every proposal is kept: the best case of speculative decoding, on random weights."""
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(small)
    config = model.config
    n = config.num_hidden_layers
    config.num_hidden_layers = n + extra_layers
    torch.manual_seed(1)
    deep = T.LlamaForCausalLM(config)
    missing, unexpected = deep.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(int(k.split(".")[2]) >= n for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in deep.model.layers[n:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    deep.save_pretrained(out)
    T.AutoTokenizer.from_pretrained(small).save_pretrained(out)
    for name in ("generation_config.json",):
        if (small / name).is_file():
            shutil.copy(small / name, out / name)
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def row(name: str, level: int, wall: float, results: list[dict], errors: int) -> dict:
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"server": name, "concurrency": level, "req/s": len(results) / wall, "tok/s": tokens / wall,
            "ttft": [pct(ttft, q) for q in (50, 90, 99)], "itl": [pct(itl, q) for q in (50, 90, 99)],
            "errors": errors, "tokens": tokens}  # fmt: skip


def offline(folder: Path, n: int, requests: int) -> dict:
    """``finetune generate`` one prompt at a time, timed per token through its streamer."""
    from finetune import inference

    loaded = inference.load(folder)
    sampling = inference.Sampling(n, 0.0, None, None, 0)
    inference.complete(loaded, PROMPT, sampling)  # warm-up
    results, t0 = [], time.perf_counter()
    for _ in range(requests):
        times, start = [], time.perf_counter()
        inference.complete(loaded, PROMPT, sampling, streamer=lambda _, t=times: t.append(time.perf_counter()))
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        results.append({"ttft": times[0] - start, "itl": gaps, "tokens": len(times)})
    return row("offline finetune generate", 1, time.perf_counter() - t0, results, 0)


def start(cmd: list[str], url_of, health: str, timeout: float = 300):
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = url_of(proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(url + health, timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not come up in {timeout}s")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def level(url: str, model: str, n: int, requests: int, concurrency: int) -> tuple[float, list[dict], int]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", timeout=300, max_retries=0)
    sem, results, errors = asyncio.Semaphore(concurrency), [], 0

    async def one() -> None:
        nonlocal errors
        async with sem:
            start, times, usage = time.perf_counter(), [], None
            try:
                stream = await client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=n, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        times.append(time.perf_counter())
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
            except Exception:  # noqa: BLE001  (counted)
                errors += 1
                return
            if not times:
                errors += 1
                return
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            results.append({"ttft": times[0] - start, "itl": gaps, "tokens": usage or len(times)})

    await asyncio.gather(*(one() for _ in range(min(concurrency, 2))))  # warm-up
    results.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    await client.close()
    return time.perf_counter() - t0, results, errors


def ours_url(proc) -> str:
    line = proc.stdout.readline()
    return "http://127.0.0.1:" + re.search(r":(\d+)\s*$", line).group(1)


def summarize(rounds: list[list[dict]]) -> list[str]:
    """A markdown table of the rounds: per server and level, the median over rounds (min-max) of output tokens/s and
    the p50 time to first token and inter-token latency; then each row's ratio to offline generate at concurrency 1,
    and each server's tokens/s at the top level over concurrency 1, computed within each round (the rounds
    interleave every server, so a busy moment hits all of them)."""
    import statistics

    def spread(xs: list[float], fmt: str) -> str:
        return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"

    keys = list(dict.fromkeys((r["server"], r["concurrency"]) for r in rounds[0]))
    at = [{(r["server"], r["concurrency"]): r for r in rnd} for rnd in rounds]
    base = "offline finetune generate", 1
    lines = [f"{len(rounds)} rounds; median (min-max) over rounds", "",
             "| server | concurrency | output tok/s | vs offline generate | TTFT p50 ms | ITL p50 ms | ITL p99 ms "
             "| errors |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in keys:
        rs = [a[key] for a in at if key in a]
        ratio = [a[key]["tok/s"] / a[base]["tok/s"] for a in at if key in a and base in a]
        vs = f"{spread(ratio, '.2f')}x" if "target" not in key[0] else "(another model)"
        lines.append(
            f"| {key[0]} | {key[1]} | {spread([r['tok/s'] for r in rs], '.0f')} | {vs} "
            f"| {spread([1000 * r['ttft'][0] for r in rs], '.1f')} | {spread([1000 * r['itl'][0] for r in rs], '.2f')} "
            f"| {spread([1000 * r['itl'][2] for r in rs], '.2f')} | {sum(r['errors'] for r in rs)} |"
        )
    levels = sorted({c for _, c in keys})
    for name in dict.fromkeys(n for n, _ in keys):  # what batching buys: the top level over concurrency 1, per round
        top, one = (name, levels[-1]), (name, 1)
        if top != one and all(top in a and one in a for a in at) and "offline" not in name:
            ratio = [a[top]["tok/s"] / a[one]["tok/s"] for a in at]
            lines.append(f"\n{name}: {spread(ratio, '.2f')}x the tokens/s at concurrency {top[1]} over concurrency 1")
    for key in keys:  # --draft against the same target without it, within each round
        plain = key[0].partition(", --draft")[0], key[1]
        if plain != key and all(plain in a for a in at):
            ratio = [a[key]["tok/s"] / a[plain]["tok/s"] for a in at if key in a]
            lines.append(f"\n{key[0]} at concurrency {key[1]}: {spread(ratio, '.2f')}x the tokens/s without --draft")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face folder (default: a random quickstart-shaped LLaMA)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every server at every level")
    p.add_argument("--no-hf", action="store_true", help="leave out transformers serve")
    p.add_argument("--draft-layers", type=int, default=28, help="layers the --draft rows' target adds to the model")
    p.add_argument("--draft-levels", type=int, nargs="*", default=[1, 8], help="levels of the --draft rows (none: "
                   "leave them out)")  # fmt: skip
    p.add_argument("--baseline", metavar="CHECKOUT", help="also `finetune serve` from another checkout of this "
                   "repository (before/after a change, measured in the same rounds)")  # fmt: skip
    p.add_argument("--only-draft", action="store_true", help="only the --draft rows (and offline generate)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    t_start = time.perf_counter()
    rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, Path(tmp) / "model")
        ours = [sys.executable, "-m", "finetune.cli", "serve", str(folder), "--port", "0", "--name", "m"]
        servers = [
            ("finetune serve", [*ours, "--max-batch", "8"], ours_url, "m"),
            ("finetune serve --max-batch 1", [*ours, "--max-batch", "1"], ours_url, "m"),
        ]
        if args.baseline:
            env = ["env", f"PYTHONPATH={Path(args.baseline).resolve()}"]
            servers.append((f"finetune serve @ {args.baseline}", [*env, *ours, "--max-batch", "8"], ours_url, "m"))
        if args.only_draft:
            servers = []
        if args.draft_levels:
            deep = deep_target(folder, Path(tmp) / "deep", args.draft_layers)
            big = [sys.executable, "-m", "finetune.cli", "serve", str(deep), "--port", "0", "--name", "m"]
            servers += [
                (f"finetune serve, {4 + args.draft_layers}-layer target", big, ours_url, "m", args.draft_levels),
                (f"finetune serve, {4 + args.draft_layers}-layer target, --draft the 4-layer model",
                 [*big, "--draft", str(folder)], ours_url, "m", args.draft_levels),
            ]  # fmt: skip
        if not args.no_hf and not args.only_draft:
            port = 18000 + os.getpid() % 1000
            hf = ["transformers", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]
            servers.append(("transformers serve", hf, lambda _p, port=port: f"http://127.0.0.1:{port}", str(folder)))
        running = []  # every server stays up for the whole run; only the one being measured gets traffic
        try:
            for name, cmd, url_of, model, *levels in servers:
                try:
                    proc, url = start(cmd, url_of, "/health")
                except (RuntimeError, AttributeError) as e:
                    print(f"{name}: could not start ({e})", file=sys.stderr)
                    continue
                running.append((name, proc, url, model, levels[0] if levels else args.levels))
            for i in range(args.rounds):
                rows = [offline(folder, args.tokens, args.requests)]
                for name, _, url, model, levels in running:
                    for c in levels:
                        wall, results, errors = asyncio.run(level(url, model, args.tokens, args.requests, c))
                        rows.append(row(name, c, wall, results, errors))
                        print(f"round {i + 1}:", json.dumps(rows[-1]), file=sys.stderr, flush=True)
                rounds.append(rows)
        finally:
            for _, proc, *_ in running:
                stop(proc)
    print("\n".join(summarize(rounds)))
    print(f"\n{args.requests} streamed requests of exactly {args.tokens} tokens per level; "
          f"{time.perf_counter() - t_start:.0f} s in all")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
