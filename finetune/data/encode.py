"""Rows to token ids: one ``Encoder`` per file, run through a cached ``datasets.map``.

The encoder validates every row as it goes, so an error names the file, the row, the column and what was expected.
Besides the model inputs it writes ``length``, ``truncated`` and ``no_loss`` columns, from which the statistics and
the packing are computed without touching the token lists again.
"""

import difflib
import math

import datasets

from finetune.data import preference
from finetune.data.collate import with_bos
from finetune.data.sources import Source, where
from finetune.data.templates import ROLES, TemplateError, chat_ids_and_labels, render

# format -> {logical field: required}; prediction needs no target (output, label, target)
FIELDS = {
    "text": {"text": True},
    "instruction": {"instruction": True, "input": False, "output": True},
    "chat": {"messages": True},
    "classification": {"text": True, "text_pair": False, "label": True},
    "seq2seq": {"source": True, "target": True},
    "preference": preference.FIELDS,
}
TARGET_FIELDS = {"output", "label", "target"}
# objective -> formats it can train on
OBJECTIVE_FORMATS = {
    "causal_lm": ("text", "instruction", "chat"),
    "seq2seq": ("seq2seq", "instruction"),
    "classification": ("classification",),
    "masked_lm": ("text",),
    "preference": ("preference",),
}

IDS = datasets.List(datasets.Value("int32"))
INT = datasets.Value("int64")
BOOL = datasets.Value("bool")


def resolve_columns(source: Source, fmt: str, fields: dict[str, str], predict: bool) -> dict[str, str | None]:
    """Maps each logical field of ``fmt`` to a column of ``source``; a missing required column is an error."""
    found = source.dataset.column_names
    columns: dict[str, str | None] = {}
    for field, required in FIELDS[fmt].items():
        column = fields.get(field, field)
        if column in found:
            columns[field] = column
        elif (required and not (predict and field in TARGET_FIELDS)) or field in fields:
            missing = f"{source.name}: missing column {column!r} for the {field!r} field of the {fmt!r} format"
            if not found:
                raise ValueError(f"{missing}; the file has no columns")
            taken = {fields.get(f, f) for f in FIELDS[fmt]} & set(found)  # columns other fields already read
            raise ValueError(f"{missing}; columns found: {found}. {_map_hint(field, column, found, taken)}")
        else:
            columns[field] = None
    return columns


def _map_hint(field: str, column: str, found: list[str], taken: set[str]) -> str:
    """How to map ``field`` with `fields`: to the free column whose name is closest to the missing one's (by
    ``difflib`` similarity, case-insensitive), else to one of the free columns, listed."""
    free = [c for c in found if c not in taken] or found
    by_lower = {c.lower(): c for c in free}
    close = difflib.get_close_matches(column.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f"Map fields to columns with `fields`, e.g. fields={{{field!r}: {by_lower[close[0]]!r}}}"
    return f"Map fields to columns with `fields`: fields={{{field!r}: <one of {free}>}}"


def class_names(source: Source, column: str | None) -> list[str] | None:
    """The names of a ``ClassLabel`` column, else None."""
    feature = source.dataset.features.get(column) if column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def label_name(value, names: list[str] | None, column: str) -> str:
    """A label value as a name: a ``ClassLabel`` index through its names, else ``str(value)``. Errors name the
    column; callers add the row."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"column {column!r} (label field) is empty; every row needs a label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # integer labels read as floats (a CSV or JSON column that also holds floats or blanks)
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int):
        if names is None:
            return str(value)
        if 0 <= value < len(names):
            return names[value]
        raise ValueError(f"label {value} is outside the ClassLabel names {names} of column {column!r}")
    raise ValueError(
        f"column {column!r} (label field) must hold strings or integers; found {type(value).__name__} {value!r}"
    )


def collect_labels(sources: list[Source], fields: dict[str, str]) -> list[str]:
    """Label names of a train split: a ``ClassLabel``'s names, else the values seen, sorted (integers by value)."""
    seen: dict[str, object] = {}
    for source in sources:
        if len(source.dataset) == 0:
            continue
        column = resolve_columns(source, "classification", fields, predict=False)["label"]
        names = class_names(source, column)
        if names is not None:
            return names
        for row, value in enumerate(source.dataset[column]):
            try:
                seen.setdefault(label_name(value, None, column), value)
            except ValueError as e:
                raise ValueError(f"{source.where(row)}: {e}") from e
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in seen.values()):
        return sorted(seen, key=lambda name: int(name))  # 2 before 10
    return sorted(seen)


