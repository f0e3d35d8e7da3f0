"""The serving engine alone, without HTTP: time to first token for a burst of requests that reach it together (a
queue that a freed batch admits at once, or clients that connect in the same instant), and the time of a decode
step of those rows (prompts of different lengths, so a masked, batched step).

    python scripts/bench_engine.py [--model HF_FOLDER] [--extra-layers 0] [--burst 8] [--engines 1] [--rounds 15]
        [--baseline CHECKOUT]

Each round queues ``--burst`` prompts before the engine starts, each asking for ``--tokens`` tokens, and times until
the last of them has its first token, then until the last has its last token (the step time is that over the
tokens after the first). With ``--baseline``, the same is run from another checkout of this repository in a
subprocess of its own, alternating with this one round by round; ratios are taken per pair of rounds. Default model:
the quickstart-shaped random LLaMA of ``bench_serve.py``; ``--extra-layers N`` adds N layers that compute nothing
(``bench_serve.deep_target``), for a deeper model's per-layer costs; ``--engines N`` deals the requests to N
engines of the model (as ``serve --adapter`` runs one per adapter), on one shared thread where the checkout has
``EngineThread``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time", "The little dog ran to the park and", "She said hello", "In the morning the sun",
    "Tom had a red ball. He", "It was a dark night", "The cat", "A bird sang a song in the tree while",
]  # fmt: skip


def _load_off_main(inference, folder: str):
    """Loads in a thread of its own, as ``finetune serve`` does: torch work on the main thread would leave a second
    OpenMP thread pool beside the engine thread's, and libgomp then throttles its spinning, so every small op of
    the engine pays a futex wake-up (a decode step 3.6x slower on 2 cores)."""
    box = {}
    loader = threading.Thread(target=lambda: box.setdefault("loaded", inference.load(folder)))
    loader.start()
    loader.join()
    return box["loaded"]


def one_round(folder: str, burst: int, tokens: int, n_engines: int = 1) -> tuple[float, float]:
    """(ms from the engine's start to the last first token, ms per decode step after it) for ``burst`` requests,
    dealt in turn to ``n_engines`` engines of the same model (as ``serve --adapter`` runs several)."""
    from finetune import inference
    from finetune.generation import SamplingConfig
    from finetune.serving.engine import Engine, Request
    from finetune.serving.text import TextOut

    loaded = one_round.loaded = getattr(one_round, "loaded", None) or _load_off_main(inference, folder)
    try:  # one thread for every engine, as serve runs them (a checkout from before it gives each engine its own)
        from finetune.serving.engine import EngineThread

        shared = {"thread": EngineThread()}
    except ImportError:
        shared = {}
    engines = [Engine(loaded.model, max_batch=burst, max_queue=burst, **shared) for _ in range(n_engines)]
    firsts, lasts = {}, {}
    done = threading.Event()  # waited on, not polled: a polling thread would take the GIL from the engine's steps

    def emit(event: dict, i: int) -> None:
        now = time.perf_counter()
        firsts.setdefault(i, now)
        if "finish_reason" in event:
            lasts[i] = now
            if len(lasts) == burst:
                done.set()

    for i in range(burst):
        ids = loaded.encode(PROMPTS[i % len(PROMPTS)])
        sampling = SamplingConfig(max_new_tokens=tokens)
        engines[i % n_engines].submit(Request(ids, sampling, [], TextOut(loaded.tokenizer, []),
                                              lambda e, i=i: emit(e, i)))  # fmt: skip
    start = time.perf_counter()
    for engine in engines:
        engine.start()
    done.wait(timeout=120)
    for engine in engines:
        engine.stop(timeout=10)
    first, last = max(firsts.values()), max(lasts.values())
    return 1000 * (first - start), 1000 * (last - first) / (tokens - 1)


def worker(folder: str, burst: int, tokens: int, n_engines: int) -> None:
    """Serves rounds over stdin/stdout: a line in, a JSON pair out (so the baseline's imports are its own)."""
    import finetune

    print(f"bench_engine worker: finetune from {Path(finetune.__file__).parent}", file=sys.stderr)
    one_round(folder, burst, tokens, n_engines)  # warm-up
    for _ in sys.stdin:
        print(json.dumps(one_round(folder, burst, tokens, n_engines)), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face folder (default: a random quickstart-shaped LLaMA)")
    p.add_argument("--extra-layers", type=int, default=0, help="layers added that compute nothing (a deeper model)")
    p.add_argument("--burst", type=int, default=8)
    p.add_argument("--tokens", type=int, default=33, help="tokens each request asks for")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--baseline", metavar="CHECKOUT", help="also time another checkout of this repository")
    p.add_argument("--engines", type=int, default=1, help="engines of the model the requests are dealt to (serve's "
                   "--adapter runs one per adapter)")  # fmt: skip
    p.add_argument("--worker", nargs=4, metavar=("FOLDER", "BURST", "TOKENS", "ENGINES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], *map(int, args.worker[1:]))
        return 0
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_serve import deep_target, model_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, Path(tmp) / "model")
        if args.extra_layers:
            folder = deep_target(folder, Path(tmp) / "deep", args.extra_layers)
        checkouts = {"this checkout": ROOT} | ({f"@ {args.baseline}": Path(args.baseline)} if args.baseline else {})
        procs = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(folder),
                    str(args.burst),
                    str(args.tokens),
                    str(args.engines),
                ],
                cwd=path,
                env={**os.environ, "PYTHONPATH": str(path.resolve())},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for name, path in checkouts.items()
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
        for _ in range(args.rounds):
            for name, proc in procs.items():  # interleaved: a busy moment hits both
                proc.stdin.write("\n")
                proc.stdin.flush()
                times[name].append(tuple(json.loads(proc.stdout.readline())))
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=30)

    def spread(xs: list[float], fmt: str) -> str:
        return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"

    print(f"burst of {args.burst} queued requests of {args.tokens} tokens for {args.engines} engine(s), {args.rounds} "
          "rounds; median (min-max)\n")  # fmt: skip
    print("| checkout | last first token, ms | decode step, ms |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {spread([t[0] for t in ts], '.1f')} | {spread([t[1] for t in ts], '.2f')} |")
    if args.baseline:
        pairs = list(zip(times["this checkout"], times[f"@ {args.baseline}"], strict=True))
        for what, k in (("first tokens", 0), ("decode steps", 1)):
            print(f"\nthis checkout's {what}: {spread([b[k] / a[k] for a, b in pairs], '.2f')}x faster")
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
