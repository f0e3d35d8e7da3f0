"""The ``preference`` format: prompt/completion split, one EOS, truncation keeping the start, dropped rows counted,
message lists with an implicit prompt, precomputed reference columns, and every bad row named."""

import pytest

PREF = dict(format="preference", objective="preference")
ROWS = [
    {"prompt": "the quick brown", "chosen": " fox jumps", "rejected": " cat sat on the mat"},
    {"prompt": "a cat sat on", "chosen": " the mat", "rejected": " the moon"},
]


def _rows(dm, split="train"):
    dm.setup("fit")
    return [dm._dataset(split)[i] for i in range(len(dm._dataset(split)))]


def test_strings_split_at_the_prompt_with_one_eos(make_dm, write, tok):
    t = tok("llama")
    row = _rows(make_dm(train_files=write("p.jsonl", ROWS), **PREF))[0]
    prompt = t("the quick brown")["input_ids"]  # with <s>
    for side in ("chosen", "rejected"):
        full = t("the quick brown" + ROWS[0][side])["input_ids"] + [t.eos_token_id]
        assert row[f"{side}_input_ids"] == full
        assert row[f"{side}_labels"] == [-100] * len(prompt) + full[len(prompt) :]
        assert row[f"{side}_input_ids"].count(t.eos_token_id) == 1


def test_trailing_eos_in_the_completion_is_not_doubled(make_dm, write, tok):
    rows = [{"prompt": "the quick", "chosen": " fox</s>", "rejected": " dog"}]
    row = _rows(make_dm(train_files=write("p.jsonl", rows), **PREF))[0]
    assert row["chosen_input_ids"].count(tok("llama").eos_token_id) == 1


def test_collated_as_chosen_then_rejected(make_dm, write):
    dm = make_dm(train_files=write("p.jsonl", ROWS), batch_size=2, **PREF)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    items = {tuple(dm._dataset("train")[i]["chosen_input_ids"]) for i in range(2)}
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2].bool()
    firsts = {tuple(r[m].tolist()) for r, m in zip(ids, mask, strict=True)}
    assert firsts == items


def test_truncation_keeps_the_start_and_drops_rows_whose_prompt_fills_it(make_dm, write, tok):
    t = tok("llama")
    long_prompt = " ".join(["the quick brown fox"] * 10)
    rows = [ROWS[0], {"prompt": long_prompt, "chosen": " a", "rejected": " b"}]
    n_prompt = len(t("the quick brown")["input_ids"])
    dm = make_dm(train_files=write("p.jsonl", rows), max_length=n_prompt + 2, **PREF)
    with pytest.warns(UserWarning, match=r"1 of 2 rows \(50.0%\) were dropped: the prompt alone fills max_length"):
        kept = _rows(dm)
    assert len(kept) == 1 and dm.stats["train"]["truncated_rows"] == 1 and dm.stats["train"]["no_loss_rows"] == 1
    assert kept[0]["rejected_input_ids"] == t("the quick brown" + ROWS[0]["rejected"])["input_ids"][: n_prompt + 2]


def test_messages_with_an_implicit_prompt(make_dm, write, tok):
    user = {"role": "user", "content": "the quick brown"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "fox"}],
             "rejected": [user, {"role": "assistant", "content": "cat"}]}]  # fmt: skip
    dm = make_dm(train_files=write("p.jsonl", rows), **PREF)
    row = _rows(dm)[0]
    t = tok("llama")
    template = dm.rendering_template()
    prompt = t(t.apply_chat_template([user], chat_template=template, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]  # fmt: skip
    assert row["chosen_labels"][: len(prompt)] == [-100] * len(prompt)
    answer = [i for i in row["chosen_labels"] if i != -100]
    assert t.decode(answer).startswith("fox") and answer[-1] == t.eos_token_id


def test_precomputed_reference_columns(make_dm, write):
    rows = [{**r, "ref_chosen_logps": -3.5, "ref_rejected_logps": -7.25} for r in ROWS]
    dm = make_dm(train_files=write("p.jsonl", rows), batch_size=2, **PREF)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_chosen_logps"].tolist() == [-3.5, -3.5] and batch["ref_rejected_logps"].tolist() == [-7.25] * 2


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"chosen": ""}, r"p.jsonl row 1 \(line 2\): the chosen completion is empty"),
        ({"rejected": ["x"]}, r"p.jsonl row 1 \(line 2\): columns 'chosen' and 'rejected' must both hold strings"),
        ({"prompt": None}, r"p.jsonl row 1 \(line 2\): column 'prompt' \(prompt field\) must hold a string"),
        ({"ref_chosen_logps": "x"}, r"row 1 \(line 2\): column 'ref_chosen_logps' .* must hold a finite number"),
        ({"prompt": "the quick bro", "chosen": "wn fox"}, r"row 1 \(line 2\): the prompt's tokens are not a prefix"),
    ],
)
def test_bad_rows_are_named(make_dm, write, bad, match):
    rows = [{**r, "ref_chosen_logps": -1.0} for r in ROWS]
    rows[1] = {**rows[1], **bad}
    with pytest.raises(ValueError, match=match):
        make_dm(train_files=write("p.jsonl", rows), **PREF).setup("fit")


def test_empty_message_completion_is_named(make_dm, write):
    user = {"role": "user", "content": "hi"}
    rows = [{"chosen": [user], "rejected": [user, {"role": "assistant", "content": "cat"}]}]
    with pytest.raises(ValueError, match=r"p.jsonl row 0 \(line 1\): the chosen messages add nothing after the prompt"):
        make_dm(train_files=write("p.jsonl", rows), **PREF).setup("fit")
