"""Property tests on arbitrary Unicode text: decode(encode(x)) == x, and the ids equal tokenizers' ids."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from finetune.tokenizer import ByteLevelBPE
from finetune.tokenizer.pretokenize import unicode_normalizer

from .conftest import LLAMA3_PATTERN, SPECIALS, hf_split_style

# Any code point but surrogates (not valid in UTF-8, so neither tokenizer can take them).
CHARS = st.characters(exclude_categories=("Cs",))
TEXT = st.text(CHARS, max_size=60)
# Lines of the sorts that trip tokenizers: runs of spaces and newlines, apostrophes, digits, marks, specials.
TRICKY = st.text(
    st.one_of(CHARS, st.sampled_from(list(" \t\r\n'0123456789sStT\u0301\u00a0\u3000ſ"))),
    max_size=60,
)
WITH_SPECIALS = st.lists(st.one_of(TEXT, st.sampled_from(SPECIALS + [" ", "<", "|>"])), max_size=8).map("".join)
# TOKENIZER_EXAMPLES=5000 for a deeper search than the default quick run.
EXAMPLES = int(os.environ.get("TOKENIZER_EXAMPLES", "150"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair(ours_trained):
    return ours_trained, Tokenizer.from_str(json.dumps(ours_trained.to_json()))


@PROPERTY
@given(text=st.one_of(TEXT, TRICKY, WITH_SPECIALS))
def test_roundtrip_and_ids_equal_tokenizers(pair, text):
    ours, theirs = pair
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ids == theirs.encode(text, add_special_tokens=False).ids


@PROPERTY
@given(ids=st.lists(st.integers(0, 760), max_size=12))
def test_decode_of_any_ids_equals_tokenizers(pair, ids):
    """Ids that cut UTF-8 characters decode with the same replacement characters; unknown ids are skipped."""
    ours, theirs = pair
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def llama_pair(small_corpus, tmp_path_factory):
    theirs = hf_split_style([small_corpus], LLAMA3_PATTERN, vocab_size=600)
    path = tmp_path_factory.mktemp("llama") / "tokenizer.json"
    theirs.save(str(path))
    return ByteLevelBPE.load(path), theirs


@PROPERTY
@given(text=st.one_of(TEXT, TRICKY))
def test_llama3_style_ids_equal_tokenizers(llama_pair, text):
    """NFC, Split(LLaMA-3 regex) + ByteLevel, ignore_merges, BOS template. (Exact on Python 3.10/3.11; newer
    Pythons know Unicode 15+ marks that `unicode_tables` does not list.)"""
    ours, theirs = llama_pair
    assert ours.encode(text, add_special_tokens=True) == theirs.encode(text, add_special_tokens=True).ids
    assert ours.decode(ours.encode(text)) == unicode_normalizer("NFC")(text)
