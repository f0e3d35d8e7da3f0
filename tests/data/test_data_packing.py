"""Packing: greedy rows of max_length, positions and segments restart per sample, no token lost or repeated."""

import numpy as np
import pytest

from finetune.data.packing import plan
from finetune.data.templates import ALPACA_NO_INPUT


def test_plan_is_greedy_in_order_and_splits_long_samples():
    piece_starts, row_pieces = plan(np.array([3, 5, 2, 9, 1]), max_length=4)
    # pieces: 3 | 4 1 (sample of 5) | 2 | 4 4 1 (sample of 9) | 1
    assert piece_starts.tolist() == [0, 3, 7, 8, 10, 14, 18, 19]
    # rows: [3] [4] [1 2] [4] [4] [1 1]: a piece that doesn't fit starts the next row
    assert row_pieces.tolist() == [0, 1, 2, 4, 5, 6]


def test_plan_fill_cuts_samples_at_full_rows():
    piece_starts, row_pieces = plan(np.array([3, 5, 2, 9, 1]), max_length=4, fill=True)
    # samples start at 0, 3, 8, 10, 19; rows of 4 tokens of the stream 0..19:
    # [3 | 1 of the 5] [4 of the 5] [2 | 2 of the 9] [4 of the 9] [3 of the 9 | 1]
    assert piece_starts.tolist() == [0, 3, 4, 8, 10, 12, 16, 19]
    assert row_pieces.tolist() == [0, 2, 3, 5, 6]


def test_fill_packing_rows_are_full_and_documents_stay_isolated(make_dm, write, tok):
    """packing=fill: every row but the last holds max_length tokens of the stream, in order; a sample cut at a row's
    end goes on in the next row as a segment of its own (positions from 0, its first token unpredicted)."""
    t = tok("gpt")
    texts = ["the cat sat", "hello world, this is a tiny corpus", "a", "one two three four five six seven"]
    path = write("train.txt", texts)
    dm = make_dm("gpt", train_files=path, validation_files=path, packing="fill", max_length=8, eval_batch_size=64)
    batch = next(iter(dm.val_dataloader()))
    samples = [[t.bos_token_id] + t(x)["input_ids"] + [t.eos_token_id] for x in texts]  # gpt: bos = eos
    stream = [i for s in samples for i in s]
    rows = len(stream) // 8 + (len(stream) % 8 > 0)
    assert batch["input_ids"].shape == (rows, 8) and dm.stats["validation"]["packed_rows"] == rows
    mask = batch["attention_mask"].bool()
    assert mask[:-1].all()  # no padding but at the end of the last row
    assert batch["input_ids"][mask].tolist() == stream
    starts = np.cumsum([0] + [len(s) for s in samples])[:-1].tolist()  # where the samples begin in the stream
    flat_seg = [(r, s) for r, row in enumerate(batch["segment_ids"].tolist()) for s in row][: len(stream)]
    for k in range(1, len(stream)):
        new_segment = flat_seg[k] != flat_seg[k - 1]
        assert new_segment == (k in starts or k % 8 == 0)  # at a sample start or a row start
    labels, positions = batch["labels"].flatten().tolist(), batch["position_ids"].flatten().tolist()
    for k in range(len(stream)):
        seg_start = next(j for j in range(k, -1, -1) if j == 0 or flat_seg[j] != flat_seg[j - 1])
        assert positions[k] == k - seg_start
        first_in_row_later_segment = k == seg_start and k % 8 != 0
        assert labels[k] == (-100 if first_in_row_later_segment else stream[k])


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_packed_rows(make_dm, write, tok, style):
    t = tok(style)
    texts = ["the cat", "hello world, this is a tiny corpus", "a", "one two three four five six seven eight nine ten"]
    texts += ["the quick brown fox jumps over the lazy dog"] * 3 + ["a", "the cat", "one two", "hi", "the moon"]
    path = write("train.jsonl", [{"text": x} for x in texts])
    max_length = 16
    dm = make_dm(
        style, train_files=path, validation_files=path, packing=True, max_length=max_length, eval_batch_size=64
    )
    with pytest.warns(UserWarning, match="were split into 16-token pieces for packing"):
        batch = next(iter(dm.val_dataloader()))  # in order
    bos = [] if t("hi")["input_ids"][0] == t.bos_token_id else [t.bos_token_id]  # the gpt tokenizer adds none
    samples = [bos + t(x)["input_ids"] + [t.eos_token_id] for x in texts]
    stream = [i for s in samples for i in s]
    sample_starts = set(np.cumsum([0] + [len(s) for s in samples]).tolist())
    mask = batch["attention_mask"].bool()
    rows = [batch["input_ids"][r][mask[r]].tolist() for r in range(len(mask))]
    assert [i for row in rows for i in row] == stream  # all tokens kept, in order
    assert dm.stats["validation"]["tokens"] == len(stream) == batch["num_tokens"]
    assert dm.stats["validation"]["split_rows"] == sum(len(s) > max_length for s in samples) > 0
    assert dm.stats["validation"]["packed_rows"] == len(rows) and dm.stats["validation"]["truncated_rows"] == 0
    assert batch["segment_ids"].max() >= 3  # some rows hold several samples
    offset = 0
    for r, row in enumerate(rows):
        assert 0 < len(row) <= max_length
        segments = batch["segment_ids"][r].tolist()
        positions = batch["position_ids"][r].tolist()
        labels = batch["labels"][r].tolist()
        assert segments[len(row) :] == [0] * (max_length - len(row)) and labels[len(row) :] == [-100] * (
            max_length - len(row)
        )
        starts = [k for k in range(len(row)) if k == 0 or segments[k] != segments[k - 1]]
        assert [segments[k] for k in starts] == list(range(1, len(starts) + 1))
        for n, k in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(row)
            assert positions[k:end] == list(range(end - k))  # restart at 0 per sample
            # a new segment starts at a sample start or at a max_length cut of a long sample
            assert offset + k in sample_starts or (k == 0 and len(rows[r - 1]) == max_length)
            assert labels[k:end] == ([-100] if n > 0 else row[k : k + 1]) + row[k + 1 : end]
        if r + 1 < len(rows):  # greedy: the next row's first piece would not have fit
            next_segments = batch["segment_ids"][r + 1].tolist()
            assert len(row) + next_segments.count(1) > max_length
        offset += len(row)


