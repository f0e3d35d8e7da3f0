"""``finetune export``: a run folder -> a merged Hugging Face model folder, or a PEFT adapter folder.

The merge streams: the model is planned on the meta device, and each output tensor is read from the base
checkpoint (or the run's checkpoint, for what trained), merged with its adapter by peft's own ``merge`` one layer
at a time, and written into the current shard. Peak memory is about one shard plus the adapter, not the model
(``scripts/bench_export.py``: 0.22x the memory of HF+PEFT ``merge_and_unload`` + ``save_pretrained``).
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from finetune.adapters import checkpoint_weights, hf_layout
from finetune.data.templates import end_of_turn_id, tokenizer_chat_template
from finetune.folders import check_target
from finetune.models.base import Backbone
from finetune.models.hub import _family_of_model, _is_tied, atomic_folder, hf_config, resolve, write_weights
from finetune.sharded import read_sharded_checkpoint
from finetune.tasks import Task, plain_hparams, task_class

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SHARD_SIZE = 5 * 2**30  # as save_pretrained
GENERATING = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")  # the HF classes of tasks that write text
PEFT_TASK_TYPES = {
    "CausalLM": "CAUSAL_LM",
    "Preference": "CAUSAL_LM",
    "Seq2Seq": "SEQ_2_SEQ_LM",
    "Classification": "SEQ_CLS",
}


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """A trained run: its task (rebuilt from the checkpoint's hyperparameters) and the checkpoint."""

    folder: Path
    ckpt: Path
    checkpoint: dict
    task: Task

    def load_model(self) -> Task:
        """The task with its trained model (base + adapter + trained weights), in eval mode, on CPU."""
        self.task.configure_model()
        state = self.checkpoint["state_dict"]
        if self.task.adapter_spec is not None:
            self.task.on_load_checkpoint(self.checkpoint)  # checks the trained keys; loading is then not strict
        self.task.load_state_dict(state, strict=self.task.adapter_spec is None)
        return self.task.eval()

    @property
    def trained(self) -> dict[str, torch.Tensor]:
        """The checkpoint's weights under the model's own names (without the LightningModule's ``model.``)."""
        return {k.removeprefix("model."): v for k, v in self.checkpoint["state_dict"].items()}


def checkpoint_path(run: Path, ckpt: str) -> Path:
    if ckpt in ("best", "last"):
        path = run / "checkpoints" / f"{ckpt}.ckpt"
        if not path.exists():
            have = (
                sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
            )
            raise FileNotFoundError(f"{run}: no checkpoints/{ckpt}.ckpt (checkpoints there: {have or 'none'}); "
                                    "train first, or pass --ckpt last|PATH")  # fmt: skip
        return path
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such checkpoint file")
    return path


def _model_class_path(config_file: Path) -> object:
    """``model.class_path`` of a run's config.yaml (read as plain YAML: no tags, nothing constructed)."""
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{config_file}: cannot read the run's config ({e})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{config_file}: no model.class_path (expected the config.yaml a fit writes)")
    return model["class_path"]


def load_run(run_dir: str | Path, ckpt: str = "best") -> Run:
    """A run folder's task, rebuilt from its checkpoint. The folder is untrusted: only the toolkit's registered
    task classes are built (``task_class``), from the checkpoint's plain-data hyperparameters (``plain_hparams``)."""
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.yaml); give the trainer.default_root_dir of a fit")
    cls = task_class(_model_class_path(config_file), where=str(config_file))  # a registered task, or refused
    path = checkpoint_path(run, ckpt)
    try:
        if path.is_dir():  # FSDP2's distributed checkpoint: consolidated through DCP
            checkpoint = read_sharded_checkpoint(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI's own entries
    hparams = plain_hparams(hparams, cls, where=str(path))
    if (run / "tokenizer").is_dir():
        hparams["tokenizer"] = str(run / "tokenizer")  # as saved at fit start
    task = cls(**hparams)
    if "label_names" in checkpoint:
        task.label_names = list(checkpoint["label_names"])
    return Run(run, path, checkpoint, task)


# ------------------------------------------------------------------------------------------ layouts
def base_weights(task: Task, model: nn.Module):
    if task.hparams.pretrained is None:  # a full fine-tune from random weights: everything is in the checkpoint
        return {}
    return checkpoint_weights(resolve(task.hparams.pretrained), model)


def _backbone(model: nn.Module) -> Backbone:
    return model if isinstance(model, Backbone) else model.decoder


class Values:
    """Output tensors by our name: merged adapter layers, trained tensors, else the frozen base's."""

    def __init__(
        self, run: Run, plain: nn.Module, tuned: nn.Module, *, merge: bool, untied: dict[str, str] | None = None
    ) -> None:
        self.model, self.merge = tuned, merge
        self.untied = untied or {}  # an output head untied from its embedding (see ``untie_trained_pair``)
        self.trained = run.trained
        self.base = base_weights(run.task, plain)
        self.to_hf = {n: (h, t) for n, h, t in hf_layout(plain)}
        spec = run.task.adapter_spec
        self.roundtrip = merge and spec is not None and spec.quantize == "nf4"  # what the QLoRA run computed with
        self._merged: dict[str, dict[str, torch.Tensor]] = {}

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base checkpoint's tensor, in our layout."""
        hf_key, transposed = self.to_hf[name]
        if hf_key not in self.base and name in self.untied:  # a tied checkpoint holds the pair once
            return self.base_tensor(self.untied[name])
        if hf_key not in self.base:
            raise KeyError(f"{hf_key}: neither in the base checkpoint nor trained")
        t = self.base[hf_key]
        return t.t() if transposed else t

    def __call__(self, name: str) -> torch.Tensor:
        owner, _, pname = name.rpartition(".")
        module = self.model.get_submodule(owner) if owner else self.model
        if isinstance(module, BaseTunerLayer):
            return self._merged_layer(owner, module).pop(pname)
        if isinstance(module, ModulesToSaveWrapper):
            if self.merge:
                return module.modules_to_save["default"].state_dict()[pname]
            return self.base_tensor(name)
        if name in self.trained:
            return self.trained[name]
        return self.base_tensor(name)

    def hf(self, name: str, transposed: bool) -> torch.Tensor:
        """Our tensor ``name`` in the HF checkpoint's layout."""
        t = self(name)
        return t.t() if transposed else t

    def _merged_layer(self, owner: str, layer: BaseTunerLayer) -> dict[str, torch.Tensor]:
        """The base layer's tensors, with the adapter merged in by peft (``merge``); computed once per layer."""
        if owner in self._merged:
            return self._merged[owner]
        base = layer.get_base_layer()
        real = {}
        for pname, p in base.named_parameters(recurse=False):
            t = self.base_tensor(f"{owner}.{pname}").float()
            if pname == "weight" and self.roundtrip:
                from finetune.quantize import nf4_roundtrip

                conv1d = type(base).__name__ == "Conv1D"  # quantized as (out, in)
                t = nf4_roundtrip(t.t()).t() if conv1d else nf4_roundtrip(t)
            real[pname] = p
            base._parameters[pname] = nn.Parameter(t, requires_grad=False)
        if self.merge:
            layer.merge(adapter_names=["default"])
        out = {pname: base._parameters[pname].detach() for pname in real}
        for pname, meta in real.items():  # back to meta: only one layer is ever real
            base._parameters[pname] = meta
        layer.merged_adapters.clear()
        self._merged[owner] = out
        return out


def tied_pair(model: nn.Module) -> tuple[str, str] | None:
    """Our (output weight, input embedding weight) names when ``model`` shares one matrix between them."""
    backbone = _scratch_backbone(model)
    if backbone is not None:
        family = _family_of_model(backbone)
        if not family.tied or not _is_tied(backbone, family):
            return None
        prefix = "" if backbone is model else "decoder."
        return f"{prefix}{family.tied[0]}", f"{prefix}{family.tied[1]}"
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    out, inp = (get_out() if callable(get_out) else None), (get_in() if callable(get_in) else None)
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return f"{names[id(out)]}.weight", f"{names[id(inp)]}.weight"


def untie_trained_pair(plain: nn.Module, tuned: nn.Module) -> dict[str, str]:
    """Unties ``plain``'s output head from its embedding when the adapter trains one side of the pair: peft wraps
    that module (``modules_to_save``, or LoRA on the embedding), so the trained model computes with two matrices, the
    trained one and the frozen base's, and a tied export would lose one of them. The merged model then holds both
    (``tie_word_embeddings: false``). Returns {output name: embedding name} (the untied head's base tensor is the
    embedding's, which a tied checkpoint stores once); empty when nothing is untied."""
    pair = tied_pair(plain)
    if pair is None or plain is tuned:
        return {}
    wrapped = lambda n: isinstance(tuned.get_submodule(n.rpartition(".")[0]), (BaseTunerLayer, ModulesToSaveWrapper))  # noqa: E731
    if not any(wrapped(n) for n in pair):
        return {}
    out_name, emb_name = pair
    owner, _, pname = out_name.rpartition(".")
    head = plain.get_submodule(owner)
    setattr(head, pname, nn.Parameter(torch.empty_like(getattr(head, pname)), requires_grad=False))  # (V, C), meta
    (_scratch_backbone(plain) or plain).config.tie_word_embeddings = False
    return {out_name: emb_name}


def _scratch_backbone(model: nn.Module) -> Backbone | None:
    """Our from-scratch backbone of ``model`` (itself, or the decoder under a classifier); None for HF models."""
    backbone = model if isinstance(model, Backbone) else getattr(model, "decoder", None)
    return backbone if isinstance(backbone, Backbone) else None


def plan(plain: nn.Module, dtype: torch.dtype, *, only_in=None) -> tuple[dict, dict]:
    """HF key -> (shape, dtype) and HF key -> (our name, transposed), in the HF checkpoint's order; ``only_in``:
    just the keys that mapping has (the base's, leaving out new heads)."""
    entries, source = {}, {}
    tensors = plain.state_dict(keep_vars=True)
    for name, hf_key, transposed in hf_layout(plain):
        if only_in is not None and hf_key not in only_in:
            continue
        t = tensors[name]
        shape = t.shape[::-1] if transposed else t.shape
        entries[hf_key] = (shape, dtype if t.is_floating_point() else t.dtype)
        source[hf_key] = (name, transposed)
    return entries, source


# ------------------------------------------------------------------------------------------ export
def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: str = "merged",
    ckpt: str = "best",
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> Path:
    """Writes ``out`` (atomically: nothing is left behind on failure). Returns it."""
    if format not in ("merged", "adapter"):
        raise ValueError(f"--format must be merged or adapter, got {format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    check_target(out, overwrite=force, protect=[Path(run_dir)])  # before the (slow) load; again at the rename
    run = load_run(run_dir, ckpt)
    task = run.task
    if format == "adapter" and task.adapter_spec is None:
        raise ValueError(f"{run.folder}: a full fine-tune has no adapter to export; use --format merged")
    plain, tuned = _models(run)
    write = dict(dtype=_dtype(run, dtype), max_shard_size=max_shard_size)
    with atomic_folder(out, overwrite=force, protect=_read_from(run)) as tmp:
        if format == "merged":
            _write_model(run, plain, tuned, tmp, merge=True, **write)
            task.tokenizer.save_pretrained(tmp)
        else:
            base = None
            if not task.is_hf:  # our from-scratch base, written as the HF folder the adapter loads onto
                base = tmp / "base"
                base.mkdir()
                _write_model(run, plain, tuned, base, merge=False, **write)
                task.tokenizer.save_pretrained(base)
            _write_adapter(run, tuned, tmp, base=out.resolve() / "base" if base else None)
            task.tokenizer.save_pretrained(tmp)
    return out


def _read_from(run: Run) -> list[Path]:
    """What an export reads: the run folder, its checkpoint and a local base folder (never replaced by --force)."""
    pretrained = run.task.hparams.pretrained
    base = [Path(pretrained).expanduser()] if pretrained and Path(pretrained).expanduser().exists() else []
    return [run.folder, run.ckpt, *base]


def _dtype(run: Run, name: str | None) -> torch.dtype:
    """``--dtype``, else the base checkpoint's own (``dtype``/``torch_dtype`` in its config), else fp32."""
    if name is not None:
        return DTYPES[name]
    if run.task.hparams.pretrained is None:
        return torch.float32
    config = json.loads((resolve(run.task.hparams.pretrained) / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, stored) if isinstance(getattr(torch, str(stored), None), torch.dtype) else torch.float32


def _models(run: Run) -> tuple[nn.Module, nn.Module]:
    """The run's model on the meta device twice: plain (the output's structure), and with the adapter injected
    and the trained tensors loaded (real), where values are looked up by the same module paths."""
    task = run.task
    plain = task.build_model(empty=True)
    if task.adapter_spec is None:
        return plain, plain
    tuned = task.inject_adapter(task.build_model(empty=True), quantize=False)  # merged from dequantized weights
    _, unexpected = tuned.load_state_dict(run.trained, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{run.ckpt}: weights that this model does not have: {unexpected[:5]}")
    return plain, tuned


def merged_state(run: Run) -> tuple[object, dict[str, torch.Tensor]]:
    """The run's model merged, in memory: its ``transformers`` config and HF-named tensors (for generation)."""
    plain, tuned = _models(run)
    values = Values(run, plain, tuned, merge=True, untied=untie_trained_pair(plain, tuned))
    state = {hf_key: values.hf(name, transposed) for name, hf_key, transposed in hf_layout(plain)}
    return _config(run.task, plain), state


def _write_model(
    run: Run, plain: nn.Module, tuned: nn.Module, folder: Path, *, dtype, max_shard_size: int, merge: bool
) -> None:
    """config.json, generation_config.json (generators), and the weights, streamed shard by shard."""
    untied = untie_trained_pair(plain, tuned) if merge else {}  # an adapter's base/ stays as the base was
    values = Values(run, plain, tuned, merge=merge, untied=untied)
    entries, source = plan(plain, dtype, only_in=None if merge else values.base)
    config = _config(run.task, plain)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    _generation_config(run.task, config, folder)

    write_weights(folder, entries, lambda hf_key: values.hf(*source[hf_key]), max_shard_size)


def _config(task: Task, model: nn.Module):
    """The ``transformers`` config of the exported model, naming the task's HF class in ``architectures``."""
    import transformers

    if task.is_hf:
        config = model.config
    else:
        config = hf_config(_backbone(model))
        for k, v in task.model_overrides().items():
            if k != "head":  # ours (BERT's head kind); hf_config already maps it
                setattr(config, k, v)
        if task.objective == "classification":
            labels = task.class_names()
            config.id2label = dict(enumerate(labels))
            config.label2id = {v: k for k, v in config.id2label.items()}
            config.pad_token_id = task.pad_token_id  # HF pools the last token that is not padding
    auto = getattr(transformers, task.auto_class)
    config.architectures = [auto._model_mapping[type(config)].__name__]
    return config


def _generation_config(task: Task, config, folder: Path) -> None:
    if task.auto_class not in GENERATING:
        return
    from transformers import GenerationConfig

    base = resolve(task.hparams.pretrained) / "generation_config.json" if task.hparams.pretrained else None
    if base is not None and base.is_file():  # the base's sampling defaults, as shipped
        shutil.copyfile(base, folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    # The chat template's end of turn stops generation too (eos_token_id becomes a list, as Llama 3 ships it).
    tok = task.tokenizer
    eot = end_of_turn_id(tok, tokenizer_chat_template(tok))
    if eot is not None:
        generation = GenerationConfig.from_pretrained(folder)
        eos = generation.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if eot not in eos:
            generation.eos_token_id = [*eos, eot]
            generation.save_pretrained(folder)


def _write_adapter(run: Run, model: nn.Module, folder: Path, *, base: Path | None) -> None:
    """adapter_config.json (HF module names) and adapter_model.safetensors (HF keys), as ``save_pretrained``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    task, spec = run.task, run.task.adapter_spec
    resolved = model.adapter_resolved
    hf_name = getattr(model, "hf_name", lambda n: n)
    state = get_peft_model_state_dict(model)
    tensors = {}
    for key, t in state.items():
        hf = hf_name(key)
        if hf is None:
            raise KeyError(f"{key}: no Hugging Face name")
        tensors[f"base_model.model.{hf}"] = t.detach().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})

    extra = {
        "target_modules": sorted(resolved.targets.values()),
        "modules_to_save": sorted(resolved.modules_to_save.values()) or None,
        "base_model_name_or_path": str(base) if base else _hub_name(task.hparams.pretrained),
        "task_type": PEFT_TASK_TYPES.get(type(task).__name__) or PEFT_TASK_TYPES.get(task.objective),
    }
    if spec.method == "ia3":
        extra["feedforward_modules"] = sorted(resolved.feedforward.values())
    else:
        extra["fan_in_fan_out"] = _hf_is_conv1d(task, model, resolved)
    spec.resolved_config(**extra).save_pretrained(folder)


def _hf_is_conv1d(task: Task, model: nn.Module, resolved) -> bool:
    """Whether the adapted layers are ``Conv1D`` in HF (GPT-2): peft then needs ``fan_in_fan_out``. Ours are
    ``nn.Linear``; the key map marks the weights HF stores transposed."""
    from transformers.pytorch_utils import Conv1D

    if task.is_hf:
        return any(isinstance(model.get_submodule(n).get_base_layer(), Conv1D) for n in resolved.targets)
    family = _family_of_model(_backbone(model))
    return any(family.is_transposed(f"{hf}.weight") for hf in resolved.targets.values())


def _hub_name(pretrained: str) -> str:
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.exists() else pretrained
