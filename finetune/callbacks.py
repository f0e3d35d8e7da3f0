"""What a run folder holds beyond Lightning's defaults: tokenizer, model config, data stats, curves, throughput,
and checkpoints that are written atomically and always include the final state."""

import csv
import json
import os
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside the target, syncs it to disk, then renames it over the
    target: a process killed mid-save leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class _ResumableWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it) and its columns, so a resumed run appends to
    the rows before its checkpoint (``RunFolder`` drops the rows logged after it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` written straight into the run folder, flushed at every logging step (a killed run keeps
    what it logged), and continued on resume."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps (or each epoch) and when training ends.

    It monitors nothing, so it never saves stale "best" weights; the ``checkpoint`` callback keeps the best.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)
        self._after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        # When validation follows this batch, save after it instead: Lightning resumes a checkpoint taken before a
        # due validation as if that validation had run, so a kill during it would skip it for good.
        loop, every = trainer.fit_loop, self._every_n_train_steps
        due = every and trainer.global_step % every == 0
        if due and loop._data_fetcher is not None and loop.epoch_loop._should_check_val_fx(loop._data_fetcher):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            if trainer.global_step != self._last_global_step_saved:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_global_step_saved and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_s``: real (non-padding) tokens over wall time, summed over processes, every
    ``log_every_n_steps``. Token counts come from the collator as Python ints, so there is no device sync."""

    def __init__(self) -> None:
        self._tokens, self._t0 = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self._tokens += int(batch.get("num_tokens", batch["input_ids"].numel()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) or trainer.global_step == 0:
            return
        elapsed = time.perf_counter() - self._t0
        rate = self._tokens / max(elapsed, 1e-9) * trainer.world_size  # ranks see equal-size shards
        pl_module.log("train/tokens_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self._tokens, self._t0 = 0, time.perf_counter()


class RunFolder(L.Callback):
    """Fills the run folder (``trainer.default_root_dir``): on fit start the tokenizer, the model config and the
    data statistics (and labels); on resume, drops the ``metrics.csv`` rows logged after the checkpoint (a killed
    run logged past it); at the end, PNG curves of every logged metric."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_artifacts(trainer, pl_module, Path(trainer.default_root_dir))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # the loop state is restored by now, so global_step is the checkpoint's
            self._truncate_metrics(Path(trainer.default_root_dir) / "metrics.csv", trainer.global_step)

    @rank_zero_only
    def _save_artifacts(self, trainer: L.Trainer, pl_module: L.LightningModule, run: Path) -> None:
        run.mkdir(parents=True, exist_ok=True)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is not None:
            # Chat data: the template it was rendered with goes with the tokenizer (and so into every export).
            template = getattr(trainer.datamodule, "used_chat_template", None)
            own = tokenizer.chat_template
            tokenizer.chat_template = template or own
            try:
                tokenizer.save_pretrained(run / "tokenizer")
            finally:
                tokenizer.chat_template = own
        model = getattr(pl_module, "model", None)
        config = getattr(model, "config", None)
        if config is not None:
            d = config.to_dict()
            d.setdefault("backend", getattr(pl_module.hparams, "backend", None))
            (run / "model_config.json").write_text(json.dumps(d, indent=2, default=str) + "\n")
        dm = trainer.datamodule
        for name in ("stats", "label_names"):
            value = getattr(dm, name, None)
            if value:
                (run / f"data_{name}.json").write_text(json.dumps(value, indent=2, default=str) + "\n")

    @staticmethod
    @rank_zero_only
    def _truncate_metrics(path: Path, step: int) -> None:
        """A killed run may have logged steps past its last checkpoint; the resumed run logs them again."""
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        keep = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) < step]
        fields = list(rows[0])
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(keep)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
            plot_metrics(Path(trainer.default_root_dir))


def plot_metrics(run: Path) -> list[Path]:
    """One PNG per logged metric (``plots/<metric>.png``, x = optimizer step) from the run's ``metrics.csv``."""
    path = run / "metrics.csv"
    if not path.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((int(float(row["step"])), float(value)))
    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for key, points in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        file = out / f"{key.replace('/', '_')}.png"
        fig.savefig(file, dpi=80)
        plt.close(fig)
        written.append(file)
    return written
