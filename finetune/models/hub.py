"""``from_hf`` and ``to_hf``: Hugging Face checkpoint folders <-> our from-scratch models."""

import ctypes
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.folders import atomic_folder
from finetune.models import bert, gpt2, llama, t5
from finetune.models.base import Backbone
from finetune.models.family import Family

log = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = (gpt2.FAMILY, llama.FAMILY, bert.FAMILY, t5.FAMILY)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_TYPE))
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def family_of(model_type: str, *, source: str = "") -> Family:
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        where = f"{source}: " if source else ""
        raise ValueError(
            f"{where}model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
        ) from None


def _family_of_model(model: Backbone) -> Family:
    for f in FAMILIES:
        if type(model) is f.model_cls:
            return f
    raise TypeError(f"{type(model).__name__} is not a from-scratch model of {[f.model_cls.__name__ for f in FAMILIES]}")


# ------------------------------------------------------------------------------------------ reading
def resolve(path_or_name: str | os.PathLike) -> Path:
    """A local folder, or a hub repo id downloaded (config, weights) into the local cache."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: expected a model folder (config.json + *.safetensors), found a file")
        return path
    if not _REPO_ID.match(str(path_or_name)):
        raise FileNotFoundError(f"{path}: no such model folder (and not a hub repo id)")
    from huggingface_hub import snapshot_download

    meta = ["*.json", "*.model", "*.txt"]  # config, tokenizer, generation config, shard index
    folder = Path(snapshot_download(str(path_or_name), allow_patterns=[*meta, "*.safetensors"]))
    if not any(folder.glob("*.safetensors")):  # an older repo with only pickled weights
        folder = Path(snapshot_download(str(path_or_name), allow_patterns=[*meta, "*.bin"]))
    return folder


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; expected a Hugging Face model folder")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if "model_type" not in config:
        raise ValueError(f"{file}: no 'model_type' key; supported model types: {list(SUPPORTED_MODEL_TYPES)}")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (one file or the shards its index names), else .bin the same way."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: names shards that are missing: {missing}")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no weights (model.safetensors or pytorch_model.bin, single or sharded)")


def unreadable_safetensors(file: Path, e: BaseException) -> ValueError:
    """The error for a safetensors file that can't be read, naming it and what was expected."""
    return ValueError(
        f"{file}: cannot read safetensors ({e}); expected a complete safetensors file: it is truncated or corrupt "
        "(an interrupted download or save?); download or save it again"
    )


