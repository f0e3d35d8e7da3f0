"""A tokenizer trained for a recipe (``model.tokenizer: {train_files: ..., vocab_size: ...}``), cached by content.

The cache key covers the files' bytes and every training setting, so a resumed or repeated run reuses the very
same tokenizer, and an edited corpus trains a new one. Training is deterministic, so concurrent ranks that race
to fill the cache write identical folders; the first rename wins.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.tokenizer.train import DEFAULT_SPECIAL_TOKENS

FIELDS = {"train_files", "vocab_size", "special_tokens", "min_frequency"}
VERSION = 1  # bump when training changes what it produces


def cache_root() -> Path:
    root = (
        os.environ.get("FINETUNE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"
    )
    return Path(root) / "tokenizers"


def _spec(spec: dict[str, Any], resolve) -> dict[str, Any]:
    unknown = sorted(set(spec) - FIELDS)
    if unknown or "train_files" not in spec or "vocab_size" not in spec:
        raise ValueError(
            f"model.tokenizer: a tokenizer to train takes {sorted(FIELDS)} (train_files and vocab_size required); "
            f"got {sorted(spec)}"
        )
    files = spec["train_files"]
    files = [files] if isinstance(files, str | os.PathLike) else list(files)
    out = {
        "train_files": [str(resolve(str(f))) for f in files],
        "vocab_size": int(spec["vocab_size"]),
        "special_tokens": list(spec.get("special_tokens") or DEFAULT_SPECIAL_TOKENS),
        "min_frequency": int(spec.get("min_frequency", 2)),
    }
    for f in out["train_files"]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"model.tokenizer.train_files: {f}: no such file")
    return out


def _key(spec: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({**spec, "train_files": None, "version": VERSION}, sort_keys=True).encode())
    for f in spec["train_files"]:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")  # file boundary
    return h.hexdigest()[:20]


def trained_tokenizer(spec: dict[str, Any], resolve=Path) -> Path:
    """The folder of the tokenizer ``spec`` describes: from the cache, else trained (ours) and cached."""
    from finetune.tokenizer import train_bpe

    spec = _spec(spec, resolve)
    folder = cache_root() / _key(spec)
    if (folder / "tokenizer.json").is_file():
        return folder
    tok = train_bpe(spec["train_files"], vocab_size=spec["vocab_size"], special_tokens=spec["special_tokens"],
                    min_frequency=spec["min_frequency"])  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".training-", dir=folder.parent))
    try:
        tok.save(tmp / "tokenizer")
        (tmp / "tokenizer" / "trained_from.json").write_text(json.dumps(spec, indent=2) + "\n")
        try:
            os.rename(tmp / "tokenizer", folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():  # not a rank that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
