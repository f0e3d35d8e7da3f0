"""`train_bpe`: learn a byte-level BPE the way `tokenizers.trainers.BpeTrainer` does, merge for merge.

The vocabulary starts with the special tokens, then the 256 GPT-2 byte characters sorted by code point. Words are
counted once (GPT-2 regex over each line, or each given string), then merges are learned incrementally as in
trainer.rs: pair counts and the words each pair occurs in are kept up to date, and a max-heap of (count, pair)
entries is popped lazily (an entry whose count went stale is pushed back with the current one). Ties go to the
smaller pair of ids. Each heap entry carries the words it was queued for, and only those are merged when it wins,
exactly like trainer.rs; that matters for the rare pairs that are queued twice.
"""

from __future__ import annotations

import heapq
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import count as counter
from pathlib import Path

from finetune.tokenizer.added import AddedToken
from finetune.tokenizer.bpe import ByteLevelBPE
from finetune.tokenizer.pretokenize import BYTE_TO_CHAR, GPT2_SPLIT

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")  # end of text (also BOS/UNK when saved), padding
_SHIFT = 32
_LOW = (1 << _SHIFT) - 1
_READ_BLOCK = 1 << 20


def train_bpe(
    files_or_texts: Iterable[str | os.PathLike] | str | os.PathLike,
    vocab_size: int = 4096,
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
) -> ByteLevelBPE:
    """Train a byte-level BPE.

    files_or_texts: a list/tuple of file paths (str or Path; UTF-8, read line by line, each line with its newline
        being one sequence, as `Tokenizer.train(files)` reads them), a single path, or any other iterable
        (generator, iterator, ...) of strings, each string one sequence (as `train_from_iterator`). To train on
        strings you hold in a list, pass `iter(the_list)`.
    vocab_size: the target size, counting the 256 byte tokens, the special tokens and the merges. Training stops
        earlier when no pair occurs at least `min_frequency` times; `tok.train_info` tells how far it got and a
        warning says so.
    """
    start = time.perf_counter()
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a list of strings, got the string {special_tokens!r}")
    special_tokens = list(special_tokens)
    if not all(isinstance(s, str) and s for s in special_tokens):
        raise ValueError(f"special_tokens must be non-empty strings, got {special_tokens!r}")
    id_to_token: list[str] = []
    token_to_id: dict[str, int] = {}
    for token in [*special_tokens, *sorted(BYTE_TO_CHAR)]:  # specials, then the alphabet by code point
        if token not in token_to_id:
            token_to_id[token] = len(id_to_token)
            id_to_token.append(token)
    if vocab_size < len(id_to_token):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the minimum is {len(id_to_token)} "
            f"(256 byte tokens + {len(id_to_token) - 256} special tokens)"
        )

    sequences, described = _sequences(files_or_texts)
    word_counts = count_words(sequences)
    if not word_counts or all(w.isspace() for w in word_counts):
        raise ValueError(f"empty corpus: {described} hold no text to train on")

    byte_id = [token_to_id[c] for c in BYTE_TO_CHAR]
    words = [[byte_id[b] for b in w.encode("utf-8")] for w in word_counts]
    counts = list(word_counts.values())
    merges = _learn_merges(words, counts, id_to_token, token_to_id, vocab_size, min_frequency)

    last_rank = {pair: rank for rank, pair in enumerate(merges)}  # a pair merged twice keeps its last rank
    ordered = sorted(last_rank, key=last_rank.__getitem__)
    tok = ByteLevelBPE(
        token_to_id,
        [(id_to_token[p >> _SHIFT], id_to_token[p & _LOW]) for p in ordered],
        added_tokens=[AddedToken(s, token_to_id[s], special=True) for s in dict.fromkeys(special_tokens)],
    )
    tok.train_info = {
        "vocab_size": len(id_to_token),
        "requested_vocab_size": vocab_size,
        "merges": len(ordered),
        "words": len(word_counts),
        "seconds": time.perf_counter() - start,
        "stopped_early": len(id_to_token) < vocab_size,
    }
    if tok.train_info["stopped_early"]:
        warnings.warn(
            f"train_bpe: stopped at vocabulary size {len(id_to_token)} of {vocab_size} after {len(ordered)} merges: "
            f"no pair of tokens occurs {min_frequency} or more times in the corpus",
            stacklevel=2,
        )
    return tok


def count_words(sequences: Iterable[str]) -> Counter[str]:
    """How often each GPT-2 pre-token occurs (before the byte mapping) over all sequences."""
    counts: Counter[str] = Counter()
    update = counts.update
    for seq in sequences:
        update(GPT2_SPLIT(seq))
    return counts


