"""Everything before the BPE model: the GPT-2 byte <-> unicode map, regex splits, Unicode normalizers.

Each piece behaves as the `tokenizers` component of the same name (the ids must match exactly), including where
Python's Unicode tables are newer than the ones compiled into `tokenizers` (see `unicode_tables`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import regex

from finetune.tokenizer.unicode_tables import (
    CANONICAL_UNKNOWN,
    COMPATIBILITY_UNKNOWN,
    ONIG_UNKNOWN_LETTERS_NUMBERS,
)

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68 bytes
    (controls, space, ...) to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(out.items()))


BYTE_TO_CHAR: tuple[str, ...] = tuple(bytes_to_unicode().values())
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
_LATIN1_TO_BYTE_CHAR = {b: ord(c) for b, c in enumerate(BYTE_TO_CHAR)}


def byte_level(text: str) -> str:
    """`text`'s UTF-8 bytes as GPT-2 byte characters (what ByteLevel hands the model)."""
    # latin-1 turns each byte into the code point of the same value, which translate() then maps
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHAR)


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(
        regex.escape(chr(a)) if a == b else f"{regex.escape(chr(a))}-{regex.escape(chr(b))}" for a, b in ranges
    )


# Letters/numbers of Unicode 17 that Oniguruma (Unicode 16) sees as unassigned. Text holding one is split with
# each of them replaced by U+0378 (unassigned in every version), which any pattern treats the way Oniguruma does.
_ONIG_UNKNOWN = regex.compile(f"[{_char_class(ONIG_UNKNOWN_LETTERS_NUMBERS)}]")
_UNASSIGNED = "\u0378"


def _ascii_pattern(pattern: str) -> re.Pattern | None:
    """An ASCII-only stdlib `re` twin of `pattern` (about 2.5x faster than `regex` on ASCII text), or None.

    Only `\\p{L}` and `\\p{N}` are rewritten (to A-Za-z and 0-9); with re.ASCII, `\\s`, `\\S` and case folding
    are the ASCII restrictions of Oniguruma's Unicode ones, so on ASCII text both match the same spans."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            esc = pattern[i : i + 5]
            if esc in (r"\p{L}", r"\p{N}"):
                body = "A-Za-z" if esc == r"\p{L}" else "0-9"
                out.append(body if in_class else f"[{body}]")
                i += 5
                continue
            if pattern[i + 1 : i + 2] in ("p", "P", "X", "N"):  # another Unicode property: no twin
                return None
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
            out.append(ch)
            i += 1
            if pattern[i : i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i : i + 1] == "]":  # a leading ']' is literal
                out.append("]")
                i += 1
            continue
        if ch == "[" and in_class:  # a nested set (regex V1) or POSIX class: leave it to `regex`
            return None
        if ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    try:
        return re.compile("".join(out), re.ASCII)
    except re.error:
        return None


class RegexSplit:
    """Split text on a regex, each match its own piece and the text between matches too (tokenizers'
    `Split(..., behavior="isolated")`, and the split inside `ByteLevel(use_regex=True)`). Empty pieces are dropped.
    """

    def __init__(self, pattern: str, *, literal: bool = False):
        self.pattern = regex.escape(pattern) if literal else pattern
        self._re = regex.compile(self.pattern)
        twin = None if literal else _ascii_pattern(self.pattern)
        self._ascii = twin if twin is not None and twin.groups == 0 else None
        self._findall_ok = self._re.groups == 0  # with groups, findall returns the groups, not the matches

    def __call__(self, text: str) -> list[str]:
        if not text:
            return []
        if self._ascii is not None and text.isascii():
            pieces = self._ascii.findall(text)
        elif self._findall_ok and _ONIG_UNKNOWN.search(text) is None:
            pieces = self._re.findall(text)
        else:
            return self._split_spans(text)
        # findall is enough when the matches tile the text (GPT-2 and LLaMA-3 patterns match every character)
        if sum(map(len, pieces)) == len(text) and "" not in pieces:
            return pieces
        return self._split_spans(text)

    def _split_spans(self, text: str) -> list[str]:
        scan = _ONIG_UNKNOWN.sub(_UNASSIGNED, text)  # same length, so spans index `text` too
        out, last = [], 0
        for m in self._re.finditer(scan):
            start, end = m.span()
            if start > last:
                out.append(text[last:start])
            if end > start:
                out.append(text[start:end])
            last = max(last, end)
        if last < len(text):
            out.append(text[last:])
        return out


GPT2_SPLIT = RegexSplit(GPT2_PATTERN)

# --------------------------------------------------------------------------------------------------------------
# Normalizers
# --------------------------------------------------------------------------------------------------------------

_NORMALIZE_UNKNOWN = {
    "NFC": regex.compile(f"[{_char_class(CANONICAL_UNKNOWN)}]"),
    "NFD": regex.compile(f"[{_char_class(CANONICAL_UNKNOWN)}]"),
    "NFKC": regex.compile(f"[{_char_class(COMPATIBILITY_UNKNOWN)}]"),
    "NFKD": regex.compile(f"[{_char_class(COMPATIBILITY_UNKNOWN)}]"),
}


def unicode_normalizer(form: str) -> Callable[[str], str]:
    """`unicodedata.normalize(form, .)` with the characters tokenizers' tables lack passed through untouched.

    Such a character is a plain starter for tokenizers (combining class 0, no decomposition, composes with
    nothing), so nothing reorders or composes across it: normalizing the text between them gives the same result.
    """
    unknown = _NORMALIZE_UNKNOWN[form]

    def normalize(text: str) -> str:
        if text.isascii():  # ASCII is invariant under all four forms
            return text
        if unknown.search(text) is None:
            return unicodedata.normalize(form, text)
        out, last = [], 0
        for m in unknown.finditer(text):
            out.append(unicodedata.normalize(form, text[last : m.start()]))
            out.append(m.group())
            last = m.end()
        out.append(unicodedata.normalize(form, text[last:]))
        return "".join(out)

    return normalize


# Whitespace and word characters as tokenizers' added-token options see them (Rust `regex` \s and \w).
WHITESPACE_AT_END = regex.compile(r"\s*\Z")
WHITESPACE_AT_START = regex.compile(r"\A\s*")
WORD_CHAR = regex.compile(r"[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]")
