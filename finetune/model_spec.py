"""What a task builds, without Lightning: the model on either backend (pretrained or random, real or on the meta
device), its tokenizer's defaults and the adapter hook. ``finetune.tasks.Task`` inherits ``ModelSpec``; a run
opened for generation (``finetune.runs.load_run(..., for_generation=True)``) builds a ``ModelSpec`` directly, so
that ``finetune generate`` on a run folder imports neither Lightning nor (without an adapter) peft.
"""

import contextlib
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

# The generating tasks a run's config.yaml may name (``model.class_path``) -> (objective, transformers Auto class):
# what opening a run for generation needs to know of its task without importing it. Plain data, checked against
# ``finetune.tasks.TASKS`` by tests/test_model_spec.py (these tasks build their model with ``ModelSpec``'s own code).
GENERATING_TASKS: dict[str, tuple[str, str]] = {
    "finetune.tasks.CausalLM": ("causal_lm", "AutoModelForCausalLM"),
    "finetune.tasks.causal_lm.CausalLM": ("causal_lm", "AutoModelForCausalLM"),
    "finetune.tasks.Preference": ("preference", "AutoModelForCausalLM"),
    "finetune.tasks.preference.Preference": ("preference", "AutoModelForCausalLM"),
    "finetune.tasks.Seq2Seq": ("seq2seq", "AutoModelForSeq2SeqLM"),
    "finetune.tasks.seq2seq.Seq2Seq": ("seq2seq", "AutoModelForSeq2SeqLM"),
}
_PLAIN = (str, int, float, bool, type(None))


class ModelSpec:
    """The model side of a task. Needs ``hparams`` (``pretrained``, ``backend``, ``config``), ``tokenizer`` and
    ``adapter_spec``; subclasses set ``objective`` and ``auto_class`` and may override ``model_overrides``."""

    objective: ClassVar[str]
    auto_class: ClassVar[str]  # the transformers Auto class of the task

    @property
    def is_hf(self) -> bool:
        return self.hparams.backend == "hf"

    @property
    def pad_token_id(self) -> int:
        from finetune.data.collate import pad_id

        return pad_id(self.tokenizer)  # the id the DataModule pads with

    def model_type(self) -> str:
        """The ``model_type`` of the model to build (from ``config`` or the pretrained ``config.json``)."""
        if self.hparams.pretrained is None:
            return self.hparams.config["model_type"]
        from finetune.models.hub import read_config, resolve

        return read_config(resolve(self.hparams.pretrained))["model_type"]

    def model_overrides(self) -> dict:
        """Config fields the task sets on the model (e.g. the labels of a classification head)."""
        return {}

    def class_names(self) -> list[str] | None:
        return None

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the adapter's layers compute in; ``None``: the model's (no trainer decides another)."""
        return None

    def build_model(self, *, empty: bool = False) -> nn.Module:
        """The backbone with the task's head, on the chosen backend, from pretrained weights or random.

        ``empty``: the same structure on the meta device, without reading or initializing weights (for export).
        """
        from finetune.models import from_config, from_hf
        from finetune.models.hub import explain_unreadable_weights, family_of, skeleton

        p, config = self.hparams.pretrained, dict(self.hparams.config or {})
        overrides = {**config, **self.model_overrides()}
        if self.is_hf:
            import transformers
            from safetensors import SafetensorError

            auto = getattr(transformers, self.auto_class)
            if p is not None and not empty:
                try:
                    return auto.from_pretrained(p, dtype=torch.float32, attn_implementation="sdpa", **overrides)
                except SafetensorError as e:  # it names no file
                    raise explain_unreadable_weights(p, e) from e
            if p is not None:
                hf_config = transformers.AutoConfig.from_pretrained(p, **overrides)
            else:
                hf_config = transformers.AutoConfig.for_model(**{**self._tokenizer_defaults(), **overrides})
            with torch.device("meta") if empty else contextlib.nullcontext():
                return auto.from_config(hf_config, attn_implementation="sdpa")
        if p is not None:
            return skeleton(p, **overrides) if empty else from_hf(p, **overrides)
        return from_config({**self._tokenizer_defaults(family_of(config["model_type"]).config_cls), **overrides})

    def _tokenizer_defaults(self, config_cls=None) -> dict:
        """Vocabulary size and special ids of a random model, from the tokenizer (only fields the config has)."""
        tok = self.tokenizer
        d = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
        d |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        d = {k: v for k, v in d.items() if v is not None}
        if config_cls is not None:
            names = {f.name for f in config_cls.__dataclass_fields__.values()}
            d = {k: v for k, v in d.items() if k in names}
        return d

    def inject_adapter(self, model: nn.Module, *, quantize: bool = True) -> nn.Module:
        """Injects the adapter (peft, in place) when there is one: only it and the modules the pretrained checkpoint
        lacks (new heads) then train. ``quantize=False`` leaves a QLoRA base unquantized (export dequantizes)."""
        spec = self.adapter_spec
        if spec is None:
            return model
        from finetune.adapters import checkpoint_weights, inject, new_modules
        from finetune.models.hub import resolve

        heads = new_modules(model, checkpoint_weights(resolve(self.hparams.pretrained), model))
        spec = spec if quantize else dataclasses.replace(spec, quantize=None)
        return inject(model, spec, model_type=self.model_type(), heads=heads, compute_dtype=self.compute_dtype())


class Hparams(dict):
    """A run's hyperparameters, also read as attributes (as Lightning's ``hparams``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class GeneratingSpec(ModelSpec):
    """A generating task's model side, rebuilt from a run's checkpoint hyperparameters without its LightningModule.

    ``hparams`` are the checkpoint's (plain data, checked by the caller); ``tokenizer`` the run's ``tokenizer/``."""

    def __init__(self, class_path: str, hparams: dict, tokenizer: str | None) -> None:
        from finetune.adapters import load_spec
        from finetune.bundled import resolve_path

        self.objective, self.auto_class = GENERATING_TASKS[class_path]
        h = Hparams({"pretrained": None, "backend": "scratch", "config": None, "tokenizer": None, "adapter": None})
        h.update(hparams)
        h["pretrained"] = resolve_path(h.pretrained) if h.pretrained else h.pretrained  # as ``Task`` resolves it
        self.hparams = h
        path = tokenizer or (h.tokenizer if isinstance(h.tokenizer, str) else None) or h.pretrained
        if path is None:
            raise ValueError("the run has no tokenizer/ folder and its hyperparameters name no tokenizer")
        self.tokenizer = load_tokenizer(resolve_path(path))
        self.adapter_spec = load_spec(h.adapter) if h.adapter else None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {name_or_path!r}: {e}") from e


def check_plain(value: object, path: str) -> None:
    """``value`` is plain data (str, numbers, bools, None, lists, string-keyed mappings) naming no ``class_path``:
    what a run folder may hand to a constructor (nothing is instantiated from it)."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        if "class_path" in value:
            raise ValueError(f"{path}: names class_path {value['class_path']!r}; nothing is instantiated from a run")
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: expected string keys, got {k!r}")
            check_plain(v, f"{path}.{k}")
        return
    raise ValueError(
        f"{path}: expected plain data (str, number, bool, None, list, mapping), got {type(value).__name__}"
    )
