"""Tensor parallelism and FSDP2 on CPU processes (gloo) against one process: tokens/s and per-process peak memory.

    python scripts/bench_parallel.py                # the default below: 1 process, TP 2, FSDP2 2, one after another
    options: --hidden 384 --intermediate 1024 --layers 48 --heads 6 --kv-heads 2 --vocab 4000 --batch 2 --seq 64
             --warmup 1 --steps 3 --threads 1 --settings one tp2 fsdp2 --json FILE

Every setting trains the CausalLM task under the Lightning Trainer (``ModelParallelStrategy`` for the 2-process
ones, started by ``torchrun``) from one random HF LLaMA checkpoint, full fine-tuning in fp32, on the same global
batches: TP ranks both take the whole batch (they split the model), FSDP2 ranks half of it each. Each process is one
"device" of ``--threads`` threads (default 1 core), so a 2-process setting uses twice the cores of one process, as
two GPUs are twice one. The default model is one whose weights and optimizer state outweigh its activations (a
small batch): what sharding is for.

Measured (with ``bench_train``'s meters): tokens/s of the global batch from the median step time of ``--steps`` steps
after ``--warmup``; per-process peak memory of one further step: this rank's weights, gradients and optimizer state
(its local shards) when the step starts plus the profiler's highest running total of allocations during the step.
Settings run one after another, not interleaved: on a shared machine, speed ratios are noisy; memory is not.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train  # noqa: E402  (scripts/ side by side: its checkpoint maker, batches and meters)

SETTINGS = {  # name -> (processes, data_parallel_size, tensor_parallel_size)
    "one": (1, 1, 1),
    "tp2": (2, 1, 2),
    "fsdp2": (2, 2, 1),
}
LABELS = {"one": "1 process", "tp2": "TP 2 (x DP 1)", "fsdp2": "FSDP2 2 (x TP 1)"}


def local_bytes(model, optimizer) -> int:
    """Bytes of this rank's weights, gradients, buffers and optimizer state: the local shards of DTensors."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {}
    for t in map(local, tensors):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class LocalPeak(bench_train.PeakMemory):
    """``bench_train``'s CPU meter, counting the state a rank holds by its local shards."""

    def start(self, model, optimizer) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.base = local_bytes(model, optimizer)
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()


class _Solo:
    """No baton: a setting's processes run alone (see the module docstring)."""

    def take(self) -> None:
        pass

    def pass_on(self) -> None:
        pass


def _rank_batch(batch: dict, rank: int, replicas: int) -> dict:
    """This data-parallel rank's rows of a global batch."""
    return {k: v[rank::replicas] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}


def worker(a) -> None:
    """One process of a setting (under torchrun for 2 processes): trains and writes its step times and peak."""
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from finetune.tasks import CausalLM

    n, dp, tp = SETTINGS[a.worker]
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    steps = bench_train.Steps(argparse.Namespace(**{**vars(a), "device": "cpu"}), _Solo())
    steps.meter = LocalPeak("cpu")

    strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp) if n > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=n, strategy=strategy, max_steps=a.warmup + a.steps + 1, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=False, callbacks=[bench_train.measure(a, steps)],
    )  # fmt: skip
    data = [_rank_batch(b, rank // tp, dp) for b in bench_train.finetune_batches(a)]
    loader = DataLoader([data[i % len(data)] for i in range(a.warmup + a.steps + 1)], batch_size=None)
    trainer.fit(CausalLM(pretrained=a.folder, lr=1e-4), train_dataloaders=loader)
    Path(a.out, f"{a.worker}-{rank}.json").write_text(json.dumps({"step_s": steps.times, "peak": steps.peak}))


def run_setting(a, name: str, out: str) -> list[dict]:
    """All processes of one setting; each rank's results."""
    n = SETTINGS[name][0]
    me = [str(Path(__file__).resolve()), "--worker", name, "--folder", a.folder, "--out", out]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k in ARGS]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
    subprocess.run(
        [*(launch or [sys.executable]), *me, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    )
    return [json.loads(Path(out, f"{name}-{r}.json").read_text()) for r in range(n)]


# 41M parameters (650 MB of fp32 weights, gradients and AdamW state) in many small layers, so that what FSDP2 holds
# gathered at a time (a block or two, the root's embedding and head) is small beside a rank's shard.
ARGS = {"hidden": 384, "intermediate": 1024, "layers": 48, "heads": 6, "kv_heads": 2, "vocab": 4000, "batch": 2,
        "seq": 64, "warmup": 1, "steps": 3, "threads": 1}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in ARGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    results = {}
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        a.folder = folder
        bench_train.make_checkpoint(a, Path(folder))
        for name in a.settings:
            ranks = run_setting(a, name, out)
            step = max(statistics.median(r["step_s"]) for r in ranks)  # a step ends when its slowest rank does
            results[name] = {"tokens_per_s": a.batch * a.seq / step, "peak": max(r["peak"] for r in ranks)}
            print(f"  {LABELS[name]}: {results[name]['tokens_per_s']:.0f} tokens/s, peak per process "
                  f"{results[name]['peak'] / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    print(table(a, results))


def table(a, results: dict) -> str:
    """The markdown table, each setting's speed and per-process memory as ratios to one process."""
    lines = [
        f"LLaMA hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} "
        f"KV, vocab {a.vocab}; global batch {a.batch} x {a.seq} tokens; full fine-tuning, fp32; CPU (gloo), "
        f"{a.threads} thread(s) per process; torch {torch.__version__}; median of {a.steps} steps after {a.warmup}",
        "",
        "| setting | tokens/s | vs 1 process | peak MiB per process | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    ref = results.get("one")
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        memory = f"{r['peak'] / ref['peak']:.2f}x" if ref else "-"
        lines.append(f"| {LABELS[name]} | {r['tokens_per_s']:.0f} | {speed} | {r['peak'] / 2**20:.0f} | {memory} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