def explain_unreadable_weights(path_or_name: str | os.PathLike, e: BaseException) -> ValueError:
    """Names the weights file of a model folder that ``transformers`` failed to read: the first safetensors file
    whose header can't be read (a truncated file), else the folder (or hub id) with the original error."""
    folder = Path(path_or_name).expanduser()
    if folder.is_dir():
        with suppress(FileNotFoundError, ValueError):  # no weights or a broken index: name the folder
            for file in weight_files(folder):
                if file.suffix == ".safetensors":
                    try:
                        with safe_open(file, framework="pt"):
                            pass
                    except Exception as bad:
                        return unreadable_safetensors(file, bad)
    return ValueError(f"{path_or_name}: cannot read the model's safetensors weights ({e}); expected complete files")


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors by HF name, and the file each came from (for error messages)."""
    state, source = {}, {}
    for file in weight_files(folder):
        if file.suffix == ".bin":
            try:
                tensors = torch.load(file, map_location="cpu", weights_only=True)  # never unpickle code
            except Exception as e:
                raise ValueError(f"{file}: cannot read a PyTorch weights file ({e})") from None
        else:
            try:
                with safe_open(file, framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            except Exception as e:
                raise unreadable_safetensors(file, e) from None
        state.update(tensors)
        source.update(dict.fromkeys(tensors, file.name))
    return state, source


def _rename_map(family: Family, keys) -> dict[str, str | None]:
    """Checkpoint key -> our canonical HF key (None: dropped). Old checkpoints name LayerNorm parameters
    gamma/beta; base-model checkpoints lack the head prefix; an alias stands in for its key only when that is absent."""
    rename = {k: re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)) for k in keys}
    if family.hf_prefix and not any(k.startswith(family.hf_prefix) for k in rename.values()):
        rename = {k: v if family.key_map.from_hf(v) else family.hf_prefix + v for k, v in rename.items()}
    names = set(rename.values())
    for k, v in rename.items():
        if v in family.aliases:
            rename[k] = family.aliases[v] if family.aliases[v] not in names else None
    return rename


def _normalize_keys(family: Family, state: dict, source: dict) -> tuple[dict, dict]:
    rename = _rename_map(family, state)
    state = {rename[k]: v for k, v in state.items() if rename[k]}
    source = {rename[k]: v for k, v in source.items() if rename[k]}
    return state, source


class LazyWeights(Mapping):
    """A checkpoint folder's tensors by (normalized) HF key, each read from its file only when asked for, so a
    whole model never sits in memory (``.bin`` files are memory-mapped)."""

    def __init__(self, folder: Path, family: Family | None = None, *, prefix: str = "") -> None:
        self.files, keys = {}, {}
        for file in weight_files(folder):
            if file.suffix == ".bin":
                try:
                    tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise ValueError(f"{file}: cannot read a PyTorch weights file ({e})") from None
                self.files[file] = tensors
                keys.update(dict.fromkeys(tensors, file))
            else:
                try:
                    with safe_open(file, framework="pt") as f:
                        keys.update(dict.fromkeys(f.keys(), file))  # noqa: SIM118 (safe_open is not a dict)
                except Exception as e:
                    raise unreadable_safetensors(file, e) from None
        rename = _rename_map(family, keys) if family is not None else {k: k for k in keys}
        if prefix and not any(k.startswith(prefix) for k in rename.values()):  # saved from the bare base model
            rename = {k: prefix + v for k, v in rename.items()}
        self.where = {rename[k]: (keys[k], k) for k in keys if rename[k]}

    def __getitem__(self, key: str) -> torch.Tensor:
        file, stored = self.where[key]
        if file.suffix == ".bin":
            return self.files[file][stored]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(stored)
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {stored!r} ({e})") from None

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


# ------------------------------------------------------------------------------------------ loading
def from_hf(path_or_name: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **overrides) -> Backbone:
    """Reads a Hugging Face checkpoint folder (or hub repo id) into our model with the same weights.

    ``overrides`` replace config fields, e.g. ``head="classification", id2label={0: "neg", 1: "pos"}`` to put a
    new (freshly initialized) classification head on a BERT checkpoint. Weights are loaded without a random
    init pass: the model is built on the meta device and filled from the files.
    """
    folder = resolve(path_or_name)
    config, where = read_config(folder), str(folder / "config.json")
    family_of(config["model_type"], source=where)  # before reading any weights
    state, source = read_weights(folder)
    return from_state(config, state, source, dtype=dtype, where=where, **overrides)


def from_state(
    hf_config: dict,
    state: dict[str, torch.Tensor],
    source: dict[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    where: str = "",
    **overrides,
) -> Backbone:
    """Our model from a Hugging Face config dict and HF-named tensors (``source``: key -> file, for errors)."""
    family = family_of(hf_config["model_type"], source=where)
    known = {f.name for f in dataclasses.fields(family.config_cls)}
    if unknown := sorted(set(overrides) - known):
        raise TypeError(f"unknown config fields {unknown} for {family.config_cls.__name__}; known: {sorted(known)}")
    config = family.config_cls.from_hf({**hf_config, **overrides})  # derived fields follow the overrides
    source = source if source is not None else dict.fromkeys(state, where or "state dict")
    state, source = _normalize_keys(family, state, source)
    _untie_if_distinct(family, config, state)

    with empty_weights("cpu", dtype):  # storage without a random-init pass
        model = family.model_cls(config)
    model.reset_buffers()
    model.tie_weights()
    fresh = load_hf_state(model, family, state, source)
    for name in fresh:  # heads the checkpoint does not have
        model.init_weights(model.get_submodule(name))
    model.tie_weights()
    return model.eval()


def from_config(config: dict) -> Backbone:
    """A randomly initialized model from a Hugging Face-style config dict (``model_type`` picks the family)."""
    if "model_type" not in config:
        raise ValueError(f"a model config needs 'model_type', one of {list(SUPPORTED_MODEL_TYPES)}; got {config}")
    family = family_of(config["model_type"])
    known = {f.name for f in dataclasses.fields(family.config_cls)} | {"model_type"}
    if unknown := sorted(set(config) - known):
        raise TypeError(f"unknown config fields {unknown} for {family.config_cls.__name__}; known: {sorted(known)}")
    return family.model_cls(family.config_cls.from_hf(config))


def skeleton(path_or_name: str | os.PathLike, **overrides) -> Backbone:
    """Our model with a checkpoint's config and structure on the meta device: no weights are read (but the two
    compared to decide tying); for planning an export."""
    folder = resolve(path_or_name)
    hf_config = read_config(folder)
    family = family_of(hf_config["model_type"], source=str(folder / "config.json"))
    config = family.config_cls.from_hf({**hf_config, **overrides})
    _untie_if_distinct(family, config, LazyWeights(folder, family))
    with empty_weights():
        return family.model_cls(config).eval()


# The initializers our models and torch's layers call while they are built.
_INITIALIZERS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "zeros_", "ones_", "constant_")  # fmt: skip


@contextmanager
def empty_weights(device: str = "meta", dtype: torch.dtype | None = None):
    """Builds modules on ``device`` (in ``dtype``) without running their initializers, as ``transformers``'
    ``no_init_weights``: on ``cpu`` their storage is left uninitialized (what ``to_empty`` gives), on ``meta`` there
    is none. Both skip torch's meta kernels written in Python: the first random initializer on meta, and
    ``to_empty``'s ``empty_like``, import sympy and hundreds of modules (1 to 1.5 s each, cold), which a cold
    ``finetune generate`` would pay for nothing."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
    default = torch.get_default_dtype()
    try:
        for name in _INITIALIZERS:
            setattr(torch.nn.init, name, _skip)
        torch.set_default_dtype(dtype or default)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _skip(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def _untie_if_distinct(family: Family, config, state: dict) -> None:
    # A config may say "tied" while the checkpoint holds a distinct output matrix (T5 v1.1 under transformers 5):
    # the weights win, as in transformers.
    if not family.tied or not getattr(config, "tie_word_embeddings", False):
        return
    out_key, emb_key = (family.key_map.to_hf(k) for k in family.tied)
    if out_key in state and emb_key in state and not torch.equal(state[out_key], state[emb_key]):
        config.tie_word_embeddings = False
        config.__post_init__()


def load_hf_state(model: Backbone, family: Family, state: dict, source: dict) -> list[str]:
    """Copies HF-named tensors into ``model``, checking every key and shape. Returns head modules left to init."""
    expected = model.state_dict()
    tied_out = family.tied[0] if family.tied and _is_tied(model, family) else None
    converted, unused_heads = {}, set()
    for hf_key, tensor in state.items():
        if family.is_ignored(hf_key):
            continue
        ours = family.key_map.from_hf(hf_key)
        if ours is None or ours not in expected:
            # A head we don't build: one of ours (an MLM head on a classifier), or any module outside the
            # base model (a QA or token-classification head): skipped with a warning, as transformers does.
            head = ours.split(".")[0] if ours else hf_key.split(".")[0]
            if head in family.heads or (ours is None and family.hf_prefix and not hf_key.startswith(family.hf_prefix)):
                unused_heads.add(head)
                continue
            raise ValueError(f"{source[hf_key]}: unexpected key {hf_key!r}: not a parameter of {type(model).__name__}")
        if family.is_transposed(hf_key):
            tensor = tensor.t()
        if tensor.shape != expected[ours].shape:
            raise ValueError(
                f"{source[hf_key]}: {hf_key!r} has shape {tuple(tensor.shape)}, but the config expects "
                f"{tuple(expected[ours].shape)}"
            )
        converted[ours] = tensor
    missing = [k for k in expected if k not in converted and k != tied_out]
    fresh = sorted({k.split(".")[0] for k in missing if k.split(".")[0] in family.heads})
    missing = [k for k in missing if k.split(".")[0] not in fresh]
    if missing:
        files = sorted(set(source.values()))
        hf_missing = [family.key_map.to_hf(k) for k in missing]
        raise ValueError(f"{', '.join(files)}: missing keys {hf_missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if fresh:
        log.warning("newly initialized (not in the checkpoint): %s; train them before use", fresh)
    if unused_heads:
        log.warning("checkpoint weights not used (head not built): %s", sorted(unused_heads))
    model.load_state_dict(converted, strict=False)
    return fresh


def _is_tied(model: Backbone, family: Family) -> bool:
    out, emb = (model.get_parameter(k) for k in family.tied) if _has(model, family.tied[0]) else (None, None)
    return out is not None and out is emb


def _has(model, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


# ------------------------------------------------------------------------------------------ writing
def hf_layout(model: Backbone) -> list[tuple[str, str, bool]]:
    """(our name, HF key, transposed) of every tensor an HF checkpoint of ``model`` holds, in order: a tied output
    matrix once (as HF writes it), aliases after the key they copy."""
    family = _family_of_model(model)
    skip = {family.tied[0]} if family.tied and _is_tied(model, family) else set()
    out = []
    for name in model.state_dict():
        if name in skip:
            continue
        hf_key = family.key_map.to_hf(name)
        if hf_key is None:
            raise KeyError(f"{name!r} has no Hugging Face name in the {family.model_types[0]} key map")
        out.append((name, hf_key, family.is_transposed(hf_key)))
    ours = {h: (n, t) for n, h, t in out}
    out += [(ours[key][0], alias, ours[key][1]) for alias, key in family.aliases.items() if key in ours]
    return out


def hf_state_dict(model: Backbone, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names and layouts; a tied output matrix is written once, as HF does."""
    state = model.state_dict()
    out = {}
    for name, hf_key, transposed in hf_layout(model):
        tensor = state[name].detach()
        out[hf_key] = (tensor.t() if transposed else tensor).to(dtype or tensor.dtype).contiguous()
    return out


def hf_config(model: Backbone):
    """The ``transformers`` config object of our model (``AutoConfig`` of the right ``model_type``)."""
    from transformers import AutoConfig

    c = model.config
    fields = {k: v for k, v in c.to_hf().items() if k != "model_type"}
    config = AutoConfig.for_model(c.model_type, **fields)
    config.architectures = [c.architecture]
    return config


def to_hf(
    model: Backbone,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Writes a complete Hugging Face folder (config.json, safetensors, generation_config.json for generators).

    Weights past ``max_shard_size`` bytes are split into shards with an index, as ``save_pretrained`` does.
    The folder is written beside the target and renamed at the end, so a failure leaves nothing partial.
    """
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        config = hf_config(model)
        config.dtype = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")  # what the files hold
        config.save_pretrained(tmp)
        if model.is_encoder_decoder or hasattr(model, "lm_head"):
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        state = hf_state_dict(model, dtype=dtype)
        write_weights(tmp, {k: (t.shape, t.dtype) for k, t in state.items()}, state.__getitem__, max_shard_size)
    return Path(out_dir)


def _release_freed_memory() -> None:
    """Hands memory freed by the previous tensors back to the OS (glibc keeps multi-MB frees in its heap, so a
    streamed export would otherwise grow by about a shard per shard written); a no-op off glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_weights(
    folder: Path,
    entries: dict[str, tuple[torch.Size, torch.dtype]],
    get: Callable[[str], torch.Tensor],
    max_shard_size: int,
) -> None:
    """Writes ``get(key)`` for each key (shape and dtype as in ``entries``) into safetensors shards of at most
    ``max_shard_size`` bytes, one shard in memory at a time; more than one shard gets an index, as in HF."""
    shards, size = [[]], 0
    for key, (shape, dtype) in entries.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])  # fmt: skip
    for name, keys in zip(names, shards, strict=True):
        tensors = {}
        for key in keys:
            _release_freed_memory()
            t = get(key)
            shape, dtype = entries[key]
            if t.shape != shape:
                raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
            t = t.to(dtype).contiguous()
            shared = any(t.data_ptr() == u.data_ptr() for u in tensors.values())
            tensors[key] = t.clone() if shared else t  # safetensors stores no shared tensors (aliases)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for s, d in entries.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, keys in zip(names, shards, strict=True) for k in keys}}  # fmt: skip
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
