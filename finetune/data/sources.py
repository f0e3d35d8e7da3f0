"""Finding and loading raw data: local files (one ``datasets.Dataset`` per file, so that errors can name the file
and the row within it), folders (split by file name) and Hugging Face hub datasets.

Rows are numbered from 0 within their file, as ``dataset[i]`` numbers them; for line-based files (JSONL, CSV, TXT)
errors also give the 1-based line number an editor shows.
"""

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

# file extension -> the `datasets` packaged builder that reads it
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPLITS = ("train", "validation", "test", "predict")
# a file (or hub split) whose name starts with one of these belongs to that split
SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class Source:
    """One file (or one hub split) of raw rows."""

    name: str  # the path as the user gave it, or "dataset[split]" for the hub
    dataset: datasets.Dataset
    kind: str  # json, csv, parquet, text or hub

    def where(self, row: int) -> str:
        """Names row ``row`` of this source for an error message: ``"data.jsonl row 3 (line 5)"``."""
        return where(self.name, self.kind, row)


def where(name: str, kind: str, row: int) -> str:
    """Names a row of a file; line numbers are looked up only here, when an error is being reported."""
    line = _line_of(name, row) if kind in ("json", "csv", "text") else None
    return f"{name} row {row}" + (f" (line {line})" if line is not None else "")


def _line_of(path: str, row: int) -> int | None:
    """The 1-based line on which row ``row`` of a line-based file starts (None for a JSON array file)."""
    p = Path(path).expanduser()
    try:
        if p.suffix.lower() == ".txt":
            return row + 1  # the text builder keeps blank lines as rows
        if p.suffix.lower() == ".jsonl":
            with p.open(encoding="utf-8") as f:  # the JSON builder skips blank lines
                data_lines = (n for n, line in enumerate(f, 1) if line.strip())
                return next(itertools.islice(data_lines, row, None), None)
        if p.suffix.lower() == ".csv":
            with p.open(newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                k, start = -1, 1  # k = data row index; the first non-blank row is the header
                for record in reader:
                    if record:  # pandas skips blank lines
                        if k == row:
                            return start
                        k += 1
                    start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


def check_extension(path: str) -> str:
    """Returns the builder for ``path``'s extension, or raises a ValueError listing the supported ones."""
    builder = EXTENSIONS.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(
            f"{path}: unsupported file type {Path(path).suffix!r}; supported: {', '.join(EXTENSIONS)} "
            "(.txt: each line is a row in column 'text')"
        )
    return builder


def load_file(path: str, cache_dir: str | None = None) -> Source:
    """Loads one data file with ``datasets`` (cached as Arrow under ``cache_dir``). An empty file gives 0 rows."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    builder = check_extension(path)
    if _has_no_rows(file):
        return Source(path, datasets.Dataset.from_dict({}), builder)
    try:
        ds = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=cache_dir)
    except Exception as e:
        problem = _diagnose_jsonl(file) if file.suffix.lower() == ".jsonl" else None
        raise ValueError(
            problem or f"{path}: could not load it as {Path(path).suffix} ({builder}): {_reason(e)}"
        ) from e
    return Source(path, ds, builder)


def _diagnose_jsonl(path: Path) -> str | None:
    """Why a JSONL file failed to load, by row and line: invalid JSON, or a column whose values change type."""
    types: dict[str, tuple[str, int]] = {}  # column -> (type name, row where first seen)
    row = 0
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip())
            except json.JSONDecodeError as e:
                return f"{path} line {line_number}: invalid JSON at column {e.colno}: {e.msg}"
            if not isinstance(record, dict):
                return f"{path} line {line_number}: expected a JSON object per line; found {type(record).__name__}"
            for column, value in record.items():
                if value is None:
                    continue
                kind = type(value).__name__
                first = types.setdefault(column, (kind, row))
                if first[0] != kind and {first[0], kind} != {"int", "float"}:
                    return (
                        f"{path} row {row} (line {line_number}): column {column!r} holds {kind} {value!r:.80} where "
                        f"row {first[1]} holds {first[0]}; a column holds one type"
                    )
            row += 1
    return None


def _has_no_rows(path: Path) -> bool:
    """Whether a text-based file holds no data rows (the builders fail on those with unhelpful errors)."""
    if path.suffix.lower() == ".parquet":
        return False
    if path.stat().st_size > 1 << 20:
        return False  # a big file has rows; don't read it twice
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if path.suffix.lower() == ".csv":
        return len([line for line in text.splitlines() if line.strip()]) <= 1  # a header alone
    return text in ("", "[]")


def _reason(e: BaseException) -> str:
    """The most specific messages in an exception chain (`datasets` wraps the parser's error)."""
    messages = []
    while e is not None and len(messages) < 3:
        if not isinstance(e, datasets.exceptions.DatasetGenerationError):
            messages.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "; ".join(messages) or "unknown error"


def split_of(name: str) -> str | None:
    """The split a file stem or hub split name belongs to, by prefix (``dev.jsonl`` -> validation)."""
    lower = name.lower()
    for split, prefixes in SPLIT_PREFIXES.items():
        if lower.startswith(prefixes):
            return split
    return None


def discover(folder: str) -> tuple[dict[str, list[str]], list[str]]:
    """Sorts the data files of ``folder`` (not recursive) into splits by file name.

    Returns ({split: files}, files that matched no split). When no file name matches a split, every file is train.
    """
    paths = sorted(Path(folder).expanduser().iterdir())
    files = [str(p) for p in paths if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"{folder}: no data files in this folder; supported: {', '.join(EXTENSIONS)}")
    splits: dict[str, list[str]] = {}
    unmatched = []
    for f in files:
        split = split_of(Path(f).stem)
        if split is None:
            unmatched.append(f)
        else:
            splits.setdefault(split, []).append(f)
    if not splits:
        return {"train": files}, []
    return splits, unmatched


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder rather than a hub dataset (``owner/name``)."""
    p = Path(path).expanduser()
    return p.exists() or p.suffix.lower() in EXTENSIONS or path.startswith((".", "/", "~")) or path.count("/") > 1


def load_hub(name: str, cache_dir: str | None = None) -> tuple[dict[str, list[Source]], list[str]]:
    """Loads a hub dataset with ``datasets.load_dataset(name)``; returns ({split: [source]}, unmatched split names)."""
    try:
        dd = datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(
            f"path={name!r} is not a local file or folder, and loading it as a Hugging Face hub dataset failed: "
            f"{_reason(e)}"
        ) from e
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict(train=dd)
    splits: dict[str, list[Source]] = {}
    unmatched = []
    for split_name, ds in dd.items():
        split = split_of(split_name)
        if split is None:
            unmatched.append(split_name)
        else:
            splits.setdefault(split, []).append(Source(f"{name}[{split_name}]", ds, "hub"))
    return splits, unmatched
