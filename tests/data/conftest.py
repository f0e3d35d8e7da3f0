"""Data test helpers: data files written into tmp_path, loaded tiny tokenizers, a DataModule factory."""

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from finetune.data import DataModule

datasets.disable_progress_bars()


def write_rows(path: Path, rows: list) -> str:
    """Writes ``rows`` (dicts; strings for .txt) as the file type ``path``'s extension names; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".txt":
        path.write_text("".join(r + "\n" for r in rows))
    elif suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text(str(rows))
    return str(path)


@pytest.fixture
def write(tmp_path):
    """``write(name, rows)`` -> path of a data file in tmp_path."""
    return lambda name, rows: write_rows(tmp_path / name, rows)


@pytest.fixture(scope="session")
def tok(tokenizer_folder):
    """``tok(style)`` -> a loaded tiny tokenizer (shared: tests that change one load their own)."""
    cache = {}

    def get(style: str = "llama"):
        if style not in cache:
            cache[style] = AutoTokenizer.from_pretrained(tokenizer_folder(style))
        return cache[style]

    return get


@pytest.fixture
def make_dm(tmp_path, tok):
    """``make_dm(style, **kwargs)`` -> a DataModule with that tokenizer and a datasets cache in tmp_path. Packing is
    off unless asked for: these tests look at rows one by one (the default packs plain text)."""

    def make(style: str = "llama", **kwargs) -> DataModule:
        kwargs.setdefault("tokenizer", tok(style))
        kwargs.setdefault("packing", False)
        kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataModule(**kwargs)

    return make
