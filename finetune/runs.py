"""Opening a run folder: its config, checkpoint and task (rebuilt from the checkpoint's plain-data hyperparameters),
and the model merged with its adapter in memory. ``finetune export`` writes what this opens; ``generate``, ``chat``
and ``serve`` (through ``inference``) talk to it; neither imports the other.

The merge streams: the model is planned on the meta device, and each tensor is read from the base checkpoint (or
the run's checkpoint, for what trained) and merged with its adapter by peft's own ``merge``, one layer at a time.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from torch import nn

from finetune.adapters import checkpoint_weights, hf_layout
from finetune.model_spec import GENERATING_TASKS, GeneratingSpec, ModelSpec, check_plain
from finetune.models.base import Backbone
from finetune.models.hub import _family_of_model, _is_tied, hf_config, resolve
from finetune.sharded import read_sharded_checkpoint

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from finetune.tasks import Task

GENERATING = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")  # the HF classes of tasks that write text


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """A trained run: its task (rebuilt from the checkpoint's hyperparameters) and the checkpoint. ``task`` is the
    LightningModule, or only its model side (``GeneratingSpec``) for a run opened ``for_generation``."""

    folder: Path
    ckpt: Path
    checkpoint: dict
    task: ModelSpec

    def load_model(self) -> "Task":
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


def load_run(run_dir: str | Path, ckpt: str = "best", *, for_generation: bool = False) -> Run:
    """A run folder's task, rebuilt from its checkpoint. The folder is untrusted: only the toolkit's registered
    task classes are built (``task_class``), from the checkpoint's plain-data hyperparameters (``plain_hparams``).

    ``for_generation``: a generating task's run (``GENERATING_TASKS``) gets only the model side of its task
    (``GeneratingSpec``), which imports no Lightning; other runs get their task as without it."""
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.yaml); give the trainer.default_root_dir of a fit")
    class_path = _model_class_path(config_file)
    light = for_generation and class_path in GENERATING_TASKS
    if not light:
        from finetune.tasks import task_class

        cls = task_class(class_path, where=str(config_file))  # a registered task, or refused
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
    tokenizer = str(run / "tokenizer") if (run / "tokenizer").is_dir() else None  # as saved at fit start
    if light:
        for key, value in hparams.items():
            check_plain(value, f"{path}: hyper_parameters.{key}")
        return Run(run, path, checkpoint, GeneratingSpec(class_path, hparams, tokenizer))
    from finetune.tasks import plain_hparams

    hparams = plain_hparams(hparams, cls, where=str(path))
    if tokenizer is not None:
        hparams["tokenizer"] = tokenizer
    task = cls(**hparams)
    if "label_names" in checkpoint:
        task.label_names = list(checkpoint["label_names"])
    return Run(run, path, checkpoint, task)


# ------------------------------------------------------------------------------------------ merged in memory
def base_weights(task: ModelSpec, model: nn.Module):
    if task.hparams.pretrained is None:  # a full fine-tune from random weights: everything is in the checkpoint
        return {}
    return checkpoint_weights(resolve(task.hparams.pretrained), model)


def backbone_of(model: nn.Module) -> Backbone:
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
        self.tuner_layer, self.saved_module = _peft_wrappers() if spec is not None else ((), ())
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
        if isinstance(module, self.tuner_layer):
            return self._merged_layer(owner, module).pop(pname)
        if isinstance(module, self.saved_module):
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

    def _merged_layer(self, owner: str, layer: "BaseTunerLayer") -> dict[str, torch.Tensor]:
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
    wrappers = _peft_wrappers()
    wrapped = lambda n: isinstance(tuned.get_submodule(n.rpartition(".")[0]), wrappers)  # noqa: E731
    if not any(wrapped(n) for n in pair):
        return {}
    out_name, emb_name = pair
    owner, _, pname = out_name.rpartition(".")
    head = plain.get_submodule(owner)
    setattr(head, pname, nn.Parameter(torch.empty_like(getattr(head, pname)), requires_grad=False))  # (V, C), meta
    (_scratch_backbone(plain) or plain).config.tie_word_embeddings = False
    return {out_name: emb_name}


def _peft_wrappers() -> tuple[type, type]:
    """peft's adapter layer and ``modules_to_save`` wrapper classes; imported only for a run with an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return BaseTunerLayer, ModulesToSaveWrapper


def _scratch_backbone(model: nn.Module) -> Backbone | None:
    """Our from-scratch backbone of ``model`` (itself, or the decoder under a classifier); None for HF models."""
    backbone = model if isinstance(model, Backbone) else getattr(model, "decoder", None)
    return backbone if isinstance(backbone, Backbone) else None


def run_models(run: Run) -> tuple[nn.Module, nn.Module]:
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


def merged_state(run: Run) -> tuple[dict, dict[str, torch.Tensor]]:
    """The run's model merged, in memory: its Hugging Face config fields and HF-named tensors (for generation)."""
    plain, tuned = run_models(run)
    values = Values(run, plain, tuned, merge=True, untied=untie_trained_pair(plain, tuned))
    state = {hf_key: values.hf(name, transposed) for name, hf_key, transposed in hf_layout(plain)}
    return config_fields(run.task, plain), state


def config_fields(task: ModelSpec, model: nn.Module) -> dict:
    """The HF config fields of the run's model as a plain dict: what ``from_state`` reads, without building a
    ``transformers`` config (its classes and modeling modules are slow to import; ``model_config`` builds one)."""
    if task.is_hf:
        return model.config.to_dict()
    config = backbone_of(model).config
    fields = {**config.to_hf(), "model_type": config.model_type}
    return {**fields, **{k: v for k, v in task.model_overrides().items() if k != "head"}}


def model_config(task: ModelSpec, model: nn.Module):
    """The ``transformers`` config of the exported model, naming the task's HF class in ``architectures``."""
    import transformers

    if task.is_hf:
        config = model.config
    else:
        config = hf_config(backbone_of(model))
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


# ------------------------------------------------------------------------------------------ unmerged
def adapter_model(run: Run, base: nn.Module) -> nn.Module:
    """The run's model with its adapter injected and unmerged, its frozen weights ``base``'s own tensors (shared,
    not copied): several fine-tunes of one base cost one base in memory. ``base`` is our from-scratch model of the
    run's pretrained folder (as ``inference.load`` opens it). Eval mode."""
    task = run.task
    if task.adapter_spec is None:
        raise ValueError(f"{run.folder}: a full fine-tune has no adapter to serve on a shared base; serve the run "
                         "itself")  # fmt: skip
    if task.is_hf:
        raise ValueError(f"{run.folder}: trained on the hf backend; serve its merged model (pass the run folder as "
                         "MODEL) or retrain with backend: scratch")  # fmt: skip
    tuned = task.inject_adapter(task.build_model(empty=True), quantize=False)  # meta; QLoRA's base unquantized
    shared = base.state_dict(keep_vars=True)
    state = {}
    for name in tuned.state_dict(keep_vars=True):
        if name in run.trained:
            state[name] = run.trained[name]
        else:  # a frozen tensor: the base's, under peft's ``base_layer`` / ``original_module`` paths
            plain = name.replace(".base_layer.", ".").replace(".original_module.", ".")
            if plain not in shared:
                raise KeyError(f"{run.folder}: {name} is neither trained nor in the base model")
            state[name] = shared[plain]
    tuned.load_state_dict(state, strict=True, assign=True)
    return tuned.to(next(base.parameters()).device).eval()


def trained_on_documents(run) -> bool:
    """Whether ``run`` is a causal LM trained on the ``text`` format (the DataModule's default), whose documents
    started with BOS (``data.collate.with_bos``): its prompts and exports start the same way."""
    import yaml

    data = (yaml.safe_load((run.folder / "config.yaml").read_text()) or {}).get("data") or {}
    return run.task.objective == "causal_lm" and data.get("format", "text") == "text"
