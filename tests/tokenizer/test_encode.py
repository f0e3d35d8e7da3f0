"""Encoding gives the ids `tokenizers` gives: for our trained files, for files `tokenizers` trained (GPT-2 and
LLaMA-3/Qwen2 layouts), with special and added tokens, and through `transformers.AutoTokenizer`."""

import json

import pytest
from tokenizers import AddedToken as HFAddedToken
from tokenizers import Tokenizer, normalizers

from finetune.tokenizer import ByteLevelBPE
from finetune.tokenizer.hf_format import from_json
from finetune.tokenizer.pretokenize import unicode_normalizer
from finetune.tokenizer.unicode_tables import CANONICAL_UNKNOWN, ONIG_UNKNOWN_LETTERS_NUMBERS

from .conftest import EDGE_LINES, LLAMA3_PATTERN, QWEN2_PATTERN, hf_split_style


def hf_ids(tok: Tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add_special_tokens)]


def test_ours_saved_loads_in_tokenizers_with_identical_ids(ours_trained, tmp_path, corpus_lines):
    folder = ours_trained.save(tmp_path / "tok")
    theirs = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = ours_trained.encode_batch(corpus_lines)
    assert ours == hf_ids(theirs, corpus_lines)
    assert ours == hf_ids(theirs, corpus_lines, add_special_tokens=True)  # the ByteLevel post-processor adds none
    for ids in ours[:500]:
        assert ours_trained.decode(ids) == theirs.decode(ids, skip_special_tokens=False)


def test_ours_saved_loads_in_transformers(ours_trained, tmp_path, corpus_lines):
    transformers = pytest.importorskip("transformers")
    folder = ours_trained.save(tmp_path / "tok", chat_template="{{ messages }}", model_max_length=512)
    fast = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert fast.is_fast
    assert (fast.bos_token, fast.eos_token, fast.pad_token, fast.unk_token) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "<pad>",
        "<|endoftext|>",
    )
    assert (fast.eos_token_id, fast.pad_token_id) == (0, 1) and len(fast) == ours_trained.vocab_size
    assert fast.model_max_length == 512 and fast.chat_template == "{{ messages }}"
    lines = corpus_lines[::5]
    assert fast(lines)["input_ids"] == ours_trained.encode_batch(lines)
    ids = ours_trained.encode(EDGE_LINES[15])
    assert fast.decode(ids, skip_special_tokens=True) == ours_trained.decode(ids, skip_special_tokens=True)


def test_tokenizers_trained_file_encodes_identically(hf_trained, corpus_lines):
    ours = from_json(json.loads(hf_trained.to_str()), "hf")
    assert ours.encode_batch(corpus_lines) == hf_ids(hf_trained, corpus_lines)


@pytest.mark.parametrize(
    "pattern, nfc, bos", [(LLAMA3_PATTERN, True, True), (LLAMA3_PATTERN, False, True), (QWEN2_PATTERN, True, False)]
)
def test_split_style_files_encode_identically(small_corpus, corpus_lines, tmp_path, pattern, nfc, bos):
    """LLaMA-3 / Qwen2 layout: Split(regex, isolated) + ByteLevel(use_regex=False), NFC, ignore_merges, BOS template."""
    theirs = hf_split_style([small_corpus], pattern, nfc=nfc, bos_template=bos)
    path = tmp_path / "tokenizer.json"
    theirs.save(str(path))
    ours = ByteLevelBPE.load(path)
    lines = corpus_lines[::3] + ["<|begin_of_text|>Hi<|end_of_text|>", "IT'S 'S 'Ll 'ſ", "12345678 9", "a\r\n\r\nb"]
    assert ours.encode_batch(lines) == hf_ids(theirs, lines)
    with_bos = ours.encode_batch(lines, add_special_tokens=True)
    assert with_bos == hf_ids(theirs, lines, add_special_tokens=True)
    assert all(ids[0] == 0 for ids in with_bos) == bos


