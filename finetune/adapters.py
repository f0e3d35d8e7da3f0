"""Adapter presets (``adapters/*.yaml``) -> ``peft`` configs, injected into a model of either backend.

Target names are matched against the **Hugging Face** module names on both backends (our module names are mapped
with the family's key map first), so ``target_modules: [dense]`` adapts the same layers of our BERT as of HF's, and
an exported adapter lists HF names that ``PeftModel.from_pretrained`` finds on the HF model.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from finetune.bundled import adapters_dir
from finetune.nn.dropout import speed_up_dropout

# method -> (peft config class, fields it implies, peft's default targets by model type), named: peft is imported
# on first use (``peft_method``), so that opening a run without an adapter (``finetune generate``) does not import it
METHODS = {
    "lora": ("LoraConfig", {}, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    "dora": ("LoraConfig", {"use_dora": True}, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    "rslora": ("LoraConfig", {"use_rslora": True}, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    "ia3": ("IA3Config", {}, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"),
}
QUANTIZE = (None, "nf4")
# peft fields we set from the model (resolved names, layouts), not from a preset
DERIVED = {"fan_in_fan_out", "base_model_name_or_path", "task_type", "peft_type", "revision", "inference_mode"}


def peft_method(method: str) -> tuple[type, dict, dict]:
    """``METHODS[method]`` with peft's objects: (config class, implied fields, default targets by model type)."""
    import peft
    from peft.utils import constants

    cls, implied, targets = METHODS[method]
    return getattr(peft, cls), implied, getattr(constants, targets)


@dataclass(frozen=True)
class AdapterSpec:
    """A resolved preset: the method, our own options, and the ``peft`` config fields (HF module names)."""

    method: str
    fields: dict[str, Any]
    quantize: str | None = None
    source: str = "model.adapter"

    @property
    def config_cls(self) -> type:
        return peft_method(self.method)[0]

    def peft_config(self, **overrides):
        return self.config_cls(**{**peft_method(self.method)[1], **self.fields, **overrides})

    def resolved_config(self, **names):
        """The peft config with explicit module ``names``; the fields that only guide matching are dropped, as the
        names were matched already (``resolve``)."""
        matching = ("layers_to_transform", "layers_pattern", "exclude_modules")
        fields = {k: v for k, v in self.fields.items() if k not in matching}
        return self.config_cls(**{**peft_method(self.method)[1], **fields, **names})

    def default_targets(self, model_type: str) -> list[str]:
        targets = peft_method(self.method)[2].get(model_type)
        if targets is None:
            raise ValueError(f"{self.source}: no default target_modules for model_type {model_type!r}; set them")
        return list(targets)


# ------------------------------------------------------------------------------------------- presets
def presets() -> dict[str, Path]:
    """Bundled preset name -> file."""
    return {p.stem: p for p in sorted(adapters_dir().glob("*.yaml"))}


def find_preset(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = presets()
    if len(path.parts) == 1 and path.name.removesuffix(".yaml") in bundled:
        return bundled[path.name.removesuffix(".yaml")]
    raise FileNotFoundError(f"model.adapter: {name_or_path!r} is not a preset file nor a bundled preset "
                            f"{list(bundled)}")  # fmt: skip


def load_spec(adapter: str | dict) -> AdapterSpec:
    """``lora`` / a path / ``{preset: lora, r: 16, ...}`` (fields override the preset's) -> a checked spec."""
    overrides = {"preset": adapter} if isinstance(adapter, str) else dict(adapter)
    preset = overrides.pop("preset", None)
    fields, source = {}, "model.adapter"
    if preset is not None:
        file = find_preset(str(preset))
        try:
            fields = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{file}: not valid YAML ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{file}: expected a mapping of adapter fields, got {type(fields).__name__}")
        source = str(file)
    fields.update(overrides)
    method = fields.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"{source}: `method` must be one of {list(METHODS)}, got {method!r}")
    quantize = fields.pop("quantize", None)
    if quantize not in QUANTIZE:
        raise ValueError(f"{source}: `quantize` must be one of {list(QUANTIZE)}, got {quantize!r}")
    config_cls = peft_method(method)[0]
    known = {f.name for f in dataclasses.fields(config_cls) if f.init} - DERIVED
    if unknown := sorted(set(fields) - known):
        where = source if not set(unknown) & set(overrides) else "model.adapter"
        raise ValueError(f"{where}: unknown field(s) {unknown} for {method} ({config_cls.__name__}); "
                         f"known: ['method', 'quantize', {', '.join(repr(k) for k in sorted(known))}]")  # fmt: skip
    spec = AdapterSpec(method, fields, quantize, source)
    try:
        spec.peft_config(target_modules=["x"])  # peft's own checks of the values (e.g. r > 0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
    return spec