class Encoder:
    """Encodes the rows of one file for one objective; called by ``datasets.map(batched=True, with_indices=True)``.

    Everything it holds is hashed by ``datasets`` into the cache fingerprint, so a second run with the same file,
    tokenizer and settings reuses the cached result.
    """

    VERSION = 2  # bump when the encoding changes, so that cached results are not reused

    def __init__(
        self,
        *,
        source: Source,
        columns: dict[str, str | None],
        fmt: str,
        objective: str,
        predict: bool,
        tokenizer,
        max_length: int,
        max_target_length: int,
        packing: bool,
        train_on_prompt: bool,
        prompt_template: str,
        prompt_template_no_input: str,
        chat_template: str | None,
        label_ids: dict[str, int] | None,
        labels_from: str,
    ) -> None:
        self.version = self.VERSION  # an instance attribute, so that it is part of the hash
        self.name, self.kind = source.name, source.kind
        self.class_names = class_names(source, columns.get("label"))
        self.columns, self.fmt, self.objective, self.predict = columns, fmt, objective, predict
        self.tokenizer, self.max_length, self.max_target_length = tokenizer, max_length, max_target_length
        self.packing = packing and objective == "causal_lm" and not predict
        self.train_on_prompt = train_on_prompt
        self.prompt_template, self.prompt_template_no_input = prompt_template, prompt_template_no_input
        self.chat_template = chat_template
        self.label_ids, self.labels_from = label_ids, labels_from
        self.eos = tokenizer.eos_token_id
        self.keys = list(self.features())

    # ---------------------------------------------------------------------------------------------- output schema
    def features(self) -> datasets.Features:
        """The columns this encoder writes, with fixed types so that files concatenate."""
        if self.objective == "preference":
            return datasets.Features({**preference.features(self.columns), "length": INT, "truncated": BOOL,
                                      "no_loss": BOOL})  # fmt: skip
        f = {"input_ids": IDS}
        if self.objective == "classification" and "token_type_ids" in self.tokenizer.model_input_names:
            f["token_type_ids"] = IDS
        if self.objective == "masked_lm":
            f["special_tokens_mask"] = IDS
        if not self.predict:
            if self.objective in ("causal_lm", "seq2seq"):
                f["labels"] = IDS
            elif self.objective == "classification":
                f["labels"] = INT
        f.update(length=INT, truncated=BOOL, no_loss=BOOL)
        return datasets.Features(f)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: v[n] for k, v in batch.items()} for n in range(len(indices))]
        if self.fmt == "preference":
            encoded = [preference.encode_pair(self, values, row) for values, row in zip(rows, indices, strict=True)]
        elif self.fmt == "chat":
            encoded = [self._chat(values, row) for values, row in zip(rows, indices, strict=True)]
        else:
            encoded = self._encode(rows, indices)
        return {k: [e[k] for e in encoded] for k in self.keys}

    def _encode(self, rows: list[dict], indices: list[int]) -> list[dict]:
        """Validates a batch of rows, then tokenizes each text column in one call (the fast tokenizer batches)."""

        def texts(field: str, optional: bool = False) -> list[str | None]:
            return [self._text(values, row, field, optional) for values, row in zip(rows, indices, strict=True)]

        if self.objective == "causal_lm":
            if self.fmt == "text":
                out = []
                for ids in self._ids(texts("text")):
                    # a document is [bos] text [eos], also where the tokenizer adds neither (without the bos, a
                    # packed document's first token would never be a target); a prompt to predict from is [bos] text
                    ids = with_bos(self.tokenizer, ids)
                    if not self.predict and self.eos is not None and (not ids or ids[-1] != self.eos):
                        ids = ids + [self.eos]
                    out.append(self._causal(ids, None if self.predict else list(ids)))
                return out
            prompts = self._ids([self._prompt(values, row) for values, row in zip(rows, indices, strict=True)])
            if self.predict:  # the prompt, with the tokenizer's BOS if it adds one
                return [self._causal(ids, None) for ids in prompts]
            eos = [self.eos] if self.eos is not None else []
            out = []
            for prompt, response in zip(prompts, self._ids(texts("output"), special=False), strict=True):
                masked = prompt if self.train_on_prompt else [-100] * len(prompt)
                out.append(self._causal(prompt + response + eos, masked + response + eos))
            return out
        if self.objective == "seq2seq":
            if self.fmt == "instruction":
                sources = [self._prompt(values, row) for values, row in zip(rows, indices, strict=True)]
            else:
                sources = texts("source")
            out = [
                {
                    "input_ids": enc["input_ids"],
                    "length": len(enc["input_ids"]),
                    "truncated": truncated,
                    "no_loss": False,
                }
                for enc, truncated in self._tokenize(sources, None, self.max_length)
            ]
            if not self.predict:
                targets = texts("output" if self.fmt == "instruction" else "target")
                for o, (enc, truncated) in zip(out, self._tokenize(targets, None, self.max_target_length), strict=True):
                    o.update(
                        labels=enc["input_ids"], no_loss=not enc["input_ids"], truncated=o["truncated"] or truncated
                    )
            return out
        if self.objective == "classification":
            out = []
            encoded = self._tokenize(texts("text"), texts("text_pair", optional=True), self.max_length)
            for values, row, (enc, truncated) in zip(rows, indices, encoded, strict=True):
                o = {k: enc[k] for k in ("input_ids", "token_type_ids") if k in self.keys}
                if not self.predict:
                    o["labels"] = self._label(values, row)
                out.append({**o, "length": len(enc["input_ids"]), "truncated": truncated, "no_loss": False})
            return out
        # masked_lm: the task masks tokens; the data marks the special ones, which are never masked
        return [
            {
                "input_ids": enc["input_ids"],
                "special_tokens_mask": enc["special_tokens_mask"],
                "length": len(enc["input_ids"]),
                "truncated": truncated,
                "no_loss": False,
            }
            for enc, truncated in self._tokenize(texts("text"), None, self.max_length)
        ]

    # --------------------------------------------------------------------------------------------------- helpers
    def _where(self, row: int) -> str:
        return where(self.name, self.kind, row)

    def _text(self, values: dict, row: int, field: str, optional: bool = False) -> str | None:
        """A string field; an optional one that is absent, null or empty gives None."""
        column = self.columns.get(field)
        value = values[column] if column is not None else None
        if optional and value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ValueError(
                f"{self._where(row)}: column {column!r} ({field} field) must hold a string; found "
                f"{type(value).__name__} {value!r:.80}"
            )
        return value

    def _prompt(self, values: dict, row: int) -> str:
        instruction = self._text(values, row, "instruction")
        extra = self._text(values, row, "input", optional=True)
        if extra is None:
            return self.prompt_template_no_input.format(instruction=instruction)
        return self.prompt_template.format(instruction=instruction, input=extra)

    def _label(self, values: dict, row: int) -> int:
        column = self.columns["label"]
        try:
            name = label_name(values[column], self.class_names, column)
        except ValueError as e:
            raise ValueError(f"{self._where(row)}: {e}") from e
        if name not in self.label_ids:
            raise ValueError(
                f"{self._where(row)}: label {name!r} is not among the labels of {self.labels_from}: "
                f"{list(self.label_ids)}"
            )
        return self.label_ids[name]

    def _ids(self, texts: list[str], special: bool = True) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def _tokenize(self, texts: list[str], pairs: list[str | None] | None, max_length: int) -> list[tuple[dict, bool]]:
        """Tokenizes with special tokens: [(encoding, truncated)]. Rows longer than ``max_length`` are tokenized
        again with the tokenizer's truncation, which keeps the special tokens (e.g. a final ``[SEP]`` or ``</s>``)."""
        kwargs = {"return_special_tokens_mask": self.objective == "masked_lm"}
        pairs = pairs if pairs is not None and any(p is not None for p in pairs) else None
        if pairs is None or all(p is not None for p in pairs):
            batch = self.tokenizer(texts, pairs, **kwargs)
            encodings = [{k: v[i] for k, v in batch.items()} for i in range(len(texts))]
        else:  # some rows have a pair and some don't: one at a time
            encodings = [dict(self.tokenizer(t, p, **kwargs)) for t, p in zip(texts, pairs, strict=True)]
        out = []
        for i, enc in enumerate(encodings):
            if len(enc["input_ids"]) <= max_length:
                out.append((enc, False))
            else:
                pair = pairs[i] if pairs is not None else None
                out.append(
                    (dict(self.tokenizer(texts[i], pair, truncation=True, max_length=max_length, **kwargs)), True)
                )
        return out

    def _causal(self, ids: list[int], labels: list[int] | None) -> dict:
        """Truncates a causal-LM sample: training from the right, prompts for prediction from the left (their end
        is where generation continues); packed samples are split into rows later instead."""
        truncated = len(ids) > self.max_length and not self.packing
        if truncated and self.predict:
            ids = ids[-self.max_length :]
        elif truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        out = {"input_ids": ids, "length": len(ids), "truncated": truncated, "no_loss": False}
        if labels is not None:
            # the label at position 0 has no token before it to predict it
            out.update(labels=labels, no_loss=all(label == -100 for label in labels[1:]))
        return out

    def _chat(self, values: dict, row: int) -> dict:
        messages = self._messages(values, row)
        try:
            if self.predict:
                if messages[-1]["role"] == "assistant":
                    messages = messages[:-1]  # the answer to generate
                text = render(self.tokenizer, self.chat_template, messages, True)
                return self._causal(self.tokenizer(text, add_special_tokens=False)["input_ids"], None)
            ids, labels = chat_ids_and_labels(self.tokenizer, self.chat_template, messages, self.train_on_prompt)
        except TemplateError as e:
            raise ValueError(f"{self._where(row)}: {e}") from e
        except Exception as e:  # a template's own raise_exception, e.g. "roles must alternate"
            raise ValueError(f"{self._where(row)}: the chat template failed: {type(e).__name__}: {e}") from e
        return self._causal(ids, labels)

    def _messages(self, values: dict, row: int, field: str = "messages") -> list[dict]:
        column = self.columns[field]
        messages = values[column]
        if not isinstance(messages, list) or not messages:
            raise ValueError(
                f"{self._where(row)}: column {column!r} ({field} field) must hold a non-empty list of "
                f"{{'role', 'content'}} messages; found {type(messages).__name__} {messages!r:.80}"
            )
        clean = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(m, dict) or role is None or content is None:
                raise ValueError(
                    f"{self._where(row)}: message {i} of column {column!r} must be a dict with 'role' and "
                    f"'content'; found {m!r:.80}"
                )
            if role not in ROLES:
                raise ValueError(f"{self._where(row)}: message {i} has role {role!r}; expected one of {list(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(
                    f"{self._where(row)}: message {i} content must be a string; found {type(content).__name__}"
                )
            clean.append({"role": role, "content": content})  # other keys are dropped: templates see these two
        return clean
