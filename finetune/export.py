"""``finetune export``: a run folder -> a merged Hugging Face model folder, or a PEFT adapter folder.

The merge streams: the model is planned on the meta device, and each output tensor is read from the base
checkpoint (or the run's checkpoint, for what trained), merged with its adapter by peft's own ``merge`` one layer
at a time, and written into the current shard. Peak memory is about one shard plus the adapter, not the model
(``scripts/bench_export.py``: 0.22x the memory of HF+PEFT ``merge_and_unload`` + ``save_pretrained``).
"""

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from finetune.adapters import hf_layout
from finetune.data.collate import bos_first
from finetune.data.templates import end_of_turn_id, tokenizer_chat_template
from finetune.folders import check_target
from finetune.models.hub import _family_of_model, atomic_folder, resolve, write_weights
from finetune.runs import GENERATING, Run, Values, load_run, trained_on_documents, untie_trained_pair
from finetune.runs import backbone_of as _backbone
from finetune.runs import model_config as _config
from finetune.runs import run_models as _models
from finetune.tasks import Task

__all__ = ["DTYPES", "export", "load_run"]  # load_run: opened by finetune.runs, kept importable from here

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SHARD_SIZE = 5 * 2**30  # as save_pretrained
PEFT_TASK_TYPES = {
    "CausalLM": "CAUSAL_LM",
    "Preference": "CAUSAL_LM",
    "Seq2Seq": "SEQ_2_SEQ_LM",
    "Classification": "SEQ_CLS",
}


# ------------------------------------------------------------------------------------------ layouts
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
    tokenizer = bos_first(task.tokenizer) if trained_on_documents(run) else task.tokenizer  # prompts start as trained
    with atomic_folder(out, overwrite=force, protect=_read_from(run)) as tmp:
        if format == "merged":
            _write_model(run, plain, tuned, tmp, merge=True, **write)
            tokenizer.save_pretrained(tmp)
        else:
            base = None
            if not task.is_hf:  # our from-scratch base, written as the HF folder the adapter loads onto
                base = tmp / "base"
                base.mkdir()
                _write_model(run, plain, tuned, base, merge=False, **write)
                tokenizer.save_pretrained(base)
            _write_adapter(run, tuned, tmp, base=out.resolve() / "base" if base else None)
            tokenizer.save_pretrained(tmp)
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
