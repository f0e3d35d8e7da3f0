"""Plain text read by line, paragraph or document (`sample_by`), and packing whole documents."""

from pathlib import Path

import datasets
import pytest

from finetune.bundled import resolve_path
from finetune.data.sources import load_file, where

# two multi-line documents: blank lines (one, several, or holding spaces) separate them
CORPUS = "The cat sat.\nIt was warm.\n\n\nA dog ran.\n  \nThen it slept.\nThe end.\n"
DOCS = ["The cat sat.\nIt was warm.", "A dog ran.", "Then it slept.\nThe end."]


def rows(dm, split="train"):
    dm.setup("fit" if split == "train" else "validate")
    return dm._split(split).dataset


def test_auto_reads_blank_line_separated_text_by_paragraph(make_dm, tmp_path, tok):
    (tmp_path / "c.txt").write_text(CORPUS)
    dm = make_dm(train_files=str(tmp_path / "c.txt"))
    t = tok("llama")
    decoded = [t.decode(ids, skip_special_tokens=True) for ids in rows(dm)["input_ids"]]
    assert decoded == DOCS  # line breaks inside a document kept, no blank rows
    assert dm.stats["train"]["rows"] == 3


def test_paragraphs_match_the_datasets_text_builder(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b\nc d\n\ne f\n\ng\nh i")  # separators exactly "\n\n": the builder's own case
    ours = load_file(str(path), str(tmp_path / "cache"), "paragraph").dataset["text"]
    theirs = datasets.load_dataset(
        "text", data_files=str(path), sample_by="paragraph", split="train", cache_dir=str(tmp_path / "hf")
    )["text"]
    assert ours == theirs == ["a b\nc d", "e f", "g\nh i"]


def test_line_and_document_sampling(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS)
    lines = load_file(str(path), str(tmp_path / "cache"), "line")
    assert lines.kind == "text" and lines.dataset["text"] == CORPUS.rstrip("\n").split("\n")
    document = load_file(str(path), str(tmp_path / "cache"), "document")
    assert document.kind == "document" and document.dataset["text"] == [CORPUS.rstrip("\n")]


def test_a_file_of_one_document_per_line_reads_by_line(tmp_path):
    """The bundled quickstart/pretrain corpus holds one story per line and no blank lines: a row per story."""
    train = resolve_path("data/quickstart/train.txt")
    source = load_file(train, str(tmp_path / "cache"))
    assert source.kind == "text"
    assert len(source.dataset) == len(Path(train).read_text().splitlines()) == 5120


def test_a_paragraph_row_is_located_by_its_first_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS)
    source = load_file(str(path), str(tmp_path / "cache"))
    assert [source.where(r) for r in range(3)] == [f"{path} row {r} (line {n})" for r, n in enumerate([1, 5, 7])]
    assert where(str(path), "document", 0) == f"{path} row 0 (line 1)"


def test_packing_packs_whole_documents(make_dm, tmp_path, tok):
    (tmp_path / "c.txt").write_text(CORPUS)
    dm = make_dm(train_files=str(tmp_path / "c.txt"), packing=True, max_length=64, batch_size=1)
    dm.setup("fit")
    (row,) = [dm._dataset("train")[r] for r in range(len(dm._dataset("train")))]
    t = tok("llama")
    segments = [t.decode(row["input_ids"][row["segment_ids"] == s], skip_special_tokens=True) for s in (1, 2, 3)]
    assert segments == DOCS  # one segment per document, across its line breaks
    first = row["segment_ids"] == 1
    assert row["position_ids"][first].tolist() == list(range(int(first.sum())))


def test_unknown_sample_by_is_refused(make_dm, tmp_path):
    with pytest.raises(ValueError, match=r"sample_by='sentence'; expected one of \['auto', 'line', 'paragraph'"):
        make_dm(train_files=str(tmp_path / "c.txt"), sample_by="sentence")


def test_a_changed_file_is_read_again_not_from_the_cache(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS)
    assert load_file(str(path), str(tmp_path / "cache")).dataset["text"] == DOCS
    path.write_text("New text.\nStill new.\n\nAnd more.\n")
    assert load_file(str(path), str(tmp_path / "cache")).dataset["text"] == ["New text.\nStill new.", "And more."]
