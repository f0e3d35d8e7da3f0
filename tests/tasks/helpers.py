"""Helpers for end-to-end runs through the ``finetune`` command on tiny models and toy data."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from finetune.cli import main

# A tiny from-scratch LLaMA; vocabulary and special ids come from the tokenizer.
TINY_LLAMA = dict(
    model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "and",
    "a",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
]


def cyclic_text(n: int, length: int = 12) -> list[dict]:
    """Rows of a fixed word cycle from different offsets: learnable next-token data."""
    return [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length))} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(tmp_path: Path, task: str, model: dict, data: dict, trainer: dict | None = None, **extra) -> str:
    """Writes a recipe YAML for a tiny CPU run into ``tmp_path``; returns its path."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 20,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **(trainer or {}),
        },
        "model": {"class_path": f"finetune.tasks.{task}", "init_args": model},
        "data": {"cache_dir": str(tmp_path / "cache"), **data},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fit(config: str, *args: str) -> None:
    """A fit that must succeed; with ``--debug`` its errors are raised (tests match them with ``pytest.raises``)."""
    assert main(["fit", "--debug", "--config", config, *args]) == 0


def cli_error(capsys, *argv: str) -> str:
    """``finetune ARGV`` must fail as users see it: exit code 2, one message on stderr and no traceback or
    jsonargparse value dump; returns that stderr."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Namespace(" not in err, err
    return err


def run_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def logged(run: Path, key: str) -> dict[int, float]:
    """``{step: value}`` of one metric in the run's metrics.csv."""
    return {int(r["step"]): float(r[key]) for r in run_metrics(run) if r.get(key) not in ("", None)}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def cli_subprocess(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m finetune.cli ARGS`` in a new process (how Lightning's DDP launcher re-runs it too)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def fit_killed_mid_run(config: str, run: Path, min_step: int) -> int:
    """Runs ``fit --config`` in a subprocess and SIGKILLs it once ``run``'s ``last.ckpt`` holds step ``min_step``
    or later and that step's loss is logged (it is logged just after the checkpoint is written; a kill in between
    would lose that one row). Returns the killed run's checkpointed step."""
    import signal
    import time

    last = run / "checkpoints" / "last.ckpt"
    proc = cli_subprocess("fit", "--config", config)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            step = torch.load(last, weights_only=False)["global_step"] if last.exists() else 0
            if step >= min_step and step - 1 in _logged_now(run):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return torch.load(last, weights_only=False)["global_step"]


def _logged_now(run: Path) -> dict:
    try:
        return logged(run, "train/loss_step")
    except (FileNotFoundError, KeyError):
        return {}


class SaveGrads(Callback):
    """Writes ``{optimizer step: {parameter: gradient}}`` to ``path`` at the end of fit (rank 0): each step's
    gradients as the optimizer saw them (they stay until the next window's first micro-batch zeroes them)."""

    def __init__(self, path: str) -> None:
        self.path, self.grads = path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step and step not in self.grads:  # an optimizer step was just taken
            self.grads[step] = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(self.grads, self.path)


def save_grads(path: Path) -> dict:
    """A recipe's ``trainer.callbacks`` entry for ``SaveGrads``."""
    return {"class_path": "tests.tasks.helpers.SaveGrads", "init_args": {"path": str(path)}}


class SaveMetricCounts(Callback):
    """Writes to ``path``, for each validation epoch after the sanity check, every validation metric's update
    count and, for metrics with a ``confmat`` state, the matrix total (before the task saves and resets them)."""

    def __init__(self, path: str) -> None:
        self.path, self.epochs = path, []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = pl_module.metrics("val").items(keep_base=True)
        counts = {name: m._update_count for name, m in metrics}
        totals = {name: int(m.confmat.sum()) for name, m in metrics if hasattr(m, "confmat")}
        self.epochs.append({"updates": counts, "totals": totals})
        Path(self.path).write_text(json.dumps(self.epochs))
