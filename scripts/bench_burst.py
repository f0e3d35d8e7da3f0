"""Time to first token for a burst of requests that reach the serving engine together (a queue that a freed batch
admits at once, or clients that connect in the same instant), at the engine, without HTTP.

    python scripts/bench_burst.py [--model HF_FOLDER] [--burst 8] [--rounds 15] [--baseline CHECKOUT]

Each round queues ``--burst`` prompts of different lengths before the engine starts and times until the last of
them has its first token. With ``--baseline``, the same is run from another checkout of this repository in a
subprocess of its own, alternating with this one round by round; the ratio is taken per pair of rounds. Default
model: the quickstart-shaped random LLaMA of ``bench_serve.py``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time", "The little dog ran to the park and", "She said hello", "In the morning the sun",
    "Tom had a red ball. He", "It was a dark night", "The cat", "A bird sang a song in the tree while",
]  # fmt: skip


def one_round(folder: str, burst: int) -> float:
    """Milliseconds from the engine's start to the last first token of ``burst`` queued requests."""
    from finetune import inference
    from finetune.generation import SamplingConfig
    from finetune.serving.engine import Engine, Request
    from finetune.serving.text import TextOut

    loaded = one_round.loaded = getattr(one_round, "loaded", None) or inference.load(folder)
    engine, firsts = Engine(loaded.model, max_batch=burst, max_queue=burst), {}
    for i in range(burst):
        emit = lambda e, i=i: firsts.setdefault(i, time.perf_counter())  # noqa: E731
        ids = loaded.encode(PROMPTS[i % len(PROMPTS)])
        engine.submit(Request(ids, SamplingConfig(max_new_tokens=2), [], TextOut(loaded.tokenizer, []), emit))
    start = time.perf_counter()
    engine.start()
    while len(firsts) < burst:
        time.sleep(1e-4)
    engine.stop(timeout=10)
    return 1000 * (max(firsts.values()) - start)


def worker(folder: str, burst: int) -> None:
    """Serves rounds over stdin/stdout: a line in, a time out (so the baseline's imports are its own)."""
    import finetune

    print(f"bench_burst worker: finetune from {Path(finetune.__file__).parent}", file=sys.stderr)
    one_round(folder, burst)  # warm-up
    for _ in sys.stdin:
        print(one_round(folder, burst), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face folder (default: a random quickstart-shaped LLaMA)")
    p.add_argument("--burst", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--baseline", metavar="CHECKOUT", help="also time another checkout of this repository")
    p.add_argument("--worker", nargs=2, metavar=("FOLDER", "BURST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return 0
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_serve import model_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(model_folder(args.model, Path(tmp) / "model"))
        checkouts = {"this checkout": ROOT} | ({f"@ {args.baseline}": Path(args.baseline)} if args.baseline else {})
        procs = {
            name: subprocess.Popen(
                [sys.executable, __file__, "--worker", folder, str(args.burst)],
                cwd=path,
                env={**os.environ, "PYTHONPATH": str(path.resolve())},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for name, path in checkouts.items()
        }
        times: dict[str, list[float]] = {name: [] for name in procs}
        for _ in range(args.rounds):
            for name, proc in procs.items():  # interleaved: a busy moment hits both
                proc.stdin.write("\n")
                proc.stdin.flush()
                times[name].append(float(proc.stdout.readline()))
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=30)

    def spread(xs: list[float], fmt: str) -> str:
        return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"

    print(f"burst of {args.burst} queued requests, {args.rounds} rounds; median (min-max)\n")
    print("| checkout | last first token, ms |\n|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {spread(xs, '.1f')} |")
    if args.baseline:
        ratios = [b / a for a, b in zip(times["this checkout"], times[f"@ {args.baseline}"], strict=True)]
        print(f"\nthis checkout: {spread(ratios, '.2f')}x faster")
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
