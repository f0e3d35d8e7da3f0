"""Quantizing a whole from-scratch model in place, and the quantized folder ``finetune quantize`` writes.

The folder holds plain integers and scales (``model.safetensors``: int8 rows, or 4-bit values two per byte), the
model config (``config.json``), ``quantization.json`` (bits, group size, which layers) and the tokenizer; loading it
runs no quantization pass, and the kernels' packed layouts are made on the machine that loads it.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.quant.core import check, pack_nibbles, unpack_nibbles
from finetune.quant.linear import QuantLinear

CONFIG_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1


@dataclass(frozen=True)
class QuantConfig:
    """``bits`` 8 (per output channel by default) or 4 (groups of ``group_size``, default 32); ``symmetric``
    (default: 8 bits yes, 4 bits no: a scale and a zero per group); ``head``: also the output projection."""

    bits: int
    group_size: int | None = None
    symmetric: bool | None = None
    head: bool = False

    def __post_init__(self) -> None:
        check(self.bits, self.group_size)
        if self.bits == 4 and self.group_size is None:
            object.__setattr__(self, "group_size", 32)
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.bits == 8)

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f" g{self.group_size}" if self.group_size else "")


def target_names(model: nn.Module, head: bool) -> list[str]:
    """The linear layers a weight-only quantization replaces: every one inside the blocks, and the output head
    (``lm_head``) when ``head``; embeddings and norms stay as they are."""
    names = [f"layers.{n}" for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    if head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replaces the model's target linear layers by ``QuantLinear`` (in place; returns the model). A tied output
    head that is quantized stops sharing the input embedding, which stays in full precision."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization.name}); load it without --quantize")
    if model.is_encoder_decoder or not hasattr(model, "lm_head"):
        raise ValueError(f"weight-only quantization is for decoder-only language models, not {type(model).__name__}")
    names = target_names(model, config.head)
    for name in names:
        old = model.get_submodule(name)
        _replace(model, name, QuantLinear.from_linear(old, bits=config.bits, group_size=config.group_size,
                                                      symmetric=config.symmetric))  # fmt: skip
    model.quantization = config
    model.quantized_names = names
    return model


# ------------------------------------------------------------------------------------------ the folder
def _state_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the folder stores them: 4-bit values packed two per byte, a tied head once."""
    state = {}
    for key, t in model.state_dict().items():
        if key.endswith(".qweight") and model.quantization.bits == 4:
            t = pack_nibbles(t)
        state[key] = t.detach().contiguous().cpu()
    if _tied(model):
        state.pop("lm_head.weight", None)
    return state


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return bool(getattr(model.config, "tie_word_embeddings", False)) and isinstance(head, nn.Linear)


def save_quantized(model: nn.Module, out: str | Path, *, tokenizer=None, extra: dict | None = None,
                   overwrite: bool = False, protect=()) -> Path:  # fmt: skip
    """Writes the quantized ``model`` (and ``tokenizer``) as a folder ``load_quantized`` reads; atomic, never into
    a folder of ``protect`` (the model's own)."""
    from safetensors.torch import save_file

    from finetune.folders import atomic_folder

    if getattr(model, "quantization", None) is None:
        raise ValueError("save_quantized: the model is not quantized (quantize_model first)")
    c = model.config
    with atomic_folder(out, overwrite=overwrite, protect=protect) as tmp:
        (tmp / "config.json").write_text(json.dumps({"model_type": c.model_type, **c.to_hf()}, indent=2) + "\n")
        info = {"format": FORMAT, **asdict(model.quantization), "modules": model.quantized_names, **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
        save_file(_state_for_file(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def read_quant_info(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    try:
        info = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the quantization config ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f'{file}: expected a finetune quantization config with "format": {FORMAT}')
    missing = [k for k in ("bits", "group_size", "symmetric", "head", "modules") if k not in info]
    if missing:
        raise ValueError(f"{file}: missing keys {missing}")
    return info


def load_quantized(path: str | Path) -> tuple[nn.Module, dict]:
    """Our model from a ``save_quantized`` folder, its layers quantized as saved (nothing is re-quantized), and
    the folder's ``quantization.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from finetune.models.hub import family_of, read_config

    folder = Path(path)
    info = read_quant_info(folder)
    try:
        config = QuantConfig(info["bits"], info["group_size"], info["symmetric"], info["head"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: {e}") from None
    hf = read_config(folder)
    family = family_of(hf["model_type"], source=str(folder / "config.json"))
    with torch.device("meta"):
        model = family.model_cls(family.config_cls.from_hf(hf))
    for name in info["modules"]:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{folder / CONFIG_FILE}: module {name!r} is not in a {hf['model_type']} model") from None
        _replace(model, name, QuantLinear(old.in_features, old.out_features, bits=config.bits,
                                          group_size=min(config.group_size or old.in_features, old.in_features),
                                          symmetric=config.symmetric, bias=old.bias is not None,
                                          device="meta"))  # fmt: skip
    model.to_empty(device="cpu")
    model.reset_buffers()
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{folder / WEIGHTS_FILE}: cannot read the quantized weights ({e})") from None
    own = model.state_dict()
    for key, t in list(state.items()):
        if key.endswith(".qweight") and config.bits == 4 and key in own:
            state[key] = unpack_nibbles(t, own[key].size(1))
    tied = _tied(model)
    expected = {k for k in own if not (tied and k == "lm_head.weight")}
    if (missing := sorted(expected - set(state))) or (unexpected := sorted(set(state) - set(own))):
        what = f"missing {missing[:5]}" if missing else f"unexpected {unexpected[:5]}"
        raise ValueError(f"{folder / WEIGHTS_FILE}: does not match {folder / CONFIG_FILE} and config.json ({what})")
    for key, t in state.items():
        if t.shape != own[key].shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {key} has shape {tuple(t.shape)}, expected "
                             f"{tuple(own[key].shape)}")  # fmt: skip
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    model.quantization, model.quantized_names = config, list(info["modules"])
    return model.eval(), info
