"""The `tokenizers` pipeline components a byte-level BPE file may use, built from their tokenizer.json specs.

Supported: normalizer null / NFC / NFD / NFKC / NFKD / Sequence of those; pre_tokenizer ByteLevel, or a Sequence
of Split(Regex or String, behavior Isolated, invert false) steps ending in ByteLevel; post_processor null /
ByteLevel / TemplateProcessing / Sequence of those; decoder ByteLevel. Anything else raises a ValueError naming
the file, the JSON key and the value, rather than encoding differently from `tokenizers`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune.tokenizer.pretokenize import GPT2_PATTERN, GPT2_SPLIT, RegexSplit, unicode_normalizer

# What a trained tokenizer is saved with (the same as `tokenizers` writes for a GPT-2-style byte-level BPE).
TRAINED_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
TRAINED_POST_PROCESSOR = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
TRAINED_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def unsupported(source: str, key: str, value: Any, hint: str = "") -> ValueError:
    """The error for a tokenizer.json component this implementation does not reproduce exactly."""
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return ValueError(f"{source}: unsupported {key} = {shown}" + (f" ({hint})" if hint else ""))


def _type_of(spec: Any, source: str, key: str) -> str:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise unsupported(source, key, spec, "expected an object with a 'type'")
    return spec["type"]


# --------------------------------------------------------------------------------------------------------------
# Normalizer
# --------------------------------------------------------------------------------------------------------------


def build_normalizer(spec: Any, source: str, key: str = "normalizer") -> Callable[[str], str] | None:
    """A str -> str function, or None for no normalizer."""
    if spec is None:
        return None
    kind = _type_of(spec, source, key)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicode_normalizer(kind)
    if kind == "Sequence":
        steps = [build_normalizer(s, source, f"{key}.normalizers[{i}]") for i, s in enumerate(spec["normalizers"])]
        steps = [s for s in steps if s is not None]

        def sequence(text: str) -> str:
            for step in steps:
                text = step(text)
            return text

        return sequence
    raise unsupported(source, f"{key}.type", kind, "supported: NFC, NFD, NFKC, NFKD, Sequence")


# --------------------------------------------------------------------------------------------------------------
# Pre-tokenizer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PreTokenizer:
    """Regex splits, then ByteLevel (optional prefix space, optional GPT-2 split; the byte mapping itself is done
    by the caller, word by word, so its cache can be keyed on the raw word)."""

    splits: list[RegexSplit] = field(default_factory=list)
    add_prefix_space: bool = False
    byte_split: RegexSplit | None = GPT2_SPLIT

    def words(self, text: str) -> list[str]:
        if not self.splits and not self.add_prefix_space:  # the GPT-2 layout: one regex pass
            return self.byte_split(text) if self.byte_split is not None else [text]
        parts = [text]
        for split in self.splits:
            parts = [p for part in parts for p in split(part)]
        if self.add_prefix_space:
            parts = [p if p.startswith(" ") else " " + p for p in parts]
        if self.byte_split is not None:
            parts = [p for part in parts for p in self.byte_split(part)]
        return parts


def _flatten(spec: Any, source: str, key: str) -> list[tuple[str, dict]]:
    if _type_of(spec, source, key) == "Sequence":
        steps = []
        for i, s in enumerate(spec.get("pretokenizers", [])):
            steps += _flatten(s, source, f"{key}.pretokenizers[{i}]")
        return steps
    return [(key, spec)]


def build_pre_tokenizer(spec: Any, source: str) -> PreTokenizer:
    if spec is None:
        raise unsupported(source, "pre_tokenizer", None, "a byte-level BPE needs a ByteLevel pre-tokenizer")
    steps = _flatten(spec, source, "pre_tokenizer")
    pre = PreTokenizer(byte_split=None)
    for n, (key, step) in enumerate(steps):
        kind = step["type"]
        if kind == "ByteLevel":
            if n != len(steps) - 1:
                raise unsupported(source, f"{key}.type", kind, "ByteLevel must be the last pre-tokenizer")
            pre.add_prefix_space = bool(step.get("add_prefix_space", True))
            pre.byte_split = GPT2_SPLIT if step.get("use_regex", True) else None
        elif kind == "Split":
            pattern = step.get("pattern")
            if not isinstance(pattern, dict) or len(pattern) != 1 or not {"Regex", "String"} >= set(pattern):
                raise unsupported(source, f"{key}.pattern", pattern, "expected {'Regex': ...} or {'String': ...}")
            if step.get("behavior") != "Isolated":
                raise unsupported(source, f"{key}.behavior", step.get("behavior"), "only 'Isolated' is supported")
            if step.get("invert", False):
                raise unsupported(source, f"{key}.invert", step.get("invert"), "only false is supported")
            if "Regex" in pattern:
                text = pattern["Regex"]
                pre.splits.append(GPT2_SPLIT if text == GPT2_PATTERN else RegexSplit(text))
            else:
                pre.splits.append(RegexSplit(pattern["String"], literal=True))
        else:
            raise unsupported(source, f"{key}.type", kind, "supported: ByteLevel, Split, Sequence")
    if not steps or steps[-1][1]["type"] != "ByteLevel":
        raise unsupported(source, "pre_tokenizer", spec, "a byte-level BPE needs a ByteLevel pre-tokenizer last")
    return pre


# --------------------------------------------------------------------------------------------------------------
# Post-processor and decoder
# --------------------------------------------------------------------------------------------------------------

PostProcess = Callable[[list[int]], list[int]]


def _template(spec: dict, source: str, key: str) -> PostProcess:
    """TemplateProcessing's single-sequence template: $A with special tokens around it."""
    specials = spec.get("special_tokens", {})
    pieces: list[list[int] | None] = []  # None marks the sequence itself
    for i, piece in enumerate(spec.get("single", [])):
        where = f"{key}.single[{i}]"
        if "Sequence" in piece:
            if piece["Sequence"].get("id") != "A":
                raise unsupported(source, where, piece, "a single-sequence template can only hold $A")
            pieces.append(None)
        elif "SpecialToken" in piece:
            name = piece["SpecialToken"].get("id")
            if name not in specials or not isinstance(specials[name].get("ids"), list):
                raise unsupported(source, where, piece, f"{name!r} is not in {key}.special_tokens")
            pieces.append([int(x) for x in specials[name]["ids"]])
        else:
            raise unsupported(source, where, piece)

    def apply(ids: list[int]) -> list[int]:
        out: list[int] = []
        for p in pieces:
            out.extend(ids if p is None else p)
        return out

    return apply


def build_post_processor(spec: Any, source: str, key: str = "post_processor") -> PostProcess | None:
    """What `encode(..., add_special_tokens=True)` applies to a single sequence's ids (None: nothing)."""
    if spec is None:
        return None
    kind = _type_of(spec, source, key)
    if kind == "ByteLevel":  # only trims offsets
        return None
    if kind == "TemplateProcessing":
        return _template(spec, source, key)
    if kind == "Sequence":
        steps = [build_post_processor(s, source, f"{key}.processors[{i}]") for i, s in enumerate(spec["processors"])]
        steps = [s for s in steps if s is not None]
        if not steps:
            return None

        def sequence(ids: list[int]) -> list[int]:
            for step in steps:
                ids = step(ids)
            return ids

        return sequence
    raise unsupported(source, f"{key}.type", kind, "supported: ByteLevel, TemplateProcessing, Sequence")


def check_decoder(spec: Any, source: str) -> None:
    if _type_of(spec, source, "decoder") != "ByteLevel":
        raise unsupported(source, "decoder.type", spec["type"], "only ByteLevel is supported")