def test_special_tokens_are_never_split(ours_trained, hf_trained):
    theirs = from_json(json.loads(hf_trained.to_str()), "hf")
    eot, pad = ours_trained.token_to_id("<|endoftext|>"), ours_trained.token_to_id("<pad>")
    cases = {
        "<|endoftext|>": [eot],
        "<pad><|endoftext|><pad>": [pad, eot, pad],
        "<|endoftext|> <|endoftext|>": [eot, ours_trained.token_to_id("Ġ"), eot],
    }
    for text, expected in cases.items():
        assert ours_trained.encode(text) == expected
    texts = [t for t in EDGE_LINES if "<" in t] + ["a<|endoftext|>b", "  <pad>  ", "\n<pad>\n", "<|endoftext|>x"]
    for text in texts:
        ids = ours_trained.encode(text)
        assert ids == hf_trained.encode(text, add_special_tokens=False).ids == theirs.encode(text)
        assert ids.count(eot) == text.count("<|endoftext|>") and ids.count(pad) == text.count("<pad>")
        assert ours_trained.decode(ids) == text
        assert ours_trained.decode(ids, skip_special_tokens=True) == text.replace("<|endoftext|>", "").replace(
            "<pad>", ""
        )


def test_added_token_options_like_tokenizers(hf_trained):
    """lstrip / rstrip / single_word / normalized / non-special, with an NFKC normalizer."""
    theirs = Tokenizer.from_str(hf_trained.to_str())
    theirs.normalizer = normalizers.NFKC()
    theirs.add_special_tokens([HFAddedToken("<mask>", lstrip=True, rstrip=True, single_word=True, normalized=False)])
    theirs.add_tokens(
        [
            HFAddedToken("ﬁx", normalized=True),  # normalized: matches "fix" after NFKC
            HFAddedToken("word", single_word=True, normalized=False),
            HFAddedToken("[L]", lstrip=True, normalized=False),
            HFAddedToken("[R]", rstrip=True, normalized=False),
        ]
    )
    ours = from_json(json.loads(theirs.to_str()), "added")
    texts = [
        "a <mask> b",
        "a<mask>b",
        "x  <mask>\t\ty",
        "<mask><mask> <mask>",
        "fix ﬁx ﬁ x prefix",
        "word words sword word_ word. (word)",
        "a  [L] b [R]  c [L][R] [R][L]",
        "\t[L]\u00a0[R]\u3000end",
        "é<mask>é <mask>- ◌̰<mask>",
    ]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text
    for ids in (ours.encode(t) for t in texts):
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_merges_as_strings_load_the_same(hf_trained):
    data = json.loads(hf_trained.to_str())
    as_strings = json.loads(hf_trained.to_str())
    as_strings["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    a, b = from_json(data, "pairs"), from_json(as_strings, "strings")
    assert a.merges == b.merges and a.encode("the quick brown fox") == b.encode("the quick brown fox")


def test_unicode_newer_than_tokenizers_tables(ours_trained, hf_trained):
    """Letters `regex` knows (Unicode 17) but Oniguruma does not, and characters tokenizers' NFC tables lack."""
    theirs = Tokenizer.from_str(hf_trained.to_str())
    ours = from_json(json.loads(theirs.to_str()), "hf")
    new_letters = [chr(a) for a, _ in ONIG_UNKNOWN_LETTERS_NUMBERS] + [chr(b) for _, b in ONIG_UNKNOWN_LETTERS_NUMBERS]
    texts = [f"ab{c}cd {c}{c} 12{c}3 !{c}" for c in new_letters]
    assert ours.encode_batch(texts) == hf_ids(theirs, texts)
    nfc = normalizers.NFC()
    unknown = [chr(a) for a, _ in CANONICAL_UNKNOWN]
    texts = [f"e{c}\u0301 a\u0301{c}\u0316 {c}\u0327c" for c in unknown] + ["\U00011935\U00011930", "e\u0301\u0327"]
    assert [unicode_normalizer("NFC")(t) for t in texts] == [nfc.normalize_str(t) for t in texts]