def test_packing_keeps_prompt_masking(make_dm, write, tok):
    t = tok()
    rows = [{"instruction": "hi", "output": "ok"}, {"instruction": "hi", "output": "yes"}]
    path = write("train.jsonl", rows)
    dm = make_dm(format="instruction", train_files=path, validation_files=path, packing=True, max_length=512)
    batch = next(iter(dm.val_dataloader()))
    p = t(ALPACA_NO_INPUT.format(instruction="hi"))["input_ids"]
    r1, r2 = (t(x, add_special_tokens=False)["input_ids"] + [t.eos_token_id] for x in ("ok", "yes"))
    assert batch["input_ids"][0].tolist() == p + r1 + p + r2
    assert batch["labels"][0].tolist() == [-100] * len(p) + r1 + [-100] * len(p) + r2
    assert batch["segment_ids"][0].tolist() == [1] * len(p + r1) + [2] * len(p + r2)


def test_packing_is_on_by_default_for_plain_text_only(write, tok, tmp_path):
    """Pretraining text packs by default; instruction data (whose rows are the examples) does not."""
    from finetune.data.module import DataModule

    text = write("t.jsonl", [{"text": "the cat"}])
    pairs = write("i.jsonl", [{"instruction": "say hi", "output": "hi"}])
    common = dict(tokenizer=tok("llama"), cache_dir=str(tmp_path / "cache"))
    assert DataModule(train_files=text, **common).packing is True
    assert DataModule(train_files=text, packing=False, **common).packing is False
    assert DataModule(format="instruction", train_files=pairs, **common).packing is False
    assert DataModule(format="text", objective="masked_lm", train_files=text, **common).packing is False
    with pytest.raises(ValueError, match="packing='full'; expected true, false or fill"):
        DataModule(train_files=text, packing="full", **common).setup("fit")
