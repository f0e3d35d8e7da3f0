"""The shared base of every task: model construction on either backend (``finetune.model_spec.ModelSpec``), optimizer
and schedule, gradient checkpointing, the adapter hook, and one ``MetricCollection`` per stage."""

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection

from finetune.adapters import load_spec
from finetune.bundled import resolve_path
from finetune.model_spec import ModelSpec, load_tokenizer
from finetune.models.base import Backbone
from finetune.parallel import tensor_parallel_size
from finetune.tasks.accumulation import TokenWindow, reaches_gradients, scale_gradients
from finetune.tasks.metrics import MetricSpec, load_summed_states, summed_states
from finetune.tasks.optim import Schedule, adamw, lr_lambda, param_groups, warmup_steps

Backend = Literal["scratch", "hf"]
STAGES = ("train", "val", "test")


class Task(ModelSpec, L.LightningModule):
    """Base class; subclasses set the class attributes and implement ``step``.

    Args:
        pretrained: a Hugging Face model folder or hub id whose weights to start from. ``None``: random init from
            ``config``.
        backend: ``scratch`` (our own implementation, ``finetune.models``; HF weights are converted) or ``hf``
            (the ``transformers`` ``AutoModelFor...`` class of the task).
        config: Hugging Face config fields. Without ``pretrained`` they define the random model and must include
            ``model_type``; with it they override the checkpoint's config (e.g. dropout).
        tokenizer: a tokenizer folder or hub id (default: ``pretrained``); or one to train from scratch on a corpus
            (``finetune.tokenizer``, byte-level BPE): ``{train_files: [...], vocab_size: N, special_tokens: [...],
            min_frequency: 2}``, cached by the files' content, so a resumed run reuses it.
        gradient_checkpointing: recompute activations in the backward pass (``use_reentrant=False``).
        compile: ``torch.compile`` each transformer block (regional compilation: the layers share one compiled
            graph, so compiling costs about one layer's time, not the model's). Pays off on GPUs, on long runs.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay, applied to matrices only (not norms, biases or embeddings).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup: linear warmup, in optimizer steps (>= 1) or as a fraction of all steps (< 1).
        schedule: learning-rate decay after warmup, per optimizer step.
        min_lr_ratio: the decayed learning rate's floor, as a fraction of ``lr``.
        metrics: names of the validation/test metrics to compute (default: all the task's metrics).
        adapter: a parameter-efficient adapter (peft): a preset name (``lora``, ``dora``, ``qlora``, ... from
            ``adapters/``), a preset file, or a mapping ``{preset: lora, r: 16, ...}`` whose fields override the
            preset's (also ``--model.adapter.r=16``). Only the adapter (and new heads) train, and checkpoints
            hold only those weights. ``None``: full fine-tuning.
    """

    METRICS: ClassVar[dict[str, MetricSpec]]

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        backend: Backend = "scratch",
        config: dict[str, Any] | None = None,
        tokenizer: str | dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup: float = 0.0,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        metrics: list[str] | None = None,
        adapter: str | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Relative paths that don't exist here are looked up in the bundled recipes folder (bundled data).
        pretrained = resolve_path(pretrained) if pretrained else pretrained
        tokenizer = resolve_path(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.save_hyperparameters()
        if isinstance(tokenizer, dict):  # one to train on the corpus (cached: a resumed run reuses it)
            from finetune.tokenizer.cache import trained_tokenizer

            tokenizer = str(trained_tokenizer(tokenizer, resolve=resolve_path))
        if pretrained is None and not config:
            raise ValueError(
                "model: give `pretrained` (a Hugging Face folder or hub id) or `config` (with `model_type`) to start "
                "from random weights"
            )
        if pretrained is None and "model_type" not in config:
            raise ValueError(f"model.config: a random init needs `model_type`; got keys {sorted(config)}")
        unknown = sorted(set(metrics or ()) - set(self.METRICS))
        if unknown:
            raise ValueError(f"model.metrics: unknown {unknown} for {type(self).__name__}; known: {list(self.METRICS)}")
        self.metric_names = list(metrics) if metrics is not None else list(self.METRICS)
        if tokenizer is None and pretrained is None:
            raise ValueError("model.tokenizer: a model trained from random weights needs a tokenizer folder or hub id")
        self.tokenizer_path = tokenizer or pretrained
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.adapter_spec = load_spec(adapter) if adapter else None
        if self.adapter_spec is not None and pretrained is None:
            raise ValueError("model.adapter: an adapter trains on top of pretrained weights; set model.pretrained")
        # Adapter checkpoints hold only the trained weights; ``on_load_checkpoint`` checks them instead.
        self.strict_loading = self.adapter_spec is None
        self.model: nn.Module | None = None
        self.token_window = TokenWindow()  # gradients weighted by labelled tokens (see ``on_before_optimizer_step``)

    # ------------------------------------------------------------------------------------------- model
    @property
    def datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _check_context(self, model: nn.Module) -> None:
        """The data's ``max_length`` must fit a learned position table (RoPE models only get a warning)."""
        max_length = getattr(self.datamodule, "max_length", None)
        config = getattr(model, "config", None) or getattr(getattr(model, "decoder", None), "config", None)
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if max_length is None or context is None or max_length <= context:
            return
        message = f"data.max_length={max_length} exceeds the model's context of {context} positions"
        if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_parameters", None):
            rank_zero_warn(f"{message}; RoPE extrapolates past it, but quality usually drops")
        else:
            raise ValueError(f"{message}; lower data.max_length")

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the trainer's precision computes in (bf16 for ``bf16-*``, fp16 for ``16-*``, else fp32);
        ``None`` without a trainer."""
        if self._trainer is None:
            return None
        return precision_dtype(str(self.trainer.precision))

    def configure_model(self) -> None:
        """Builds the model once (Lightning calls this on every stage, after the data is set up)."""
        if self.model is not None:
            return
        model = self.build_model().train()  # loaders return eval-mode models; Lightning keeps module modes
        self._check_context(model)
        if self.hparams.gradient_checkpointing:
            _enable_checkpointing(model)
        self.model = self.inject_adapter(model)
        if self.hparams.compile:
            for block in transformer_blocks(self.model):
                block.compile()
        # Keyed "<stage>_metrics": a ModuleDict key "train" would clash with ``nn.Module.train``.
        self.stage_metrics = nn.ModuleDict({f"{s}_metrics": self.make_metrics(s) for s in STAGES})
        self.parallelize(self.model)
        if tensor_parallel_size(self.device_mesh) > 1:  # tensor-parallel ranks see the same rows: count them once
            group = self.device_mesh["data_parallel"].get_group()
            for collection in self.stage_metrics.values():
                for _, metric in collection.items(keep_base=True):
                    metric.process_group = group

    def parallelize(self, model: nn.Module) -> None:
        """Shards ``model`` over the strategy's device mesh (``ModelParallelStrategy``; nothing without one): tensor
        parallelism first, then FSDP2 over the data-parallel dimension (TP x FSDP2, 2D, composes)."""
        if self.device_mesh is None:
            return
        from finetune.parallel import apply_tensor_parallel

        apply_tensor_parallel(model, self.device_mesh, adapter=self.adapter_spec is not None)
        _fully_shard(model, self.device_mesh)

    @property
    def data_parallel_rank(self) -> int:
        """This process's rank among those that see different data (tensor-parallel ranks share theirs)."""
        if tensor_parallel_size(self.device_mesh) > 1:
            return self.device_mesh["data_parallel"].get_local_rank()
        return self.global_rank

    # ----------------------------------------------------------------------------------------- metrics
    def num_classes(self) -> int:
        """The class count of the task's classification-style metrics (vocabulary size for token metrics)."""
        return len(self.tokenizer)

    def stage_metric_names(self, stage: str) -> list[str]:
        """Training tracks the loss only (no argmax over the vocabulary per step); evaluation all ``metrics``."""
        return ["loss"] if stage == "train" else self.metric_names

    def make_metrics(self, stage: str) -> MetricCollection:
        n = self.num_classes()
        metrics = {name: self.METRICS[name].build(n) for name in self.stage_metric_names(stage)}
        # Members are updated one by one with different inputs, so no compute groups.
        return MetricCollection(metrics, prefix=f"{stage}/", compute_groups=False)

    def metrics(self, stage: str) -> MetricCollection:
        return self.stage_metrics[f"{stage}_metrics"]

    def needs(self, stage: str, what: str) -> bool:
        """Whether a metric of ``stage`` needs an expensive output (see ``MetricSpec.needs``)."""
        return any(self.METRICS[n].needs == what for n in self.stage_metric_names(stage))

    def update_metrics(self, stage: str, out: dict) -> None:
        collection = self.metrics(stage)
        for name, metric in collection.items(keep_base=True):
            metric.update(*self.METRICS[name].inputs(out))
        names = [n for n in self.stage_metric_names(stage) if self.METRICS[n].scalar]
        scalars = {f"{stage}/{n}": collection[f"{stage}/{n}"] for n in names}
        self.log_dict(scalars, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=out["batch_size"])

    def _save_array_metrics(self, stage: str) -> None:
        """Computes, saves (``{stage}_{name}.json`` in the run folder) and resets the non-scalar metrics."""
        for name in self.stage_metric_names(stage):
            if self.METRICS[name].scalar:
                continue
            metric = self.metrics(stage)[f"{stage}/{name}"]
            value = metric.compute().tolist()  # synced across processes
            metric.reset()
            self._write_json(f"{stage}_{name}.json", {"labels": self.class_names(), name: value})

    @rank_zero_only
    def _write_json(self, name: str, obj) -> None:
        if self._trainer is None:
            return
        path = Path(self.trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- steps
    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        """Runs the model on ``batch``; returns at least ``loss`` (mean over ``n_tokens``), ``n_tokens`` and
        ``batch_size``, plus whatever the stage's metrics read."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.step(batch, "train", batch_idx)
        self.update_metrics("train", out)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        if not reaches_gradients(self.trainer.strategy):  # DeepSpeed: each micro-batch's own token mean
            rank_zero_warn("DeepSpeed: micro-batches and ranks are weighted equally, not by their labelled tokens")
            self.log("train/loss_step", out["loss"], prog_bar=True, on_step=True, on_epoch=False)
            return out["loss"]
        # The loss summed over the batch's labelled tokens; ``on_before_optimizer_step`` divides the gradients by
        # the tokens of the whole window, so every token weighs the same across micro-batches and ranks.
        loss_sum = out["loss"] * out["n_tokens"]
        self.token_window.add(loss_sum, out["n_tokens"])
        return loss_sum

    def on_before_optimizer_step(self, optimizer) -> None:
        """Turns the accumulated gradient of the window's loss sums into that of its token mean (before clipping),
        and logs that mean as ``train/loss_step``."""
        done = self.token_window.finish(self.trainer.strategy, self.trainer.accumulate_grad_batches)
        if done is None:
            return
        factor, loss = done
        scale_gradients(self.parameters(), factor)
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        saved, self._resumed_train_metrics = getattr(self, "_resumed_train_metrics", None), None
        if saved and tuple(saved["position"]) == (self.current_epoch, self.global_step):
            load_summed_states(self.metrics("train"), saved["states"], primary=self.data_parallel_rank == 0)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.update_metrics("val", self.step(batch, "val", batch_idx))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.update_metrics("test", self.step(batch, "test", batch_idx))

    # Every epoch counts only its own batches: the sanity check's (and an interrupted epoch's) updates are dropped,
    # also from metrics Lightning doesn't reset itself (those saved as files, like the confusion matrix).
    def on_train_epoch_start(self) -> None:
        self.metrics("train").reset()

    def on_validation_epoch_start(self) -> None:
        self.metrics("val").reset()

    def on_test_epoch_start(self) -> None:
        self.metrics("test").reset()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._save_array_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._save_array_metrics("test")

    # FSDP2: evaluation holds the whole model gathered on every rank (see ``hold_gathered``).
    def on_validation_start(self) -> None:
        hold_gathered(self.model, True)

    def on_validation_end(self) -> None:
        hold_gathered(self.model, False)

    def on_test_start(self) -> None:
        hold_gathered(self.model, True)

    def on_test_end(self) -> None:
        hold_gathered(self.model, False)

    def on_predict_start(self) -> None:
        hold_gathered(self.model, True)

    def on_predict_end(self) -> None:
        hold_gathered(self.model, False)

    # --------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        h = self.hparams
        clip_mixed = bool(self.trainer.gradient_clip_val) and "mixed" in str(self.trainer.precision)
        opt = adamw(
            param_groups(self.model, h.weight_decay),
            lr=h.lr,
            betas=tuple(h.betas),
            eps=h.eps,
            allow_fused=not clip_mixed,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = warmup_steps(h.warmup, total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, warmup=warm, total=total, schedule=h.schedule, min_ratio=h.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -------------------------------------------------------------------------------------- checkpoints
    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs) -> dict:
        """With an adapter, only what trains: the frozen base is rebuilt from ``pretrained`` on load. Every strategy
        saves and restores the module through this: Lightning's own (single process, DDP) and DCP's
        ``get_model_state_dict`` under FSDP2 (``ModelParallelStrategy``), whose distributed checkpoint then holds
        the trained shards only and resumes by loading exactly those keys."""
        state = super().state_dict(*args, **kwargs)
        if self.adapter_spec is None or self.model is None:
            return state
        prefix = kwargs.get("prefix", "")
        keep = {prefix + k for k in self.trainable_keys()}
        for k in [k for k in state if k not in keep]:
            del state[k]
        return state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The random state, so a resumed run draws the same dropout masks as an uninterrupted one.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state()
        if self.adapter_spec is not None:
            # What trains (``state_dict``), plus a reference to the frozen base it is rebuilt from on load.
            checkpoint["base"] = {"pretrained": self.hparams.pretrained, "backend": self.hparams.backend}
        if self.model is not None and self._trainer is not None:
            # The epoch's training metrics so far, and where they stand: a run resumed at that very point continues
            # them (its epoch train/loss is the uninterrupted run's), any other start leaves them fresh.
            position = (self.trainer.current_epoch, self.trainer.global_step)
            checkpoint["train_metrics"] = {"position": position, "states": summed_states(self.metrics("train"))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A distributed checkpoint's weights are already loaded by the strategy (the keys of ``state_dict``).
        if (self.adapter_spec is not None or "base" in checkpoint) and "state_dict" in checkpoint:
            _check_trainable(set(checkpoint["state_dict"]), self.trainable_keys() if self.model is not None else None)
        self._resumed_train_metrics = checkpoint.get("train_metrics")
        rng = checkpoint.get("rng")
        if rng is not None and (self._trainer is None or self.trainer.world_size == 1):
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


# -------------------------------------------------------------------------------------------- helpers
def precision_dtype(precision: str) -> torch.dtype:
    """Lightning's precision setting (``bf16-true``, ``bf16-mixed``, ``16-mixed``, ``32-true``, ...) -> the dtype
    its matrix products run in."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def _check_trainable(saved: set[str], expected: set[str] | None) -> None:
    """A trainable-only checkpoint must hold exactly the weights that train here (loading is not strict)."""
    if expected is None or saved == expected:
        return
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    raise ValueError(
        "the checkpoint's trained weights do not match this model's adapter: "
        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; was it trained with another adapter?"
    )


def _enable_checkpointing(model: nn.Module) -> None:
    if isinstance(model, Backbone):
        model.gradient_checkpointing = True
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(f"{type(model).__name__} does not support gradient checkpointing")


def _fully_shard(model: nn.Module, mesh) -> None:
    """FSDP2: shards each transformer block, then the rest (``ModelParallelStrategy`` sets the device mesh)."""
    from torch.distributed.fsdp import fully_shard

    dp = mesh["data_parallel"]
    for block in transformer_blocks(model):
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: ours, or those an HF model names in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ()) | {"PreNormBlock", "PostNormBlock"}
    return [m for m in model.modules() if type(m).__name__ in names]


def hold_gathered(model: nn.Module | None, hold: bool) -> None:
    """FSDP2 only. A sharded module all-gathers its weights in every forward pass, a collective all ranks must make
    together, but in evaluation ranks make different numbers of forward passes: evaluation shards are not padded
    (one rank may have a batch more) and generation stops early. So ``hold=True`` gathers every sharded module once,
    on all ranks together, and keeps it gathered, so that forward passes need no collectives (at the memory cost of
    the whole model per rank while evaluating); ``hold=False`` frees the gathered weights and restores resharding
    after forward, except for the root module, as ``fully_shard`` sets it."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_reshard_after_forward(not hold, recurse=False)
            if hold:
                m.unshard()
            else:
                m.reshard()
    if not hold:
        model.set_reshard_after_forward(False, recurse=False)
