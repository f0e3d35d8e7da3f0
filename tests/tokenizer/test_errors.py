"""Bad input gets a clear error; the `finetune tokenizer train` command."""

import json
import re

import pytest

from finetune.tokenizer import ByteLevelBPE, tokenizer_command, train_bpe
from finetune.tokenizer.hf_format import from_json

from .conftest import QUICKSTART


@pytest.fixture(scope="module")
def tiny_json():
    tok = train_bpe(iter(QUICKSTART.read_text(encoding="utf-8").splitlines()[:50]), vocab_size=300)
    return tok.to_json()


def test_empty_corpus_names_the_files(tmp_path):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n\n  \n\n")
    with pytest.raises(ValueError, match=r"empty corpus: the training files \(.*empty\.txt, .*blank\.txt\)"):
        train_bpe([empty, blank], vocab_size=300)
    with pytest.raises(ValueError, match="empty corpus: the given texts"):
        train_bpe(iter(["", "   "]), vocab_size=300)
    with pytest.raises(ValueError, match="no training files given"):
        train_bpe([], vocab_size=300)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"training file not found: '.*nope\.txt'"):
        train_bpe([QUICKSTART, tmp_path / "nope.txt"], vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"pass an iterator of them"):  # strings in a list are paths
        train_bpe(["some text to train on"], vocab_size=300)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(invalid byte at offset 6\)"):
        train_bpe([path], vocab_size=300)


def test_vocab_size_below_the_minimum():
    with pytest.raises(ValueError, match=r"vocab_size=257 is too small: the minimum is 258 \(256 byte tokens \+ 2"):
        train_bpe(iter(["hello"]), vocab_size=257)
    with pytest.raises(ValueError, match="the minimum is 259"):
        train_bpe(iter(["hello"]), vocab_size=100, special_tokens=["<s>", "</s>", "<pad>"])
    train_bpe(iter(["hello"]), vocab_size=256, special_tokens=[])  # bytes only: fine


UNSUPPORTED = [
    (("model", "byte_fallback"), True, r"model\.byte_fallback = true"),
    (("model", "dropout"), 0.1, r"model\.dropout = 0\.1"),
    (("model", "continuing_subword_prefix"), "##", r"model\.continuing_subword_prefix = '##'"),
    (("model", "type"), "WordPiece", r"model\.type = 'WordPiece'"),
    (("normalizer",), {"type": "Lowercase"}, r"normalizer\.type = 'Lowercase'"),
    (
        ("normalizer",),
        {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Strip"}]},
        r"normalizer\.normalizers\[1\]\.type = 'Strip'",
    ),
    (("pre_tokenizer",), {"type": "Whitespace"}, r"pre_tokenizer\.type = 'Whitespace'"),
    (
        ("pre_tokenizer",),
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        r"pre_tokenizer\.pretokenizers\[0\]\.behavior = 'Removed'",
    ),
    (("post_processor",), {"type": "BertProcessing"}, r"post_processor\.type = 'BertProcessing'"),
    (("decoder",), {"type": "Metaspace"}, r"decoder\.type = 'Metaspace'"),
    (("truncation",), {"max_length": 8}, r"truncation = \{"),
]


@pytest.mark.parametrize("keys, value, message", UNSUPPORTED, ids=[".".join(u[0]) for u in UNSUPPORTED])
def test_unsupported_components_are_refused(tiny_json, tmp_path, keys, value, message):
    data = json.loads(json.dumps(tiny_json))
    target = data
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": unsupported " + message):
        ByteLevelBPE.load(tmp_path)


def test_bad_merges_are_refused(tiny_json):
    data = json.loads(json.dumps(tiny_json))
    data["model"]["merges"].append(["Ġzzz", "q"])
    with pytest.raises(ValueError, match=r"f\.json: model\.merges\[\d+\] = \['Ġzzz', 'q'\]: 'Ġzzz' is not in"):
        from_json(data, "f.json")
    data["model"]["merges"][-1] = "a b c"
    with pytest.raises(ValueError, match="is not two tokens separated by one space"):
        from_json(data, "f.json")


def test_load_needs_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in this folder"):
        ByteLevelBPE.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ByteLevelBPE.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        ByteLevelBPE.load(tmp_path)


def test_save_rejects_unknown_special_and_keeps_other_files(tmp_path):
    tok = train_bpe(iter(["hello world"] * 3), vocab_size=260)
    with pytest.raises(ValueError, match=r"pad_token='<nope>' is not in the vocabulary"):
        tok.save(tmp_path / "t", pad_token="<nope>")
    assert not (tmp_path / "t").exists() and list(tmp_path.iterdir()) == []  # nothing half-written
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "model.safetensors").write_bytes(b"weights")
    tok.save(tmp_path / "t")
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary folder left behind
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["pad_token"] == "<pad>"


def test_cli_trains_a_loadable_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(QUICKSTART.read_text(encoding="utf-8").splitlines()[:200]) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["train", "--files", str(corpus), "--vocab-size", "400", "--out", str(out), "--special-tokens", "<eos>"]
    assert tokenizer_command(argv) == 0
    printed = capsys.readouterr().out
    assert "vocabulary 400 of 400 (1 special + 256 bytes + 143 merges)" in printed and str(out) in printed
    tok = ByteLevelBPE.load(out)
    assert tok.vocab_size == 400 and tok.special_tokens == ["<eos>"]
    assert tok.decode(tok.encode("Once upon a time<eos>")) == "Once upon a time<eos>"


def test_cli_refuses_a_non_empty_out_and_leaves_it_untouched(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("precious")
    argv = ["train", "--files", str(corpus), "--vocab-size", "270", "--out", str(out)]
    assert tokenizer_command(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune tokenizer: error: ") and "is not empty (pass --force" in err
    assert [p.name for p in out.iterdir()] == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == "precious"
    assert tokenizer_command([*argv, "--force"]) == 0
    assert ByteLevelBPE.load(out).vocab_size <= 270


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--files", "missing.txt", "--vocab-size", "300", "--out", "o"], "training file not found"),
        (["train", "--files", "x", "--vocab-size", "many", "--out", "o"], "invalid int value: 'many'"),
        (["train", "--vocab-size", "300", "--out", "o"], "the following arguments are required: --files"),
        ([], "choose an action: train"),
        (["untrain"], "invalid choice: 'untrain'"),
    ],
)
def test_cli_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert tokenizer_command(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune tokenizer: error: ") and message in err
    assert not (tmp_path / "o").exists()
