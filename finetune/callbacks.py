"""What a run folder holds beyond Lightning's defaults: tokenizer, model config, data stats, curves, throughput,
and checkpoints that are written atomically and always include the final state."""

import csv
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from finetune.parallel import tensor_parallel_size


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

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        """Tensors and plain data only (``weights_only=True`` whatever is asked, local path or URL): a pickled
        payload is refused, never run. An unreadable file is named, with the other checkpoints beside it."""
        try:
            return super().load_checkpoint(path, map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise checkpoint_error(path, e) from e


def checkpoint_error(path, error: BaseException) -> ValueError:
    """A clear error for a checkpoint that ``torch.load(weights_only=True)`` refused or could not read."""
    if isinstance(error, pickle.UnpicklingError):
        detail = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
        return ValueError(
            f"checkpoint {path}: refused to load it: it holds objects other than tensors and plain data, and "
            f"unpickling them could run code{f' ({detail})' if detail else ''}; load only checkpoints a finetune run "
            "wrote"
        )
    hint = ""
    if not str(path).startswith(("http://", "https://")):
        others = sorted(str(p) for p in Path(path).parent.glob("*.ckpt") if p.name != Path(path).name)
        hint = f"; other checkpoints of the run: {', '.join(others)} (pass one as --ckpt_path PATH)" if others else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {first}{hint}")


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
        replicas = trainer.world_size // tensor_parallel_size(getattr(pl_module, "device_mesh", None))
        rate = self._tokens / max(elapsed, 1e-9) * replicas  # data-parallel ranks see equal-size shards
        pl_module.log("train/tokens_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self._tokens, self._t0 = 0, time.perf_counter()


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with the run's bounds in its words and device reads only as often as the run logs.

    The description reads ``Epoch 2/3`` for a run bounded by epochs and ``Epoch 1, step 120/300`` for one bounded
    by steps (Lightning's bars say ``Epoch 0``, or with `rich` ``Epoch 0/-2``, for those). The bar counts every
    batch, but reads its metrics (the step loss, a device tensor: a host sync) only every ``log_every_n_steps``
    batches and at the end of the epoch, not on every step.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(describe_progress(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if bar is None or bar.disable or not self._should_update(n, bar.total):
            return
        bar.n = n
        bar.set_description(describe_progress(trainer), refresh=False)
        if n % max(1, trainer.log_every_n_steps) == 0 or n == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()


def describe_progress(trainer: L.Trainer) -> str:
    """``Epoch e/E`` (1-based; no ``/E`` without an epoch bound), then ``, step s/S`` when steps bound the run."""
    text = f"Epoch {trainer.current_epoch + 1}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        text += f"/{trainer.max_epochs}"
    if trainer.max_steps is not None and trainer.max_steps > 0:
        text += f", step {trainer.global_step}/{trainer.max_steps}"
    return text


class RunFolder(L.Callback):
    """Fills the run folder (``trainer.default_root_dir``): on fit start the tokenizer, the model config and the
    data statistics (and labels); on resume, drops the ``metrics.csv`` rows logged after the checkpoint (a killed
    run logged past it); at the end, PNG curves of every logged metric."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Runs before the callbacks load their states: a run folder that was copied or moved since the checkpoint
        # was written gets its checkpoint callbacks' saved paths moved along, so they keep writing last.ckpt and
        # best.ckpt here (not last-v1.ckpt beside a stale last.ckpt) and compare new scores with the saved best.
        self._resumed_position = (checkpoint.get("train_metrics") or {}).get("position")  # see ``on_train_start``
        states = checkpoint.get("callbacks") or {}
        for callback in trainer.checkpoint_callbacks:
            state = states.get(getattr(callback, "state_key", None))
            old = state.get("dirpath") if isinstance(state, dict) else None
            if old and callback.dirpath and old != callback.dirpath:
                states[callback.state_key] = _moved_checkpoint_state(state, old, callback.dirpath)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_artifacts(trainer, pl_module, Path(trainer.default_root_dir))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # the loop state is restored by now, so global_step is the checkpoint's
            # The task continues the epoch's training metrics saved at this very point (``Task.on_save_checkpoint``):
            # what a clean stop there logged for the unfinished epoch is logged again, over the whole epoch.
            position = getattr(self, "_resumed_position", None)
            continued = position is not None and tuple(position) == (trainer.current_epoch, trainer.global_step)
            metrics = getattr(pl_module, "metrics", None)
            keys = list(metrics("train").keys()) if continued and callable(metrics) else []
            self._truncate_metrics(Path(trainer.default_root_dir) / "metrics.csv", trainer.global_step,
                                   epoch=trainer.current_epoch, epoch_keys=keys)  # fmt: skip

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
    def _truncate_metrics(path: Path, step: int, *, epoch: int | None = None, epoch_keys: list[str] = ()) -> None:
        """A killed run may have logged steps past its last checkpoint; the resumed run logs them again. So does it
        log ``epoch_keys`` of ``epoch`` (the epoch metrics it continues): their values in earlier rows are dropped
        (a clean stop mid-epoch logged them over the epoch's first part), and rows left empty with them."""
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        keep = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) < step]
        for r in keep:
            if epoch_keys and r.get("epoch", "") != "" and int(float(r["epoch"])) == epoch:
                r.update({k: "" for k in epoch_keys if r.get(k, "") != ""})
        keep = [r for r in keep if any(v != "" for k, v in r.items() if k not in ("epoch", "step"))]
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


def _moved_checkpoint_state(state: dict, old: str, new: str) -> dict:
    """A ``ModelCheckpoint`` state with the paths under its old folder ``old`` moved to ``new``."""

    def move(path):
        if not path:
            return path
        rel = os.path.relpath(path, old)
        return path if rel.startswith("..") else os.path.join(new, rel)

    moved = {**state, "dirpath": new}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in moved:
            moved[key] = move(moved[key])
    if isinstance(moved.get("best_k_models"), dict):
        moved["best_k_models"] = {move(k): v for k, v in moved["best_k_models"].items()}
    return moved


class NewEntries:
    """What a fit adds to its run folder, so that a fit that fails before writing a checkpoint can take it back:
    the folder itself when it did not exist, else only the entries it added (never what was there before)."""

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self.existed = self.run.exists()
        self.entries = set(os.listdir(self.run)) if self.existed else set()
        self.checkpoints = self._checkpoints()

    def _checkpoints(self) -> dict[str, int]:
        folder = self.run / "checkpoints"
        return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}

    def remove(self) -> None:
        """Removes what was added, unless a checkpoint was written (the run can then be resumed)."""
        if self._checkpoints() != self.checkpoints or not self.run.exists():
            return
        if not self.existed:
            shutil.rmtree(self.run, ignore_errors=True)
            return
        for name in set(os.listdir(self.run)) - self.entries:
            path = self.run / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
