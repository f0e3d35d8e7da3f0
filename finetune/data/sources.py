"""Finding and loading raw data: local files (one ``datasets.Dataset`` per file, so that errors can name the file
and the row within it), folders (split by the words of file and folder names) and Hugging Face hub datasets.

Rows are numbered from 0 within their file, as ``dataset[i]`` numbers them; for line-based files (JSONL, CSV, TXT)
errors also give the 1-based line number an editor shows.
"""

import csv
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

# file extension -> the `datasets` packaged builder that reads it
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPLITS = ("train", "validation", "test", "predict")
# split -> the words that name it in a file, folder or hub split name: `datasets`' SPLIT_KEYWORDS
# (datasets.data_files), so a folder splits here as `load_dataset(folder)` splits it
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
# what separates the words of a name: `datasets`' NON_WORDS_CHARS "-._ 0-9"
WORD_DELIMITERS = re.compile(r"[-._ 0-9]+")
# files in a data folder that are never data (`datasets`' FILES_TO_IGNORE, of the types read here)
NOT_DATA = {"config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}


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
    """The split a name belongs to: a file's path relative to its data folder, or a hub split name.

    A name is cut into words at delimiters (``-``, ``_``, ``.``, space, digits), folder by folder and then the file
    name without its extension, all lower case. The first word that is a split word decides:
    train/training -> train; validation/valid/val/dev -> validation; test/testing/eval/evaluation -> test. So
    ``train-00000-of-00002.parquet``, ``val_2.csv``, ``dev.txt``, ``test_a.jsonl``, ``imdb_test.csv`` and
    ``valid/part.jsonl`` name their splits, while ``valentine_stories.txt``, ``devices.csv`` and
    ``testimonials.jsonl`` name none (a split word must be a whole word, not the start of a longer one).
    """
    *folders, file = Path(name.lower()).parts or ("",)
    parts = [*folders, Path(file).stem if Path(file).suffix in EXTENSIONS else file]
    for word in (w for part in parts for w in WORD_DELIMITERS.split(part)):
        for split, words in SPLIT_WORDS.items():
            if word in words:
                return split
    return None


def discover(folder: str) -> tuple[dict[str, list[str]], list[str]]:
    """Sorts the data files under ``folder`` (and its subfolders) into splits by ``split_of`` their path in it.

    The rule is that of `datasets`' ``load_dataset(folder)``: when no file or folder name holds a split word, every
    file is train; otherwise files that hold none are left out (returned, so that the caller can warn). Where this
    differs from `datasets`: names are read case-insensitively; a file holding words of two splits goes to the
    first (`datasets` puts it in both); folder and file names are read together (`datasets` ignores split words in
    file names once any folder name holds one); a file in a subfolder is data only when its path holds a split word
    (so ``tokenizer/tokenizer.json`` beside ``train.txt`` is not data). Hidden files and folders (``.x``, ``__x``)
    and `datasets`' metadata files (``dataset_info.json``, ...) are skipped.

    Returns ({split: files}, files that matched no split), files in sorted path order.
    """
    root = Path(folder).expanduser()
    files = [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in EXTENSIONS
        and p.name not in NOT_DATA
        and not any(part.startswith((".", "__")) for part in p.relative_to(root).parts)
    ]
    splits: dict[str, list[str]] = {}
    unmatched = []
    for p in files:
        split = split_of(str(p.relative_to(root)))
        if split is not None:
            splits.setdefault(split, []).append(str(p))
        elif p.parent == root:  # in a subfolder, only names with a split word are data (not tokenizer/*.json)
            unmatched.append(str(p))
    if not splits and not unmatched:
        raise FileNotFoundError(f"{folder}: no data files in this folder; supported: {', '.join(EXTENSIONS)}")
    if not splits:
        return {"train": unmatched}, []
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
