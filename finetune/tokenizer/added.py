"""Added (special) tokens: matched whole in the input before anything else, as `tokenizers`' AddedVocabulary does.

Non-normalized tokens are found in the raw text; the rest of the text is then normalized and searched for the
normalized tokens. Matching is leftmost-longest; `single_word`, `lstrip` and `rstrip` follow tokenizers' rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from finetune.tokenizer.pretokenize import WHITESPACE_AT_END, WHITESPACE_AT_START, WORD_CHAR


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = True
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "content": self.content,
            "single_word": self.single_word,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "normalized": self.normalized,
            "special": self.special,
        }


Piece = tuple[str, "AddedToken | None"]


class _Matcher:
    """Finds one group of added tokens (tokenizers' `find_matches` over one aho-corasick automaton)."""

    def __init__(self, tokens: list[AddedToken], patterns: list[str]):
        self._token: dict[str, AddedToken] = {}
        for pattern, token in zip(patterns, tokens, strict=True):
            if pattern:  # empty contents never match
                self._token.setdefault(pattern, token)  # first one wins, like the automaton's lowest pattern id
        # An alternation tried longest first is leftmost-longest for literals.
        alternatives = sorted(self._token, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def split(self, text: str) -> list[Piece]:
        if self._re is None or not text:
            return [(text, None)]
        out: list[Piece] = []
        offset = 0
        for m in self._re.finditer(text):
            start, stop = m.span()
            token = self._token[m.group()]
            if token.single_word:
                alone_left = start == 0 or not WORD_CHAR.match(text, start - 1)
                alone_right = stop == len(text) or not WORD_CHAR.match(text, stop)
                if not (alone_left and alone_right):
                    continue
            if token.lstrip:  # take the spaces before it (not those a previous match already took)
                start = max(WHITESPACE_AT_END.search(text[:start]).start(), offset)
            if token.rstrip:
                stop += WHITESPACE_AT_START.match(text[stop:]).end()
            if offset < start:
                out.append((text[offset:start], None))
            out.append((text[start:stop], token))
            offset = stop
        if offset != len(text):
            out.append((text[offset:], None))
        return out


class AddedVocabulary:
    def __init__(self, tokens: list[AddedToken], normalizer: Callable[[str], str] | None):
        # tokenizers searches special tokens first, then the other added ones
        ordered = [t for t in tokens if t.special] + [t for t in tokens if not t.special]
        raw = [t for t in ordered if not t.normalized]
        norm = [t for t in ordered if t.normalized]
        self._raw = _Matcher(raw, [t.content for t in raw])
        self._norm = _Matcher(norm, [normalizer(t.content) if normalizer else t.content for t in norm])
        self._normalizer = normalizer
        self.empty = not raw and not norm

    def split(self, text: str) -> list[Piece]:
        """`text` cut into added tokens and normalized text between them (empty pieces dropped)."""
        out: list[Piece] = []
        for piece, token in self._raw.split(text):
            if token is not None:
                out.append((piece, token))
                continue
            if self._normalizer is not None:
                piece = self._normalizer(piece)
            out.extend(p for p in self._norm.split(piece) if p[0] or p[1] is not None)
        return out
