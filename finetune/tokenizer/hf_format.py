"""Reading and writing the Hugging Face tokenizer folder: tokenizer.json (the `tokenizers` format),
tokenizer_config.json and special_tokens_map.json (what `transformers.AutoTokenizer` reads besides it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.tokenizer.added import AddedToken
from finetune.tokenizer.bpe import ByteLevelBPE
from finetune.tokenizer.components import unsupported

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_NO_MAX_LENGTH = int(1e30)  # what transformers writes when a tokenizer has no maximum length

# Model options a byte-level BPE must leave at their default (value, why) to encode like tokenizers here.
_MODEL_DEFAULTS = {
    "dropout": (None, "BPE dropout is random"),
    "continuing_subword_prefix": (None, "not a byte-level BPE option"),
    "end_of_word_suffix": (None, "not a byte-level BPE option"),
    "byte_fallback": (False, "byte-level BPE needs no byte fallback"),
}
_ADDED_TOKEN_KEYS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def tokenizer_json(tok: ByteLevelBPE) -> dict:
    """`tok` as a tokenizer.json object, keys in the order tokenizers writes them."""
    specs = tok._specs
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [t.to_json() for t in tok.added_tokens],
        "normalizer": specs["normalizer"],
        "pre_tokenizer": specs["pre_tokenizer"],
        "post_processor": specs["post_processor"],
        "decoder": specs["decoder"],
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tok._unk_token,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": tok._fuse_unk,
            "byte_fallback": False,
            "ignore_merges": tok._ignore_merges,
            "vocab": dict(sorted(tok._vocab.items(), key=lambda kv: kv[1])),
            "merges": [list(m) for m in tok.merges],
        },
    }


def from_json(data: Any, source: str) -> ByteLevelBPE:
    """Build a tokenizer from a parsed tokenizer.json, refusing what would not encode exactly like tokenizers."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{source}: not a tokenizers tokenizer.json (no 'model' object)")
    for key in ("truncation", "padding"):
        if data.get(key) is not None:
            raise unsupported(source, key, data[key], "encode never truncates or pads; remove it")
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise unsupported(source, "model.type", model.get("type"), "only BPE is supported")
    for key, (default, why) in _MODEL_DEFAULTS.items():
        value = model.get(key, default)
        if value != default and not (key == "dropout" and value == 0):  # tokenizers treats dropout 0 as none
            raise unsupported(source, f"model.{key}", value, why)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError(f"{source}: model.vocab must be an object of token -> id")
    merges = []
    for i, m in enumerate(model.get("merges", [])):
        if isinstance(m, str):  # the older "a b" form
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{source}: model.merges[{i}] = {m!r} is not two tokens separated by one space")
            merges.append((parts[0], parts[1]))
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append((m[0], m[1]))
        else:
            raise ValueError(f"{source}: model.merges[{i}] = {m!r} is neither 'a b' nor [a, b]")
    added = []
    for i, t in enumerate(data.get("added_tokens") or []):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
            raise ValueError(f"{source}: added_tokens[{i}] needs a string 'content' and an integer 'id'")
        flags = {k: bool(t.get(k, k == "normalized" and not t.get("special", False))) for k in _ADDED_TOKEN_KEYS}
        added.append(AddedToken(content=t["content"], id=t["id"], **flags))
    return ByteLevelBPE(
        vocab,
        merges,
        added_tokens=added,
        normalizer=data.get("normalizer"),
        pre_tokenizer=data.get("pre_tokenizer"),
        post_processor=data.get("post_processor"),
        decoder=data.get("decoder"),
        ignore_merges=bool(model.get("ignore_merges", False)),
        unk_token=model.get("unk_token"),
        fuse_unk=bool(model.get("fuse_unk", False)),
        source=source,
    )


def load_tokenizer(path: str | Path) -> ByteLevelBPE:
    """A tokenizer from a folder holding tokenizer.json, or from the tokenizer.json file itself."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} in this folder")
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a JSON file: {e}") from e
    return from_json(data, str(file))


def _special_defaults(tok: ByteLevelBPE, given: dict[str, str | None]) -> dict[str, str | None]:
    specials = tok.special_tokens
    first = specials[0] if specials else None
    eos = given["eos_token"] or first
    out = {
        "bos_token": given["bos_token"] or first,
        "eos_token": eos,
        "pad_token": given["pad_token"] or ("<pad>" if "<pad>" in specials else eos),
        "unk_token": given["unk_token"] or eos,
    }
    for key, value in out.items():
        if value is not None and tok.token_to_id(value) is None:
            raise ValueError(f"{key}={value!r} is not in the vocabulary (special tokens: {specials})")
    return out


def save_folder(
    tok: ByteLevelBPE,
    folder: Path,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> Path:
    """Write the three files into `folder` through a temporary folder beside it, renamed into place once all are
    written, so a failure leaves no half-written file. In an existing folder, other files are left as they are."""
    given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
    special = _special_defaults(tok, given)
    special = {k: v for k, v in special.items() if v is not None}
    config: dict[str, Any] = {"backend": "tokenizers", **special, "clean_up_tokenization_spaces": False}
    config["model_max_length"] = model_max_length if model_max_length is not None else _NO_MAX_LENGTH
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads on transformers 4.x and 5.x
    if chat_template is not None:
        config["chat_template"] = chat_template
    files = {
        TOKENIZER_FILE: json.dumps(tok.to_json(), indent=2, ensure_ascii=False),
        CONFIG_FILE: json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n",
        SPECIAL_TOKENS_FILE: json.dumps(special, indent=2, ensure_ascii=False) + "\n",
    }
    folder = folder.absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the folder should look like any other
        for name, text in files.items():
            with open(tmp / name, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        if not folder.exists():
            os.rename(tmp, folder)
        else:  # an existing folder (maybe a model's, with weights): every file is complete before any is replaced
            for name in files:
                os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
