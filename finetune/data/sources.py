"""Finding and loading raw data: local files (one ``datasets.Dataset`` per file, so that errors can name the file
and the row within it), folders (split by the words of file and folder names) and Hugging Face hub datasets.

Rows are numbered from 0 within their file, as ``dataset[i]`` numbers them; for line-based files (JSONL, CSV, TXT)
errors also give the 1-based line number an editor shows.

A ``.txt`` file is read by line, by paragraph (blocks of lines separated by blank lines) or as one document, as the
``sample_by`` of `datasets`' text builder offers; ``auto`` (the default) reads by paragraph a file whose text is
separated by blank lines (books, articles, collections of multi-line documents) and by line any other.
"""

import csv
import itertools
import json
import re
from collections.abc import Iterator
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
# how a .txt file is cut into rows (`sample_by`); `kind` of a .txt source after "auto" is resolved
TEXT_SAMPLING = ("auto", "line", "paragraph", "document")
TEXT_KINDS = {"line": "text", "paragraph": "paragraphs", "document": "document"}


@dataclass
class Source:
    """One file (or one hub split) of raw rows."""

    name: str  # the path as the user gave it, or "dataset[split]" for the hub
    dataset: datasets.Dataset
    kind: str  # json, csv, parquet, text (a row per line), paragraphs, document (a row per file) or hub

    def where(self, row: int) -> str:
        """Names row ``row`` of this source for an error message: ``"data.jsonl row 3 (line 5)"``."""
        return where(self.name, self.kind, row)


def where(name: str, kind: str, row: int) -> str:
    """Names a row of a file; line numbers are looked up only here, when an error is being reported."""
    line = _line_of(name, row, kind) if kind in ("json", "csv", *TEXT_KINDS.values()) else None
    return f"{name} row {row}" + (f" (line {line})" if line is not None else "")


def _line_of(path: str, row: int, kind: str = "text") -> int | None:
    """The 1-based line on which row ``row`` of a line-based file starts (None for a JSON array file)."""
    p = Path(path).expanduser()
    try:
        if kind == "document":
            return 1
        if kind == "paragraphs":
            return next(itertools.islice((line for line, _ in paragraphs(p)), row, None), None)
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
            "(.txt: a row per line, or per paragraph where blank lines separate the text: see sample_by)"
        )
    return builder


def load_file(path: str, cache_dir: str | None = None, sample_by: str = "auto") -> Source:
    """Loads one data file with ``datasets`` (cached as Arrow under ``cache_dir``). An empty file gives 0 rows.

    ``sample_by`` cuts a .txt file into rows: ``line``, ``paragraph`` (blank-line separated blocks, their line breaks
    kept), ``document`` (the whole file) or ``auto`` (paragraph when blank lines separate the text, else line)."""
    if sample_by not in TEXT_SAMPLING:
        raise ValueError(f"sample_by={sample_by!r}; expected one of {list(TEXT_SAMPLING)}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    builder = check_extension(path)
    if _has_no_rows(file):
        return Source(path, datasets.Dataset.from_dict({}), builder)
    if builder == "text":
        if sample_by == "auto":
            sample_by = "paragraph" if has_blank_line_separators(file) else "line"
        if sample_by != "line":
            return Source(path, _load_text_blocks(file, sample_by, cache_dir), TEXT_KINDS[sample_by])
    try:
        ds = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=cache_dir)
    except Exception as e:
        problem = _diagnose_jsonl(file) if file.suffix.lower() == ".jsonl" else None
        raise ValueError(
            problem or f"{path}: could not load it as {Path(path).suffix} ({builder}): {_reason(e)}"
        ) from e
    return Source(path, ds, builder)


def has_blank_line_separators(path: Path) -> bool:
    """Whether a blank (or whitespace-only) line stands between two lines of text: the file holds paragraphs."""
    seen_text = seen_blank = False
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                seen_blank = seen_text
            elif seen_blank:
                return True
            else:
                seen_text = True
    return False


def paragraphs(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based start line, text) of each paragraph of a text file: its runs of non-blank lines, joined by "\\n"
    (a blank line holds only whitespace; any number of them separate two paragraphs)."""
    block: list[str] = []
    start = 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                if not block:
                    start = number
                block.append(line.rstrip("\r\n"))
            elif block:
                yield start, "\n".join(block)
                block = []
    if block:
        yield start, "\n".join(block)


def _text_rows(path: str, sample_by: str, size: int, mtime_ns: int) -> Iterator[dict[str, str]]:
    """Rows of a .txt file by paragraph or as one document (size and mtime key the `datasets` cache)."""
    if sample_by == "document":
        yield {"text": Path(path).read_text(encoding="utf-8").rstrip("\r\n")}
    else:
        yield from ({"text": text} for _, text in paragraphs(Path(path)))


def _load_text_blocks(file: Path, sample_by: str, cache_dir: str | None) -> datasets.Dataset:
    """A .txt file read by paragraph or document, into a `datasets` Arrow cache like the other builders'."""
    stat = file.stat()
    kwargs = dict(path=str(file.resolve()), sample_by=sample_by, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    try:
        return datasets.Dataset.from_generator(
            _text_rows, gen_kwargs=kwargs, features=datasets.Features(text=datasets.Value("string")),
            cache_dir=cache_dir,
        )  # fmt: skip
    except Exception as e:
        raise ValueError(f"{file}: could not read it by {sample_by}: {_reason(e)}") from e


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
