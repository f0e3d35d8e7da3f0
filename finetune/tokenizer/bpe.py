"""`ByteLevelBPE`: a byte-level BPE tokenizer (encode, decode, vocabulary) that gives the same ids as `tokenizers`.

Encoding runs tokenizers' pipeline: added tokens are cut out whole, the rest is normalized and pre-tokenized into
words, each word's UTF-8 bytes become GPT-2 byte characters, and BPE merges them (word.rs `merge_all`: the pair
of lowest merge rank first, leftmost on ties, one merge at a time). Results are cached per word.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from finetune.tokenizer.added import AddedToken, AddedVocabulary
from finetune.tokenizer.components import (
    TRAINED_DECODER,
    TRAINED_POST_PROCESSOR,
    TRAINED_PRE_TOKENIZER,
    build_normalizer,
    build_post_processor,
    build_pre_tokenizer,
    check_decoder,
)
from finetune.tokenizer.pretokenize import CHAR_TO_BYTE, byte_level

_CACHE_SIZE = 100_000  # words; cleared when full (a corpus' frequent words come back within a few lines)
_SHIFT = 32  # merge map key: left id << 32 | right id


class ByteLevelBPE:
    """A byte-level BPE tokenizer. Build one with `train_bpe` or `ByteLevelBPE.load`; `save` writes the
    `tokenizers` / `transformers` folder format."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        added_tokens: Iterable[AddedToken] = (),
        normalizer: dict | None = None,
        pre_tokenizer: dict | None = None,
        post_processor: dict | None = None,
        decoder: dict | None = None,
        ignore_merges: bool = False,
        unk_token: str | None = None,
        fuse_unk: bool = False,
        source: str = "tokenizer",
    ):
        """`vocab`/`merges` are the BPE model's; the component specs are tokenizer.json objects. With none of
        pre_tokenizer/post_processor/decoder given, the GPT-2 layout a trained tokenizer is saved with is used."""
        self._vocab = dict(vocab)  # the model's vocabulary
        self._merge_list = [tuple(m) for m in merges]
        self._merges: dict[int, tuple[int, int]] = {}  # (left << 32 | right) -> (rank, merged id)
        for rank, (a, b) in enumerate(self._merge_list):
            ids = [self._vocab.get(a), self._vocab.get(b), self._vocab.get(a + b)]
            if None in ids:
                missing = [a, b, a + b][ids.index(None)]
                raise ValueError(f"{source}: model.merges[{rank}] = {[a, b]!r}: {missing!r} is not in model.vocab")
            self._merges[ids[0] << _SHIFT | ids[1]] = (rank, ids[2])  # a repeated pair keeps its last rank
        if pre_tokenizer is None and post_processor is None and decoder is None:  # a trained tokenizer
            pre_tokenizer, post_processor, decoder = TRAINED_PRE_TOKENIZER, TRAINED_POST_PROCESSOR, TRAINED_DECODER
        self._specs = {
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
        }
        self._normalize = build_normalizer(normalizer, source)
        self._pre = build_pre_tokenizer(self._specs["pre_tokenizer"], source)
        self._post = build_post_processor(self._specs["post_processor"], source)
        check_decoder(self._specs["decoder"], source)
        self._ignore_merges = ignore_merges
        self._unk_token, self._fuse_unk = unk_token, fuse_unk
        self._source = source

        self.added_tokens: list[AddedToken] = sorted(added_tokens, key=lambda t: t.id)
        self._added = AddedVocabulary(self.added_tokens, self._normalize)
        self._token_to_id = {**self._vocab, **{t.content: t.id for t in self.added_tokens}}
        self._id_to_token = {i: s for s, i in self._vocab.items()}
        for t in self.added_tokens:  # tokenizers shows a normalized added token in its normalized form
            norm = t.normalized and self._normalize is not None
            self._id_to_token[t.id] = self._normalize(t.content) if norm else t.content
        # decode(skip_special_tokens=True) skips by that shown form, as tokenizers does
        specials = {t.content for t in self.added_tokens if t.special}
        self._special_ids = {i for i, s in self._id_to_token.items() if s in specials}
        self._id_bytes = {i: _token_bytes(s) for i, s in self._id_to_token.items()}
        self._cache: dict[str, tuple[int, ...]] = {}
        self.train_info: dict[str, Any] | None = None  # set by train_bpe

    # ----------------------------------------------------------------------------------------------------------
    # Vocabulary
    # ----------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (model vocabulary and added tokens)."""
        return len(self._token_to_id)

    @property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self.added_tokens if t.special]

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The merges in rank order."""
        return list(self._merge_list)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, id: int) -> str | None:
        return self._id_to_token.get(id)

    # ----------------------------------------------------------------------------------------------------------
    # Encoding
    # ----------------------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added/special tokens in the text are matched whole. With `add_special_tokens`, the
        post-processor's single-sequence template is applied (e.g. a BOS), like tokenizers' default encode."""
        if self._added.empty:
            ids = self._encode_text(self._normalize(text) if self._normalize else text)
        else:
            ids = []
            for piece, token in self._added.split(text):
                if token is not None:
                    ids.append(token.id)
                else:
                    ids += self._encode_text(piece)
        if add_special_tokens and self._post is not None:
            ids = self._post(ids)
        return ids

    def encode_batch(self, texts: Iterable[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def _encode_text(self, text: str) -> list[int]:
        """Ids of normalized text holding no added token."""
        out: list[int] = []
        cache = self._cache
        for word in self._pre.words(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._tokenize(byte_level(word))
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[word] = ids
            out += ids
        return out

    def _tokenize(self, word: str) -> tuple[int, ...]:
        """BPE of one byte-level word (tokenizers' BPE::tokenize)."""
        if not word:
            return ()
        vocab = self._vocab
        if self._ignore_merges and word in vocab:
            return (vocab[word],)
        ids = [vocab.get(ch) for ch in word]
        if None in ids:
            ids = self._with_unknown(word)
        return tuple(self._merge_all(ids)) if len(ids) > 1 else tuple(ids)

    def _with_unknown(self, word: str) -> list[int]:
        """Characters outside the vocabulary: dropped without an unk token, else unk (fused runs with fuse_unk)."""
        ids: list[int] = []
        unk_pending = False
        for ch in word:
            tid = self._vocab.get(ch)
            if tid is not None:
                if unk_pending:
                    ids.append(self._unk_id())
                    unk_pending = False
                ids.append(tid)
            elif self._unk_token is not None:
                if unk_pending and not self._fuse_unk:
                    ids.append(self._unk_id())
                unk_pending = True
        if unk_pending:
            ids.append(self._unk_id())
        return ids

    def _unk_id(self) -> int:
        if self._unk_token not in self._vocab:
            raise ValueError(f"{self._source}: model.unk_token {self._unk_token!r} is not in model.vocab")
        return self._vocab[self._unk_token]

    def _merge_all(self, ids: list[int]) -> list[int]:
        """word.rs `merge_all`: a heap of (rank, position) over a linked list of symbols."""
        merges = self._merges
        n = len(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = merges.get(ids[i] << _SHIFT | ids[i + 1])
            if m is not None:
                heap.append((m[0], i, m[1]))
        if not heap:
            return ids
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, pos, new_id = pop(heap)
            if not alive[pos]:
                continue
            right = nxt[pos]
            if right == -1:
                continue
            m = merges.get(ids[pos] << _SHIFT | ids[right])
            if m is None or m[1] != new_id:  # an expired entry: the pair changed since it was queued
                continue
            ids[pos] = new_id
            alive[right] = False
            after = nxt[right]
            nxt[pos] = after
            if after != -1:
                prv[after] = pos
            before = prv[pos]
            if before != -1:
                m = merges.get(ids[before] << _SHIFT | new_id)
                if m is not None:
                    push(heap, (m[0], before, m[1]))
            if after != -1:
                m = merges.get(new_id << _SHIFT | ids[after])
                if m is not None:
                    push(heap, (m[0], pos, m[1]))
        return [t for t, keep in zip(ids, alive, strict=True) if keep]

    # ----------------------------------------------------------------------------------------------------------
    # Decoding
    # ----------------------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ByteLevel decoder: bytes joined, invalid UTF-8 replaced by U+FFFD). Ids outside the
        vocabulary are skipped, as tokenizers does (models often pad their embedding past the vocabulary)."""
        table, special = self._id_bytes, self._special_ids
        parts = [table.get(i, b"") for i in ids if not (skip_special_tokens and i in special)]
        return b"".join(parts).decode("utf-8", errors="replace")

    # ----------------------------------------------------------------------------------------------------------
    # Files
    # ----------------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The tokenizer.json object (tokenizers' layout and key order)."""
        from finetune.tokenizer.hf_format import tokenizer_json

        return tokenizer_json(self)

    def save(
        self,
        folder: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder` (atomically).

        Defaults: bos = eos = the first special token, pad = "<pad>" if it is a special token else eos, unk = eos.
        """
        from finetune.tokenizer.hf_format import save_folder

        return save_folder(
            self,
            Path(folder),
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            chat_template=chat_template,
            model_max_length=model_max_length,
        )

    @classmethod
    def load(cls, path: str | Path) -> ByteLevelBPE:
        """Load a folder holding tokenizer.json, or a tokenizer.json file."""
        from finetune.tokenizer.hf_format import load_tokenizer

        return load_tokenizer(path)

    def __repr__(self) -> str:
        return f"ByteLevelBPE(vocab_size={self.vocab_size}, merges={len(self._merge_list)})"


def _token_bytes(token: str) -> bytes:
    """ByteLevel decoding of one token: its byte characters, or its UTF-8 if any character is not one."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")
