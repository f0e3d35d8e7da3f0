"""The ``DataModule``: files or a hub dataset -> validated, tokenized (cached), packed rows -> batches."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from finetune.bundled import resolve_path
from finetune.data import preference
from finetune.data.collate import Collator, PairCollator, pad_id
from finetune.data.encode import FIELDS, OBJECTIVE_FORMATS, Encoder, collect_labels, resolve_columns
from finetune.data.packing import PackedDataset
from finetune.data.sampling import EvalSampler, ResumableDataLoader, TrainSampler
from finetune.data.sources import (
    SPLIT_WORDS,
    SPLITS,
    TEXT_KINDS,
    TEXT_SAMPLING,
    Source,
    discover,
    load_file,
    load_hub,
    looks_local,
)
from finetune.data.templates import ALPACA, ALPACA_NO_INPUT, CHATML, check_prompt_template, tokenizer_chat_template

STAGE_SPLITS = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("predict",),
    None: SPLITS,
}
MODEL_COLUMNS = ("input_ids", "labels", "token_type_ids", "special_tokens_mask", *preference.COLUMNS)


@dataclass
class Split:
    """An encoded split: the concatenated rows of its files, or a seeded part of them (``validation_fraction``)."""

    dataset: datasets.Dataset
    files: list[str]
    starts: np.ndarray  # (F,) first row of each file in the concatenation
    rows: np.ndarray | None = None  # (N,) row in the concatenation of each row of a carved split

    def files_of(self, mask: np.ndarray) -> dict[str, int]:
        """How many of the rows selected by ``mask`` (N,) come from each file."""
        rows = np.nonzero(mask)[0]
        if self.rows is not None:
            rows = self.rows[rows]
        counts = np.bincount(np.searchsorted(self.starts, rows, side="right") - 1, minlength=len(self.files))
        return {f: int(c) for f, c in zip(self.files, counts, strict=True) if c}


class RowsDataset(torch.utils.data.Dataset):
    """Encoded rows as dicts of lists, read in batches from the Arrow table; ``row`` (the index) when asked for."""

    def __init__(self, dataset: datasets.Dataset, with_row: bool = False) -> None:
        self.dataset = dataset.select_columns([c for c in MODEL_COLUMNS if c in dataset.column_names])
        self.with_row = with_row

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, rows: list[int]) -> list[dict]:
        columns = self.dataset[rows]  # dict of lists
        items = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        if self.with_row:
            for item, row in zip(items, rows, strict=True):
                item["row"] = row
        return items

    def __getitem__(self, row: int) -> dict:
        return self.__getitems__([row])[0]


class DataModule(L.LightningDataModule):
    """Text, instruction, chat, classification or seq2seq data from files or the hub, as batches for a task.

    Rows are validated and tokenized per file through a cached ``datasets.map`` (a second run reuses the cache),
    truncation is counted and reported, and causal-LM samples can be packed. Training order comes from the
    DataModule's own samplers: seeded per epoch, sharded over data-parallel ranks, resumable mid-epoch (run the
    Trainer with ``use_distributed_sampler=False``).

    Args:
        format: How rows are laid out: text, instruction, chat, classification, seq2seq or preference.
        path: A data file, a folder or a Hugging Face hub dataset name. A folder's files (subfolders too) go to the
            split whose word their name or folder holds as a whole word (train/training, validation/valid/val/dev,
            test/testing/eval/evaluation: ``train-0.jsonl``, ``dev.csv``, ``valid/a.jsonl``; not ``devices.csv``);
            when no name holds one, all are train; else files without one are left out, with a warning.
        train_files: Train file(s), instead of `path`. Types: .jsonl, .json, .csv, .parquet, .txt (see sample_by).
        validation_files: Validation file(s).
        test_files: Test file(s).
        predict_files: File(s) to predict on; with `path` and no predict files, its test split.
        validation_fraction: Carve this fraction of the train rows out as the validation split (seeded), when there
            are no validation files.
        seed: Seed of the train order (seed + epoch) and of the validation carve.
        sample_by: How a .txt file is cut into rows (samples), as `datasets`' text builder offers: line, paragraph
            (blocks of lines separated by blank lines, their line breaks kept), document (the whole file), or auto:
            paragraph for a file in which blank lines separate the text (multi-line documents: books, articles),
            else line. Packing then packs whole paragraphs or documents, each attending only to itself.
        fields: Logical field -> column name, for columns named otherwise. Fields: text {text}; instruction
            {instruction, input (optional), output}; chat {messages}; classification {text, text_pair (optional),
            label}; seq2seq {source, target}; preference {prompt, chosen, rejected (strings, or message lists
            whose implicit prompt is their common prefix), ref_chosen_logps, ref_rejected_logps (optional)}.
        max_length: Longest sequence in tokens; longer rows are truncated (counted and reported) or, with packing,
            split.
        max_target_length: Longest seq2seq target in tokens (default: max_length).
        packing: Pack causal-LM samples back to back into rows of max_length tokens (each attends only to itself),
            so little compute goes to padding. true: whole samples (a sample that doesn't fit starts the next row;
            for instruction/chat data, whose prompts must stay with their responses); fill: every row full, the
            sample at a row's end cut there and continued in the next row (pretraining: no padding at all, as
            contiguous windows, without attending across documents). Default: on for plain text (pretraining), off
            otherwise.
        group_by_length: Train batches of rows of similar length, so that less compute goes to padding: shuffled
            megabatches of 50 batches sorted by length, as `transformers`' ``group_by_length`` (seeded, sharded and
            resumable as the plain shuffle). Default: on where rows are padded (packing off), off with packing.
        train_on_prompt: Instruction and chat data: compute the loss on the prompt too, not only on the response.
        chat_template: A Jinja chat template replacing the tokenizer's (default: the tokenizer's, else ChatML).
        prompt_template: Instruction prompt for rows with an input, with {instruction} and {input} (default:
            Alpaca's).
        prompt_template_no_input: Instruction prompt for rows without an input, with {instruction}.
        labels: Classification label names, in class-id order (default: a ClassLabel column's names, else the
            labels of the train split, sorted).
        batch_size: Rows per training batch (per device).
        eval_batch_size: Rows per validation/test/predict batch (default: batch_size).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Pad the sequence length of each batch up to a multiple of this.
        cache_dir: Folder of the `datasets` cache (default: the `datasets` default, ~/.cache/huggingface/datasets).
        tokenizer: A tokenizer, or the path or hub name of one; set by the task from its model.
        objective: What the task trains: causal_lm, seq2seq, classification, masked_lm or preference; set by the
            task.

    Attributes:
        label_names: Classification label names in class-id order (after ``setup``).
        stats: Per split (after ``setup``): rows, tokens (input tokens after truncation), truncated_rows,
            no_loss_rows (rows with no label to learn from), packed_rows (rows after packing; 0 without),
            split_rows (samples longer than max_length cut into pieces for packing).
    """

    def __init__(
        self,
        format: Literal["text", "instruction", "chat", "classification", "seq2seq", "preference"] = "text",
        path: str | None = None,
        train_files: str | list[str] | None = None,
        validation_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        validation_fraction: float | None = None,
        seed: int = 0,
        sample_by: Literal["auto", "line", "paragraph", "document"] = "auto",
        fields: dict[str, str] | None = None,
        max_length: int = 1024,
        max_target_length: int | None = None,
        packing: bool | Literal["fill"] | None = None,
        group_by_length: bool | None = None,
        train_on_prompt: bool = False,
        chat_template: str | None = None,
        prompt_template: str = ALPACA,
        prompt_template_no_input: str = ALPACA_NO_INPUT,
        labels: list[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        cache_dir: str | None = None,
        tokenizer: Any = None,
        objective: str = "causal_lm",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        # Relative paths that don't exist here are looked up in the bundled recipes folder (bundled data).
        self.format, self.path, self.objective = format, resolve_path(path) if path else path, objective
        self.files = {
            "train": _as_list(train_files),
            "validation": _as_list(validation_files),
            "test": _as_list(test_files),
            "predict": _as_list(predict_files),
        }
        self.validation_fraction, self.seed, self.sample_by = validation_fraction, seed, sample_by
        self.fields = dict(fields or {})
        self.max_length = max_length
        self.max_target_length = max_target_length or max_length
        if packing is None:
            packing = format == "text" and objective == "causal_lm"
        self.packing, self.train_on_prompt = packing, train_on_prompt
        self.group_by_length = not packing if group_by_length is None else group_by_length
        self.chat_template = chat_template
        self.prompt_template, self.prompt_template_no_input = prompt_template, prompt_template_no_input
        self.labels = list(labels) if labels is not None else None
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of = num_workers, pad_to_multiple_of
        self.cache_dir = cache_dir
        self.tokenizer = tokenizer
        self.label_names: list[str] | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self._sources: dict[str, list[Source]] = {}
        self._discovered: dict[str, list[Source]] | None = None
        self._encoded: dict[str, Split] = {}
        self._datasets: dict[str, torch.utils.data.Dataset] = {}
        self._check()

    # ---------------------------------------------------------------------------------------------- configuration
    def _check(self) -> None:
        """Raises a ValueError for settings that can't work together."""
        if self.format not in FIELDS:
            raise ValueError(f"format={self.format!r}; expected one of {list(FIELDS)}")
        if self.sample_by not in TEXT_SAMPLING:
            raise ValueError(f"sample_by={self.sample_by!r}; expected one of {list(TEXT_SAMPLING)}")
        if self.objective not in OBJECTIVE_FORMATS:
            raise ValueError(f"objective={self.objective!r}; expected one of {list(OBJECTIVE_FORMATS)}")
        if self.format not in OBJECTIVE_FORMATS[self.objective]:
            raise ValueError(
                f"format={self.format!r} can't be used for the {self.objective!r} objective; it takes "
                f"{' or '.join(OBJECTIVE_FORMATS[self.objective])} data"
            )
        if self.packing and self.group_by_length:
            raise ValueError("group_by_length=True is for padded rows; packed rows are all max_length long")
        if self.packing not in (True, False, "fill"):
            raise ValueError(f"packing={self.packing!r}; expected true, false or fill")
        if self.packing and self.objective != "causal_lm":
            raise ValueError(f"packing={self.packing} is for causal_lm only, not {self.objective!r}")
        unknown = set(self.fields) - set(FIELDS[self.format])
        if unknown:
            raise ValueError(
                f"fields: unknown field(s) {sorted(unknown)} for the {self.format!r} format; its fields are "
                f"{list(FIELDS[self.format])}"
            )
        if self.path is not None and any(self.files[s] for s in ("train", "validation", "test")):
            raise ValueError("give either `path` or train_files/validation_files/test_files, not both")
        if self.validation_fraction is not None:
            if not 0 < self.validation_fraction < 1:
                raise ValueError(f"validation_fraction={self.validation_fraction}; expected a number in (0, 1)")
            if self.files["validation"]:
                raise ValueError("give either validation_files or validation_fraction, not both")
        for name, value in [("max_length", self.max_length), ("max_target_length", self.max_target_length),
                            ("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch_size)]:  # fmt: skip
            if value < 1:
                raise ValueError(f"{name}={value}; expected a positive integer")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: {self.labels} has duplicates")
        if self.format == "instruction":
            check_prompt_template(self.prompt_template, "prompt_template", needs_input=True)
            check_prompt_template(self.prompt_template_no_input, "prompt_template_no_input", needs_input=False)

    def _load_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("DataModule.tokenizer is not set: the task sets it from its model, or pass one")
        if isinstance(self.tokenizer, str | os.PathLike):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer), trust_remote_code=False)
        return self.tokenizer

    @property
    def used_chat_template(self) -> str | None:
        """The Jinja template chat rows are rendered with: ``chat_template``, else the tokenizer's, else ChatML;
        None for the other formats. The run saves it with its tokenizer, and its end of turn stops generation."""
        return self.rendering_template() if self.format == "chat" else None

    def rendering_template(self) -> str:
        """``chat_template``, else the tokenizer's, else ChatML: what message lists are rendered with (chat rows, and
        preference rows given as messages; the latter's run keeps the tokenizer's own template)."""
        return self.chat_template or tokenizer_chat_template(self._load_tokenizer()) or CHATML

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, else its EOS, else 0."""
        return pad_id(self._load_tokenizer())

    # ------------------------------------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Loads and tokenizes into the `datasets` cache once per node, before `setup` runs on every process."""
        trainer = getattr(self, "trainer", None)
        stage = getattr(getattr(trainer, "state", None), "fn", None)
        for split in self._splits_for(getattr(stage, "value", None)):
            self._split(split)

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits of ``stage`` (fit, validate, test, predict; None: all that have data)."""
        self._check()
        self._load_tokenizer()
        for split in self._splits_for(stage):
            self._dataset(split)

    def _splits_for(self, stage: str | None) -> tuple[str, ...]:
        """The splits a stage needs; fit needs train (an error if missing), validation only if there is some."""
        if stage in (None, "fit"):
            return tuple(s for s in STAGE_SPLITS[stage] if (stage == "fit" and s == "train") or self._has(s))
        return STAGE_SPLITS[stage]

    def _has(self, split: str) -> bool:
        if split == "validation" and self.validation_fraction is not None:
            return self._has("train")
        return bool(self._raw(split))

    # ----------------------------------------------------------------------------------------------- raw sources
    def _raw(self, split: str) -> list[Source]:
        """The sources of a split, loaded once: its files, else what `path` holds for it."""
        if split not in self._sources:
            if self.files[split] or self.path is None:
                self._sources[split] = [self._load(f) for f in self.files[split]]
            else:
                if self._discovered is None:
                    self._discovered = self._discover()
                self._sources[split] = self._discovered.get(split, [])
        return self._sources[split]

    def _load(self, file: str) -> Source:
        """One data file; says how a .txt file was cut into rows when ``sample_by=auto`` chose paragraphs."""
        source = load_file(file, self.cache_dir, self.sample_by)
        if self.sample_by == "auto" and source.kind == TEXT_KINDS["paragraph"]:
            rank_zero_info(
                f"{file}: blank lines separate its text, so each paragraph is a row ({len(source.dataset)} rows); "
                "set data.sample_by=line for a row per line"
            )
        return source

    def _discover(self) -> dict[str, list[Source]]:
        path = self.path
        if Path(path).expanduser().is_dir():
            files, unmatched = discover(path)
            sources = {split: [self._load(f) for f in fs] for split, fs in files.items()}
        elif Path(path).expanduser().is_file():
            sources, unmatched = {"train": [self._load(path)]}, []
        elif looks_local(path):
            raise FileNotFoundError(f"path={path}: no such data file or folder")
        else:
            sources, unmatched = load_hub(path, self.cache_dir)
        for split, split_sources in sources.items():
            for source in split_sources:
                rank_zero_info(f"data.path: {source.name} -> {split} split")
        if unmatched:
            words = "; ".join(f"{split}: {'/'.join(names)}" for split, names in SPLIT_WORDS.items())
            rank_zero_warn(
                f"path={path}: ignoring {unmatched}: their names hold no split word ({words}) while other names do; "
                "rename them, or name files per split with train_files/validation_files/test_files"
            )
        if "validation" in sources and self.validation_fraction is not None:
            names = [s.name for s in sources["validation"]]
            raise ValueError(f"path={path} has validation data {names}; give either it or validation_fraction")
        if "test" in sources and "predict" not in sources:
            sources["predict"] = sources["test"]  # predict on the test split unless predict_files are given
        return sources

    # -------------------------------------------------------------------------------------------------- encoding
    def _resolve_labels(self, required: bool) -> None:
        """Sets ``label_names``: `labels`, else collected from the train split (needed unless only predicting)."""
        if self.format != "classification" or self.label_names is not None:
            return
        if self.labels is not None:
            self.label_names = list(self.labels)
        elif self._raw("train"):
            self.label_names = collect_labels(self._raw("train"), self.fields)
        elif required:
            raise ValueError("classification needs label names: pass `labels`, or train data to collect them from")

    def _encode_source(self, source: Source, split: str) -> datasets.Dataset:
        predict = split == "predict"
        columns = resolve_columns(source, self.format, self.fields, predict)
        template = self.rendering_template() if self.format in ("chat", "preference") else None
        encoder = Encoder(
            source=source,
            columns=columns,
            fmt=self.format,
            objective=self.objective,
            predict=predict,
            tokenizer=self._load_tokenizer(),
            max_length=self.max_length,
            max_target_length=self.max_target_length,
            packing=bool(self.packing),
            train_on_prompt=self.train_on_prompt,
            prompt_template=self.prompt_template,
            prompt_template_no_input=self.prompt_template_no_input,
            chat_template=template,
            label_ids={name: i for i, name in enumerate(self.label_names or [])},
            labels_from="`labels`" if self.labels is not None else "the train split",
        )
        return source.dataset.map(
            encoder,
            batched=True,
            with_indices=True,
            remove_columns=source.dataset.column_names,
            features=encoder.features(),
            desc=f"Tokenizing {source.name}",
        )

    def _split(self, split: str) -> Split:
        """The encoded rows of a split (train and validation carved from the train files by validation_fraction)."""
        if split not in self._encoded:
            if self.validation_fraction is not None and split in ("train", "validation"):
                self._encoded.update(self._carve(self._concat("train")))
            else:
                self._encoded[split] = self._concat(split)
        return self._encoded[split]

    def _concat(self, split: str) -> Split:
        """The encoded rows of a split's files, concatenated (each file's encoding is cached by `datasets`)."""
        sources = self._raw(split)
        if not sources:
            hint = "predict_files (or `path` with a test split)" if split == "predict" else f"{split}_files or `path`"
            raise ValueError(f"no {split} data: set {hint}")
        names = [s.name for s in sources]
        if sum(len(s.dataset) for s in sources) == 0:
            raise ValueError(f"the {split} split has 0 rows: {', '.join(names)} hold no data")
        self._load_tokenizer()
        self._resolve_labels(required=split != "predict")
        parts = [self._encode_source(s, split) for s in sources if len(s.dataset)]
        starts = np.cumsum([0] + [len(s.dataset) for s in sources])[:-1]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return Split(dataset, names, starts)

    def _carve(self, full: Split) -> dict[str, Split]:
        """Splits the train rows into train and validation by a seeded permutation (both kept in file order)."""
        n = len(full.dataset)
        n_val = round(n * self.validation_fraction)
        if not 0 < n_val < n:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} of {n} train rows leaves "
                f"{'no validation' if n_val == 0 else 'no train'} rows"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).numpy()
        parts = {"validation": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
        return {split: Split(full.dataset.select(rows), full.files, full.starts, rows) for split, rows in parts.items()}

    # ------------------------------------------------------------------------------------------ stats, datasets
    def _dataset(self, split: str) -> torch.utils.data.Dataset:
        """The torch dataset of a split: packed rows or encoded rows. Records ``stats`` and warns on truncation."""
        if split in self._datasets:
            return self._datasets[split]
        enc = self._split(split)
        table = enc.dataset.select_columns(["length", "truncated", "no_loss"]).with_format("numpy")[:]
        lengths, truncated, no_loss = table["length"], table["truncated"], table["no_loss"]
        packed = self.packing and split != "predict"
        rows = enc.dataset
        if self.objective == "preference" and no_loss.any():  # pairs whose prompt alone fills max_length
            rows = rows.select(np.nonzero(~no_loss)[0])
        data = (
            PackedDataset(rows, self.max_length, self.packing == "fill")
            if packed
            else RowsDataset(rows, split == "predict")
        )
        n = len(lengths)
        self.stats[split] = {
            "rows": n,
            "tokens": int(lengths.sum()),
            "truncated_rows": int(truncated.sum()),
            "no_loss_rows": int(no_loss.sum()),
            "packed_rows": len(data) if packed else 0,
            "split_rows": data.split_samples if packed else 0,
        }
        self._report(split, enc, n, truncated, no_loss, data.split_samples if packed else 0)
        self._datasets[split] = data
        return data

    def _report(self, split: str, enc: Split, n: int, truncated, no_loss, split_rows: int) -> None:
        """Warns once per split about rows truncated, split or left without loss tokens, naming their files."""
        messages = []
        if truncated.any():
            side = "left (the end of each prompt is kept)" if split == "predict" else "right"
            messages.append(
                f"{_count(truncated.sum(), n)} longer than max_length={self.max_length}"
                f"{' (or a target longer than max_target_length)' if self.objective == 'seq2seq' else ''} were "
                f"truncated from the {side} ({_by_file(enc.files_of(truncated))})"
            )
        if split_rows:
            messages.append(
                f"{_count(split_rows, n)} longer than max_length={self.max_length} were split into "
                f"{self.max_length}-token pieces for packing"
            )
        if no_loss.any() and self.objective == "preference":
            messages.append(
                f"{_count(no_loss.sum(), n)} were dropped: the prompt alone fills max_length={self.max_length} "
                f"({_by_file(enc.files_of(no_loss))})"
            )
        elif no_loss.any():
            messages.append(
                f"{_count(no_loss.sum(), n)} have no tokens to compute the loss on (a response cut entirely by "
                f"truncation, an empty response, or no assistant turn) ({_by_file(enc.files_of(no_loss))})"
            )
        if messages:
            rank_zero_warn(f"{split} split: " + "; ".join(messages))

    def fit_splits(self) -> dict[str, tuple[torch.utils.data.Dataset, Collator]]:
        """The splits ``fit`` reads (train, and validation when there is some): split -> (torch dataset, collator),
        for a pass over every row in order (e.g. the reference log-probs of preference pairs)."""
        return {s: (self._dataset(s), self._collator(s)) for s in self._splits_for("fit")}

    def add_columns(self, split: str, columns: dict[str, np.ndarray]) -> None:
        """Adds (or replaces) per-row columns of ``split``, one value per row of its torch dataset in order; the
        collator passes them on (preference: ``ref_chosen_logps``/``ref_rejected_logps``)."""
        data = self._dataset(split)
        for name, values in columns.items():
            if len(values) != len(data):
                raise ValueError(f"{split} split: column {name!r} has {len(values)} values for {len(data)} rows")
            if name in data.dataset.column_names:
                data.dataset = data.dataset.remove_columns(name)
            data.dataset = data.dataset.add_column(name, np.asarray(values))

    # ----------------------------------------------------------------------------------------------- dataloaders
    def _replicas(self) -> tuple[int, int]:
        """(num_replicas, rank) of data parallelism, from the Trainer's strategy when there is one."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)

    def _collator(self, split: str) -> Collator:
        kind = PairCollator if self.objective == "preference" else Collator
        return kind(
            self.pad_token_id,
            left=split == "predict" and self.objective == "causal_lm",  # generation continues at the right end
            pad_to_multiple_of=self.pad_to_multiple_of,
            count_targets=self.objective == "seq2seq",
        )

    def train_dataloader(self) -> ResumableDataLoader:
        data = self._dataset("train")
        num_replicas, rank = self._replicas()
        lengths = None
        if self.group_by_length:
            lengths = self._split("train").dataset.select_columns(["length"]).with_format("numpy")[:]["length"]
        accumulate = getattr(getattr(self, "trainer", None), "accumulate_grad_batches", 1)
        sampler = TrainSampler(len(data), seed=self.seed, num_replicas=num_replicas, rank=rank, lengths=lengths,
                               rows_per_step=self.batch_size * accumulate)  # fmt: skip
        return ResumableDataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collator("train"),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )

    def _eval_dataloader(self, split: str) -> torch.utils.data.DataLoader:
        data = self._dataset(split)
        num_replicas, rank = self._replicas()
        return torch.utils.data.DataLoader(
            data,
            batch_size=self.eval_batch_size,
            sampler=EvalSampler(len(data), num_replicas=num_replicas, rank=rank),
            collate_fn=self._collator(split),
            num_workers=self.num_workers,
            generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        """A loader's own generator: each new iterator draws its worker seed from it, not from the global RNG,
        which would shift the dropout masks of a resumed run (its iterator starts where the first run's didn't)."""
        return torch.Generator().manual_seed(self.seed)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        """The validation loader; an empty list (no validation) when there is no validation data."""
        return self._eval_dataloader("validation") if self._has("validation") else []

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_dataloader("predict")


def _as_list(files: str | list[str] | None) -> list[str]:
    if files is None:
        return []
    files = [files] if isinstance(files, str | os.PathLike) else files
    return [resolve_path(str(f)) for f in files]


def _count(k, n: int) -> str:
    return f"{int(k)} of {n} rows ({100 * int(k) / n:.1f}%)"


def _by_file(counts: dict[str, int]) -> str:
    return ", ".join(f"{f}: {c}" for f, c in counts.items())
