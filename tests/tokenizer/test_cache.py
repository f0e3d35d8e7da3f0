"""A tokenizer a recipe trains (``model.tokenizer: {train_files, vocab_size}``): cached by content, reused."""

import pytest
from transformers import AutoTokenizer

from finetune.tokenizer import ByteLevelBPE, train_bpe
from finetune.tokenizer.cache import trained_tokenizer


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 50)
    return path


def test_trains_once_then_reuses(corpus, monkeypatch):
    spec = {"train_files": str(corpus), "vocab_size": 300, "special_tokens": ["<|endoftext|>", "<pad>"]}
    folder = trained_tokenizer(spec)
    expected = train_bpe([corpus], vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], min_frequency=2)
    tok = ByteLevelBPE.load(folder)
    assert tok.get_vocab() == expected.get_vocab() and tok.merges == expected.merges
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|endoftext|>"

    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("finetune.tokenizer.train_bpe", fail)
    assert trained_tokenizer(dict(spec)) == folder  # the same corpus and settings: the cached folder


def test_a_changed_corpus_or_setting_trains_a_new_one(corpus):
    spec = {"train_files": [str(corpus)], "vocab_size": 300}
    first = trained_tokenizer(spec)
    assert trained_tokenizer({**spec, "vocab_size": 290}) != first
    corpus.write_text(corpus.read_text() + "a new line about a fox\n")
    assert trained_tokenizer(spec) != first


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ({"vocab_size": 300}, ValueError, "train_files and vocab_size required"),
        ({"train_files": "x.txt", "vocab_size": 300, "vocab": 1}, ValueError, r"got \['train_files', 'vocab', "),
        ({"train_files": "missing.txt", "vocab_size": 300}, FileNotFoundError, "missing.txt: no such file"),
    ],
)
def test_bad_spec(corpus, spec, error, match):
    with pytest.raises(error, match=match):
        trained_tokenizer(spec)
