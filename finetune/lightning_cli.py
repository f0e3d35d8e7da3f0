"""The LightningCLI of ``finetune fit|validate|test|predict``: recipes over ``Task`` subclasses and the
``DataModule``, one run folder per run. Imported by ``finetune.cli`` only for those commands (it imports
Lightning, torch, transformers and peft)."""

import json
import pickle
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as PLProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from finetune.callbacks import (
    AtomicCheckpointIO,
    LastCheckpoint,
    NewEntries,
    ProgressBar,
    RunCSVLogger,
    RunFolder,
    TokensPerSecond,
    checkpoint_error,
)
from finetune.data import DataModule
from finetune.parallel import tensor_parallel_size
from finetune.sharded import atomic_saves, restore_moved_aside
from finetune.tasks import Task
from finetune.tasks.base import hold_gathered

# Strategies whose checkpoints go through the CheckpointIO plugin (FSDP/DeepSpeed/ModelParallel save their own).
_PLUGIN_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true", "single_device")


def _checkpoint_dir(root: str | None) -> str:
    return str(Path(root or ".") / "checkpoints")


class SaveFitConfig(SaveConfigCallback):
    """Saves the resolved config into the run folder for ``fit`` only: ``validate``/``test``/``predict`` read a
    trained run (often through its own config.yaml plus overrides), and must leave the config that trained it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class FinetuneCLI(LightningCLI):
    """LightningCLI over ``Task`` subclasses and the ``DataModule``, writing everything into one run folder
    (``trainer.default_root_dir``): config.yaml, checkpoints/{best,last}.ckpt, metrics.csv, tensorboard/, plots/,
    tokenizer/, model_config.json, data stats, and the metrics of ``validate``/``test`` as JSON."""

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            model_class=Task,
            subclass_mode_model=True,
            datamodule_class=DataModule,
            save_config_callback=SaveFitConfig,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites the same config
            auto_configure_optimizers=False,  # the task owns its optimizer and schedule
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},  # parse errors are raised; ``main`` prints them in one line
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No ``--weights_only``: every checkpoint loads with weights_only=True (``_prepare_subcommand_kwargs``).
        return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # Lightning unpickles remote checkpoints (URLs) with weights_only=False unless told: tell it, for every path.
        return {**super()._prepare_subcommand_kwargs(subcommand), "weights_only": True}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of a local --ckpt_path (weights_only=True) while parsing.
        try:
            super()._parse_ckpt_path()
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise checkpoint_error(self.config[self.config.subcommand].get("ckpt_path"), e) from e

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best checkpoint, by a chosen metric
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
                "trainer.default_root_dir": "runs/default",
                "trainer.use_distributed_sampler": False,  # the DataModule shards (and resumes) its own order
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        for key in ("checkpoint", "last_checkpoint"):
            parser.link_arguments("trainer.default_root_dir", f"{key}.dirpath", compute_fn=_checkpoint_dir)
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        parser.link_arguments("model.objective", "data.objective", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        root = config.get("default_root_dir") or "."
        if config.get("logger") in (None, True):
            config["logger"] = [
                RunCSVLogger(root),
                TensorBoardLogger(root, name="tensorboard", version="", default_hp_metric=False),
            ]
        strategy = config.get("strategy", "auto")
        atomic_io = isinstance(strategy, str) and strategy in _PLUGIN_STRATEGIES and not config.get("plugins")
        if atomic_io:
            config["plugins"] = [AtomicCheckpointIO()]
        callbacks = [*callbacks, RunFolder(), TokensPerSecond()]
        given = config.get("callbacks") or []
        theirs = [*callbacks, *(given if isinstance(given, list) else [given])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, PLProgressBar) for c in theirs):
            callbacks.append(ProgressBar())  # the run's bounds in words, no host read per step
        trainer = super()._instantiate_trainer(config, callbacks)
        if not atomic_io:  # a strategy that saves its own checkpoints (FSDP2: a folder): through a temporary sibling
            atomic_saves(trainer.strategy)
        return trainer

    # ---------------------------------------------------------------------------------------- subcommands
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def _resolve_ckpt(self) -> None:
        """``--ckpt_path best|last`` from a new process means ``checkpoints/{best,last}.ckpt`` of the run folder, and
        is refused when that does not exist (a mistyped folder must not train from scratch or evaluate nothing)."""
        cfg = self.config_init[self.subcommand]
        name = cfg.get("ckpt_path")
        if name not in ("best", "last") or (name == "best" and self.trainer.checkpoint_callback.best_model_path):
            return
        path = self.run_dir / "checkpoints" / f"{name}.ckpt"
        restore_moved_aside(path)  # a folder checkpoint that a kill mid-swap left aside
        if not path.exists():  # a file, or a folder (FSDP2 distributed checkpoint)
            hint = "; to start a new run there, leave out --ckpt_path" if self.subcommand == "fit" else ""
            raise FileNotFoundError(f"--ckpt_path {name}: nothing to load: {path} does not exist{hint}")
        cfg["ckpt_path"] = str(path)

    def before_fit(self) -> None:
        cfg = self.config_init["fit"]
        existing = sorted((self.run_dir / "checkpoints").glob("*.ckpt"))
        if cfg.get("ckpt_path") is None and existing:
            raise FileExistsError(
                f"run folder {self.run_dir} already holds checkpoints ({', '.join(p.name for p in existing)}): "
                "resume it with --ckpt_path last, or start a new run with --trainer.default_root_dir=NEW_FOLDER"
            )
        self._resolve_ckpt()

    def _run_subcommand(self, subcommand: str) -> None:
        """A command that fails before writing a checkpoint takes back what it added to the run folder (config.yaml,
        tensorboard/, ...): the folder itself when it did not exist before, never what was there."""
        added = NewEntries(self.run_dir)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.is_global_zero:
                added.remove()
            raise

    def after_fit(self) -> None:
        sample = None
        if hasattr(self.model, "sample"):
            # Rank 0 generates alone: under FSDP2 all ranks first gather the weights together (a collective). Under
            # tensor parallelism every rank generates (each layer's forward is a collective); rank 0 prints.
            hold_gathered(self.model.model, True)
            every_rank = tensor_parallel_size(self.model.device_mesh) > 1
            try:
                sample = self.model.sample() if self.trainer.is_global_zero or every_rank else None
            finally:
                hold_gathered(self.model.model, False)
        if not self.trainer.is_global_zero:
            return
        metrics = self.trainer.callback_metrics
        lines = [f"run folder: {self.run_dir}"]
        if "val/loss" in metrics:
            lines.append(f"validation loss: {float(metrics['val/loss']):.4f}")
        best = self.trainer.checkpoint_callback.best_model_path
        if best:
            lines.append(f"best checkpoint: {best}")
        if sample is not None:
            lines.append(f"sample: {sample!r}")
        print("\n".join(lines), flush=True)

    def before_validate(self) -> None:
        self._resolve_ckpt()

    def before_test(self) -> None:
        self._resolve_ckpt()

    def before_predict(self) -> None:
        self._resolve_ckpt()

    def _write_metrics(self, stage: str, prefix: str) -> None:
        if not self.trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(prefix)}
        cfg = self.config_init[self.subcommand]
        out = {"ckpt_path": cfg.get("ckpt_path"), "metrics": values}
        path = self.run_dir / f"{stage}_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{stage} metrics written to {path}: {json.dumps(values)}", flush=True)

    def after_validate(self) -> None:
        self._write_metrics("validate", "val/")

    def after_test(self) -> None:
        self._write_metrics("test", "test/")

    def predict(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """Writes ``predictions.jsonl`` (one row per input row, in input order) into the run folder."""
        batches = self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs) or []
        rows = [r for batch in batches for r in batch]
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            gathered = [None] * self.trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero:
            return
        rows.sort(key=lambda r: r["row"])
        path = self.run_dir / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{len(rows)} predictions written to {path}", flush=True)