# ------------------------------------------------------------------------------------------- names
def hf_layout(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(our name, HF key, transposed) of each tensor the HF checkpoint of ``model`` (unadapted) holds."""
    if hasattr(model, "hf_layout"):
        return model.hf_layout()
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():  # an HF model: its names; tied tensors once
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, name, False))
    return out


def checkpoint_weights(folder, model: nn.Module):
    """The tensors of an HF checkpoint folder, lazily, under the HF keys ``hf_layout(model)`` uses."""
    from finetune.models.hub import LazyWeights, _family_of_model

    backbone = getattr(model, "decoder", model)
    if hasattr(backbone, "hf_layout"):
        return LazyWeights(folder, _family_of_model(backbone))
    prefix = getattr(model, "base_model_prefix", "")
    keys = model.state_dict().keys()
    return LazyWeights(folder, prefix=f"{prefix}." if prefix and any(k.startswith(f"{prefix}.") for k in keys) else "")


def new_modules(model: nn.Module, base) -> list[str]:
    """HF names of the modules whose weights the base checkpoint lacks (new heads, a pooler): trained and saved
    beside an adapter (peft's ``modules_to_save``), else they would stay random and be lost on export."""
    return sorted({hf.rpartition(".")[0] for _, hf, _ in hf_layout(model) if hf not in base})


def hf_names(model: nn.Module) -> dict[str, str]:
    """Our module name -> its Hugging Face module name, for every module that has one (all, on an HF model)."""
    to_hf: Callable[[str], str | None] | None = getattr(model, "hf_name", None)
    if to_hf is None:  # a transformers model: names are HF's
        return {n: n for n, _ in model.named_modules() if n}
    out = {}
    for name, _ in model.named_modules():
        hf = to_hf(f"{name}.weight") if name else None  # key maps carry any suffix, so map a parameter name
        if hf is not None:
            out[name] = hf.removesuffix(".weight")
    return out


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ == "Linear4bit"


def output_heads(model: nn.Module) -> set[str]:
    """Our names of the output projections (``lm_head``, BERT's MLM decoder), which ``all-linear`` leaves out, as
    peft leaves out ``get_output_embeddings()``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    named = hf_names(model)
    ours = {n for n, hf in named.items() if hf.endswith(("lm_head", "predictions.decoder"))}
    return ours | {n for n, m in model.named_modules() if head is not None and m is head}


def _matches(hf: str, patterns: list[str] | str | None) -> bool:
    """peft's rule for ``modules_to_save``/``feedforward_modules`` lists: the name or a dotted suffix."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        import re

        return re.fullmatch(patterns, hf) is not None
    return any(hf == p or hf.endswith(f".{p}") for p in patterns)


@dataclass
class Resolved:
    """Which of our modules an adapter touches: our name -> HF name, per role."""

    targets: dict[str, str] = field(default_factory=dict)
    modules_to_save: dict[str, str] = field(default_factory=dict)
    feedforward: dict[str, str] = field(default_factory=dict)


def resolve(model: nn.Module, spec: AdapterSpec, model_type: str, heads: list[str]) -> Resolved:
    """Matches the spec's names (HF names) against the model; ``heads`` (HF names) are new modules to train."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    names = hf_names(model)
    fields = dict(spec.fields)
    mts = [*(fields.get("modules_to_save") or []), *heads]
    out = Resolved(modules_to_save={n: hf for n, hf in names.items() if _matches(hf, mts)})
    inside_saved = lambda n: _inside(n, out.modules_to_save)  # noqa: E731
    targets = fields.get("target_modules")
    if targets is None:
        targets = fields["target_modules"] = spec.default_targets(model_type)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        skip = output_heads(model)
        out.targets = {n: names[n] for n, m in model.named_modules()
                       if n in names and is_linear(m) and n not in skip and not inside_saved(n)}  # fmt: skip
    else:
        config = spec.peft_config(**{**fields, "modules_to_save": mts or None})
        out.targets = {n: hf for n, hf in names.items() if check_target_module_exists(config, hf)}
        out.targets = {n: hf for n, hf in out.targets.items() if not inside_saved(n)}
    if not out.targets:
        linear = sorted({names[n].split(".")[-1] for n, m in model.named_modules() if n in names and is_linear(m)})
        raise ValueError(
            f"{spec.source}: Target modules {targets} not found in the base model. Please check the target modules "
            f"and try again. Linear modules that exist (Hugging Face names, last part): {linear}"
        )
    if spec.method == "ia3":
        ff = fields.get("feedforward_modules")
        if ff is None:
            ff = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
        out.feedforward = {n: hf for n, hf in out.targets.items() if _matches(hf, ff)}
    return out


def training_config(spec: AdapterSpec, model: nn.Module, resolved: Resolved):
    """The peft config to inject into ``model``: our exact module names, so peft's matching is not redone."""
    from transformers.pytorch_utils import Conv1D

    extra = {"modules_to_save": sorted(resolved.modules_to_save) or None}
    if spec.method == "ia3":
        extra["feedforward_modules"] = sorted(resolved.feedforward)
    else:
        extra["fan_in_fan_out"] = any(isinstance(model.get_submodule(n), Conv1D) for n in resolved.targets)
    return spec.resolved_config(target_modules=sorted(resolved.targets), **extra)


def inject(
    model: nn.Module, spec: AdapterSpec, *, model_type: str, heads: list[str], compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """Injects the adapter in place (the model keeps its class); only adapter weights and ``heads`` train.
    ``compute_dtype``: the dtype a quantized base computes in (``quantize_nf4``)."""
    from peft import inject_adapter_in_model

    resolved = resolve(model, spec, model_type, heads)
    if spec.quantize == "nf4":
        from finetune.quantize import quantize_nf4

        quantize_nf4(model, quantized_names(model, resolved), compute_dtype)
    config = training_config(spec, model, resolved)
    for p in model.parameters():
        p.requires_grad_(False)
    model = inject_adapter_in_model(config, model)
    speed_up_dropout(model)  # LoRA's dropouts: the same distribution, a cheaper mask on the CPU
    model.adapter_resolved = resolved  # for export: which HF names were adapted
    return model


def quantized_names(model: nn.Module, resolved: Resolved) -> list[str]:
    """QLoRA quantizes every linear layer of the base but the output heads and the trained heads."""
    skip = output_heads(model) | set(resolved.modules_to_save)
    return [n for n, m in model.named_modules() if is_linear(m) and not _inside(n, skip)]


def _inside(name: str, modules) -> bool:
    """Whether ``name`` is one of ``modules`` or inside one."""
    return any(name == m or name.startswith(f"{m}.") for m in modules)
