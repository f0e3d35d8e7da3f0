"""Training reproduces tokenizers' BpeTrainer: the same vocabulary, the same merges, the same tokenizer.json."""

import json

import pytest

from finetune.tokenizer import ByteLevelBPE, train_bpe
from finetune.tokenizer.pretokenize import BYTE_TO_CHAR

from .conftest import QUICKSTART, hf_train_files, hf_train_texts, multilingual_lines


def test_trained_tokenizer_json_identical_to_tokenizers(ours_trained, hf_trained):
    """Files read line by line (newlines kept), ~2.2 MB of mixed text: every merge and id the same."""
    ours, theirs = ours_trained.to_json(), json.loads(hf_trained.to_str())
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours == theirs
    assert ours_trained.train_info["merges"] == 700 - 258 and not ours_trained.train_info["stopped_early"]


@pytest.mark.parametrize("vocab_size", [258, 300, 2048])
def test_trained_from_strings_identical_to_train_from_iterator(vocab_size):
    texts = QUICKSTART.read_text(encoding="utf-8").splitlines()[:300] + multilingual_lines(4, 500)
    ours = train_bpe(iter(texts), vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"])
    theirs = hf_train_texts(texts, vocab_size)
    assert ours.to_json() == json.loads(theirs.to_str())


def test_early_stop_is_reported_and_matches_tokenizers():
    texts = ["low lower lowest", "new newer newest", "low new"] * 3
    with pytest.warns(UserWarning, match=r"stopped at vocabulary size \d+ of 5000 after \d+ merges"):
        ours = train_bpe(iter(texts), vocab_size=5000, min_frequency=2)
    info = ours.train_info
    assert info["stopped_early"] and info["vocab_size"] == ours.vocab_size < 5000
    assert info["merges"] == len(ours.merges) == ours.vocab_size - 258
    assert ours.to_json() == json.loads(hf_train_texts(texts, 5000).to_str())


def test_vocabulary_layout():
    tok = train_bpe(iter(["hello hello world"]), vocab_size=262, special_tokens=("<s>", "</s>", "<s>"))
    assert tok.special_tokens == ["<s>", "</s>"]  # duplicates dropped
    assert [tok.id_to_token(i) for i in range(2)] == ["<s>", "</s>"]
    assert [tok.id_to_token(i) for i in range(2, 258)] == sorted(BYTE_TO_CHAR)  # bytes by code point
    assert tok.vocab_size == 262 and len(tok.merges) == 4
    assert [tok.id_to_token(i) for i in range(258, 262)] == ["".join(m) for m in tok.merges]


def test_corpus_split_over_files_counts_lines_alike(tmp_path):
    """Two files give the same tokenizer as their concatenation (lines are the unit, not files)."""
    lines = QUICKSTART.read_text(encoding="utf-8").splitlines(keepends=True)[:400]
    (tmp_path / "a.txt").write_text("".join(lines[:150]), encoding="utf-8")
    (tmp_path / "b.txt").write_text("".join(lines[150:]), encoding="utf-8")
    (tmp_path / "all.txt").write_text("".join(lines), encoding="utf-8")
    split = train_bpe([tmp_path / "a.txt", str(tmp_path / "b.txt")], vocab_size=400)
    whole = train_bpe(tmp_path / "all.txt", vocab_size=400)
    assert split.to_json() == whole.to_json() == json.loads(hf_train_files([tmp_path / "all.txt"], 400).to_str())


def test_crlf_and_lone_cr_in_files_like_tokenizers(tmp_path):
    """Only '\\n' ends a line: '\\r' stays inside lines, as tokenizers reads files."""
    text = "".join(f"line {i}\r\nmore\r\r text {i % 7}  \r\n\n" for i in range(300)) + "no newline at end"
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode("utf-8"))
    assert train_bpe([path], vocab_size=300).to_json() == json.loads(hf_train_files([path], 300).to_str())


def test_saved_and_loaded_tokenizer_is_the_same(ours_trained, tmp_path, corpus_lines):
    loaded = ByteLevelBPE.load(ours_trained.save(tmp_path / "tok"))
    assert loaded.to_json() == ours_trained.to_json()
    assert loaded.encode_batch(corpus_lines[:2000]) == ours_trained.encode_batch(corpus_lines[:2000])