def _sequences(files_or_texts) -> tuple[Iterator[str], str]:
    """The sequences to count, and how to name the corpus in an error."""
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    if isinstance(files_or_texts, (list, tuple)):
        paths = [Path(p) for p in files_or_texts]
        if not paths:
            raise ValueError("no training files given")
        for p in paths:
            if not p.is_file():
                hint = " (to train on strings, pass an iterator of them, e.g. iter(texts))"
                raise FileNotFoundError(f"training file not found: {str(p)!r}" + ("" if p.suffix else hint))
        names = ", ".join(map(str, paths[:5])) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        return (line for p in paths for line in _file_lines(p)), f"the training files ({names})"
    return (t for t in files_or_texts if _is_text(t)), "the given texts"


def _is_text(item) -> bool:
    if not isinstance(item, str):
        raise TypeError(f"train_bpe: texts must be strings, got {type(item).__name__}")
    return True


def _file_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file, each with its '\\n' (split on '\\n' only, like tokenizers' file reader)."""
    with open(path, "rb") as fh:
        rest, offset = b"", 0
        while block := fh.read(_READ_BLOCK):
            block = rest + block
            cut = block.rfind(b"\n") + 1  # cut after a newline: never inside a UTF-8 character
            if cut == 0:
                rest = block
                continue
            lines = _decode(block[:cut], path, offset).split("\n")
            offset += cut
            rest = block[cut:]
            lines.pop()  # the empty string after the last newline
            for line in lines:
                yield line + "\n"
        if rest:
            yield _decode(rest, path, offset)


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {offset + e.start})") from None


def _learn_merges(
    words: list[list[int]],
    counts: list[int],
    id_to_token: list[str],
    token_to_id: dict[str, int],
    vocab_size: int,
    min_frequency: int,
) -> list[int]:
    """trainer.rs' merge loop. Returns the merged pairs (left << 32 | right) in order; may repeat a pair.
    Grows `id_to_token`/`token_to_id` with the new tokens."""
    pair_counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for i, w in enumerate(words):
        c = counts[i]
        for a, b in zip(w, w[1:], strict=False):
            k = a << _SHIFT | b
            pair_counts[k] = pair_counts.get(k, 0) + c
            s = where.get(k)
            if s is None:
                where[k] = {i}
            else:
                s.add(i)
    seq = counter()
    # min-heap of (-count, pair, tiebreak, words): the max count first, then the smaller pair
    heap = [(-pair_counts[k], k, next(seq), pos) for k, pos in where.items() if pair_counts[k] > 0]
    heapq.heapify(heap)
    del where
    pop, push = heapq.heappop, heapq.heappush
    merges: list[int] = []
    while len(id_to_token) < vocab_size and heap:
        neg, k, _, pos = pop(heap)
        current = pair_counts[k]
        if current < 0:  # trainer.rs compares as u64
            current += 1 << 64
        if -neg != current:  # stale: requeue with the current count
            push(heap, (-current, k, next(seq), pos))
            continue
        if current < 1 or min_frequency > current:
            break
        a, b = k >> _SHIFT, k & _LOW
        token = id_to_token[a] + id_to_token[b]
        new = token_to_id.get(token)
        if new is None:
            new = token_to_id[token] = len(id_to_token)
            id_to_token.append(token)
        merges.append(k)
        touched: dict[int, set[int]] = {}  # pairs that gained occurrences -> the words they gained them in
        new_hi = new << _SHIFT
        for i in pos:
            w = words[i]
            c = counts[i]
            j = 0
            while j < len(w) - 1:  # word.rs `merge`: left to right, non-overlapping
                if w[j] == a and w[j + 1] == b:
                    if j > 0:
                        left = w[j - 1] << _SHIFT
                        pair_counts[left | a] = pair_counts.get(left | a, 0) - c
                        kk = left | new
                        pair_counts[kk] = pair_counts.get(kk, 0) + c
                        touched.setdefault(kk, set()).add(i)
                    w[j] = new
                    del w[j + 1]
                    if j < len(w) - 1:
                        right = w[j + 1]
                        kk = b << _SHIFT | right
                        pair_counts[kk] = pair_counts.get(kk, 0) - c
                        kk = new_hi | right
                        pair_counts[kk] = pair_counts.get(kk, 0) + c
                        touched.setdefault(kk, set()).add(i)
                j += 1
        for kk, words_in in touched.items():
            n = pair_counts[kk]
            if n > 0:
                push(heap, (-n, kk, next(seq), words_in))
    return merges
