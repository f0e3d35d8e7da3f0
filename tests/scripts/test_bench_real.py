"""The pieces of scripts/bench_real.py that need no download: the fortune-file parser, the corpus writer that
our text reader must read back document by document, and the bits-per-byte scorer against a hand computation."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_real.py"
spec = importlib.util.spec_from_file_location("bench_real", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

FORTUNES = (
    "A computer lets you make\n  more mistakes faster.\n\n\t-- Anon\n%\nOne line.   \n%\n%\n\nLast, with no % after\n"
)


def test_parse_fortunes_splits_on_percent_lines_and_drops_blank_lines_inside():
    assert bench.parse_fortunes(FORTUNES) == [
        "A computer lets you make\n  more mistakes faster.\n\t-- Anon",
        "One line.",
        "Last, with no % after",
    ]


def test_corpus_reads_back_one_row_per_document(tmp_path):
    from finetune.data.sources import load_file

    topics = tmp_path / "fortunes"
    topics.mkdir()
    (topics / "computers").write_text(FORTUNES)
    (topics / "computers.dat").write_bytes(b"\x00\x01")  # the index files are not data
    info = bench.write_corpus(topics, tmp_path / "out")
    assert info["train_docs"] + info["heldout_docs"] == 3
    rows = load_file(str(tmp_path / "out" / "train.txt"), str(tmp_path / "cache")).dataset["text"]
    assert sorted(rows) == sorted(bench.parse_fortunes(FORTUNES))  # multi-line documents stay whole


def test_protocols():
    docs, eos = [[5, 6], [7]], 0
    assert bench.protocol_sequences(docs, eos, "documents") == [[0, 5, 6, 0], [0, 7, 0]]
    assert bench.protocol_sequences(docs, eos, "stream") == [[0, 5, 6, 0, 7, 0]]
    with pytest.raises(ValueError, match="protocol='lines'; expected documents or stream"):
        bench.protocol_sequences(docs, eos, "lines")


def test_score_bits_against_a_hand_computation():
    """A model that gives token 1 probability 1/2 and the 3 others 1/6 each, whatever the context."""
    logits = torch.log(torch.tensor([1 / 6, 1 / 2, 1 / 6, 1 / 6]))

    def logits_of(ids):  # (1, T) -> (1, T, V)
        return logits.expand(1, ids.size(1), 4)

    token_bytes = [0, 1, 2, 3]  # token 0 is special (no bytes)
    # window 3: [0, 1, 2] [3, 1] -> scored 1, 2 | 1 (the second window's first token, 3, has no context)
    out = bench.score_bits(logits_of, [[0, 1, 2, 3, 1]], token_bytes, window=3)
    bits = 3 * 0 + math.log2(2) + math.log2(6) + math.log2(2)  # tokens 1, 2, 1
    assert out["tokens"] == 3 and out["bytes"] == 1 + 2 + 1
    assert out["bits_per_byte"] == pytest.approx(bits / 4)


def test_byte_lengths_count_utf8_bytes_of_byte_level_tokens(tmp_path):
    from finetune.tokenizer import train_bpe

    corpus = tmp_path / "c.txt"
    corpus.write_text("naïve café " * 50 + "hello world " * 50)
    tok = train_bpe([str(corpus)], vocab_size=275, special_tokens=("<|endoftext|>", "<pad>"))
    tok.save(tmp_path / "tok")
    import transformers

    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    table = bench.byte_lengths(fast)
    text = "naïve café hello"
    ids = fast(text, add_special_tokens=False)["input_ids"]
    assert sum(table[i] for i in ids) == len(text.encode("utf-8"))
    assert table[fast.convert_tokens_to_ids("<|endoftext|>")] == 0
