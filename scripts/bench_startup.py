"""Cold start of the commands: wall time of ``finetune --help`` and of ``finetune generate RUN --prompt x
--max-new-tokens 1`` (its first token) on a quickstart-shaped run folder, in fresh processes, for this tree and a
baseline commit, interleaved over rounds; plus ``python -X importtime``'s total import time and whether Lightning
and peft were imported.

    flock /tmp/finetune-bench.lock python scripts/bench_startup.py            # about 2 minutes
    python scripts/bench_startup.py --baseline ae37403 --rounds 5 --run runs/quickstart

The baseline tree is ``git archive``d into the cache folder; the run folder (when ``--run`` is not given) is the
quickstart recipe trained for 2 steps there (same model, same files; the step count does not change the start).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"--help": ["--help"], "generate": ["generate", "{run}", "--prompt", "x", "--max-new-tokens", "1"]}


def baseline_tree(commit: str, cache: Path) -> Path:
    out = cache / f"tree-{commit}"
    if not (out / "finetune").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def quickstart_run(cache: Path) -> Path:
    run = cache / "quickstart"
    if not (run / "checkpoints" / "best.ckpt").is_file():
        subprocess.run([sys.executable, "-m", "finetune.cli", "fit", "--config", "quickstart",
                        f"--trainer.default_root_dir={run}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                        "--trainer.enable_progress_bar=false"], check=True, env=env_for(ROOT), cwd=cache)  # fmt: skip
    return run


def env_for(tree: Path) -> dict:
    """``tree``'s ``finetune`` first (commands also run with ``cwd=tree``: ``-m`` puts the cwd first on the path)."""
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}


def wall(tree: Path, argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", *argv], env=env_for(tree), cwd=tree, capture_output=True,
                   check=True)  # fmt: skip
    return time.perf_counter() - t0


def imports(tree: Path, argv: list[str]) -> tuple[float, list[str]]:
    """Total import time (s, top-level entries of -X importtime) and which of lightning/peft were imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "finetune.cli", *argv], env=env_for(tree),
                         cwd=tree, capture_output=True, text=True, check=True)  # fmt: skip
    total, heavy = 0, set()
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        if len(m.group(2)) == 1:  # a top-level import (its cumulative time includes its children)
            total += int(m.group(1))
        if m.group(3).split(".")[0] in ("lightning", "peft"):
            heavy.add(m.group(3).split(".")[0])
    return total / 1e6, sorted(heavy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="ae37403", help="the commit to compare with (default: main before the change)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--run", help="a run folder (default: a 2-step quickstart run in the cache folder)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "finetune-bench-startup"))
    args = p.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    trees = {"this tree": ROOT, f"baseline {args.baseline}": baseline_tree(args.baseline, cache)}
    run = Path(args.run).resolve() if args.run else quickstart_run(cache)
    commands = {name: [a.format(run=run) for a in argv] for name, argv in COMMANDS.items()}
    times = {(t, c): [] for t in trees for c in commands}
    t_start = time.perf_counter()
    for _ in range(args.rounds):  # interleaved: each round runs every command on every tree once
        for c, argv in commands.items():
            for t, tree in trees.items():
                times[t, c].append(wall(tree, argv))
    print(f"run folder: {run}; {args.rounds} rounds, interleaved; wall s, median (min-max)\n")
    print("| command | tree | wall s | import s (-X importtime) | imports lightning / peft |")
    print("|---|---|---|---|---|")
    for c, argv in commands.items():
        for t, tree in trees.items():
            xs = times[t, c]
            total, heavy = imports(tree, argv)
            spread = f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
            name = f"`finetune {' '.join(COMMANDS[c]).format(run='RUN')}`"
            print(f"| {name} | {t} | {spread} | {total:.2f} | {', '.join(heavy) or 'neither'} |")
    base = f"baseline {args.baseline}"
    for c in commands:
        ratios = [a / b for a, b in zip(times["this tree", c], times[base, c], strict=True)]
        print(f"\n{c}: this tree / baseline = {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
              end="")  # fmt: skip
    print(f"\n\nbenchmark took {time.perf_counter() - t_start:.0f} s (not counting the run folder)")


if __name__ == "__main__":
    main()
