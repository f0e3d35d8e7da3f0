"""Each format and objective: rows -> batches, checked against the tokenizer's own encoding of the expected text."""

import pytest
import torch
from transformers import AutoTokenizer

from finetune.data.collate import prompt_ids
from finetune.data.templates import ALPACA, ALPACA_NO_INPUT


def tokens(batch, i, key="input_ids", mask=None):
    """Row ``i`` of ``batch[key]`` without padding (where ``mask`` (B, T) is 1; default: the attention mask)."""
    mask = batch["attention_mask"] if mask is None else mask
    return batch[key][i][mask[i].bool()].tolist()


def enc(t, text, special=True):
    return t(text, add_special_tokens=special)["input_ids"]


def one_batch(loader):
    (batch,) = list(loader)
    return batch


# ------------------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_text_rows_get_bos_eos_and_right_padding(make_dm, write, tok, style):
    """A document is [bos] text [eos]: the llama tokenizer adds its bos itself, the gpt one (bos = eos =
    <|endoftext|>, as GPT-2's) does not, so the document gets it; without it the first token is never a target."""
    t = tok(style)
    texts = ["the quick brown fox", "hello world", f"a cat{t.eos_token}"]  # the last one already ends with EOS
    path = write("train.jsonl", [{"text": x} for x in texts])
    dm = make_dm(style, train_files=path, validation_files=path, batch_size=3)
    batch = one_batch(dm.val_dataloader())
    bos = [] if enc(t, "hi")[0] == t.bos_token_id else [t.bos_token_id]
    assert bool(bos) == (style == "gpt")
    expected = [bos + enc(t, x) + [t.eos_token_id] for x in texts[:2]] + [bos + enc(t, texts[2])]
    assert expected[2][-1] == t.eos_token_id and expected[2][-2] != t.eos_token_id
    assert all(ids[0] == t.bos_token_id for ids in expected)
    T = max(map(len, expected))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for i, ids in enumerate(expected):
        assert batch["input_ids"][i].tolist() == ids + [t.pad_token_id] * (T - len(ids))  # right padding
        assert batch["labels"][i].tolist() == ids + [-100] * (T - len(ids))  # not shifted
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (T - len(ids))
    assert batch["num_tokens"] == sum(map(len, expected)) and isinstance(batch["num_tokens"], int)
    assert batch["padded"] is True  # rows of different lengths
    assert dm.stats["validation"]["tokens"] == sum(map(len, expected))
    assert dm.pad_token_id == t.pad_token_id


def test_text_predict_is_left_padded_without_eos(make_dm, write, tok):
    t = tok("llama")
    texts = ["the quick brown fox", "hello"]
    dm = make_dm(predict_files=write("p.jsonl", [{"text": x} for x in texts]), eval_batch_size=2)
    dm.setup("predict")
    batch = one_batch(dm.predict_dataloader())
    expected = [enc(t, x) for x in texts]
    T = len(expected[0])
    assert batch["input_ids"][1].tolist() == [t.pad_token_id] * (T - len(expected[1])) + expected[1]
    assert batch["attention_mask"][1].tolist() == [0] * (T - len(expected[1])) + [1] * len(expected[1])
    assert batch["input_ids"][0].tolist() == expected[0]
    assert batch["row"].tolist() == [0, 1] and "labels" not in batch


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_text_predict_ids_are_trainings_without_the_eos(make_dm, write, tok, style):
    """A prompt to predict from starts as the documents trained on ([bos] text, the gpt tokenizer adding no bos),
    by the rule that generation from a text run uses too (``prompt_ids(document=True)``)."""
    t = tok(style)
    texts = ["the quick brown fox", "hello world"]
    path = write("d.jsonl", [{"text": x} for x in texts])
    dm = make_dm(style, train_files=path, validation_files=path, predict_files=path, batch_size=2, eval_batch_size=2)
    trained = one_batch(dm.val_dataloader())
    predicted = one_batch(dm.predict_dataloader())
    for i, text in enumerate(texts):
        ids = tokens(trained, i)
        assert (
            ids[0] == t.bos_token_id
            and ids[-1] == t.eos_token_id
            and len(ids) == len(enc(t, text)) + 1 + (style == "gpt")
        )
        assert tokens(predicted, i) == ids[:-1] == prompt_ids(t, text, document=True)


def test_pad_to_multiple_of(make_dm, write):
    path = write("train.jsonl", [{"text": "hello"}])
    batch = one_batch(make_dm(train_files=path, validation_files=path, pad_to_multiple_of=8).val_dataloader())
    assert batch["input_ids"].shape[1] == 8 and batch["num_tokens"] == batch["attention_mask"].sum().item()
    assert batch["padded"] is True  # padded up to the multiple, though one row
    unpadded = one_batch(make_dm(train_files=path, validation_files=path).val_dataloader())
    assert unpadded["padded"] is False and unpadded["attention_mask"].all()


# ----------------------------------------------------------------------------------------------- instruction
INSTRUCTIONS = [
    {"instruction": "say hi", "input": "", "output": "hello"},  # empty input: the no-input prompt
    {"instruction": "count", "input": "one two", "output": "three"},
]


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_instruction_masks_the_prompt(make_dm, write, tok, style):
    t = tok(style)
    path = write("train.jsonl", INSTRUCTIONS)
    batch = one_batch(make_dm(style, format="instruction", train_files=path, validation_files=path).val_dataloader())
    prompts = [ALPACA_NO_INPUT.format(instruction="say hi"), ALPACA.format(instruction="count", input="one two")]
    assert prompts[0].startswith("Below is an instruction that describes a task. Write a response")
    assert prompts[1].endswith("### Input:\none two\n\n### Response:\n")
    for i, (prompt, row) in enumerate(zip(prompts, INSTRUCTIONS, strict=True)):
        p = enc(t, prompt)  # with BOS where the tokenizer adds one
        r = enc(t, row["output"], special=False) + [t.eos_token_id]
        assert tokens(batch, i) == p + r
        assert tokens(batch, i, "labels") == [-100] * len(p) + r


def test_instruction_without_input_column_custom_template_and_train_on_prompt(make_dm, write, tok):
    t = tok("llama")
    path = write("train.jsonl", [{"instruction": "count", "output": "three"}])
    dm = make_dm(
        format="instruction",
        train_files=path,
        validation_files=path,
        prompt_template="Q: {instruction}\nC: {input}\nA: ",
        prompt_template_no_input="Q: {instruction}\nA: ",
        train_on_prompt=True,
    )
    batch = one_batch(dm.val_dataloader())
    ids = enc(t, "Q: count\nA: ") + enc(t, "three", special=False) + [t.eos_token_id]
    assert tokens(batch, 0) == tokens(batch, 0, "labels") == ids


def test_instruction_predict_is_the_prompt(make_dm, write, tok):
    t = tok("llama")
    dm = make_dm(format="instruction", predict_files=write("p.jsonl", [{"instruction": "count", "input": "one"}]))
    batch = one_batch(dm.predict_dataloader())
    assert batch["input_ids"][0].tolist() == enc(t, ALPACA.format(instruction="count", input="one"))


def test_instruction_for_seq2seq(make_dm, write, tok):
    t = tok("t5")
    path = write("train.jsonl", INSTRUCTIONS[1:])
    dm = make_dm("t5", format="instruction", objective="seq2seq", train_files=path, validation_files=path)
    batch = one_batch(dm.val_dataloader())
    assert batch["input_ids"][0].tolist() == enc(t, ALPACA.format(instruction="count", input="one two"))
    assert batch["labels"][0].tolist() == enc(t, "three")  # with T5's </s>
    assert batch["labels"][0, -1].item() == t.eos_token_id


# ------------------------------------------------------------------------------------------------------ chat
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "one two"},
    {"role": "assistant", "content": "three"},
]
CHATML_PIECES = [  # (text, is it the assistant's)
    ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
    ("hello world<|im_end|>\n", True),
    ("<|im_start|>user\none two<|im_end|>\n<|im_start|>assistant\n", False),
    ("three<|im_end|>\n", True),
]
CHATML_TEMPLATE = (  # the built-in one, written out as a user would pass it
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ZEPHYR_PIECES = [
    ("<|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\n", False),
    ("hello world</s>\n", True),
    ("<|user|>\none two</s>\n<|assistant|>\n", False),
    ("three</s>\n", True),
]


def check_chat(batch, t, pieces):
    """Ids are the rendered conversation; labels are exactly the assistant pieces' tokens, token by token."""
    text = "".join(p for p, _ in pieces)
    ids, labels = [], []
    for piece, assistant in pieces:
        piece_ids = enc(t, piece, special=False)
        ids += piece_ids
        labels += piece_ids if assistant else [-100] * len(piece_ids)
    assert tokens(batch, 0) == ids == enc(t, text, special=False)
    assert tokens(batch, 0, "labels") == labels


def test_chat_builtin_chatml_labels_assistant_turns(make_dm, write, tok):
    path = write("train.jsonl", [{"messages": CHAT}])
    check_chat(
        one_batch(make_dm(format="chat", train_files=path, validation_files=path).val_dataloader()),
        tok(),
        CHATML_PIECES,
    )


def test_chat_tokenizer_template_and_override(make_dm, write, tokenizer_folder):
    t = AutoTokenizer.from_pretrained(tokenizer_folder("llama"))
    t.chat_template = ZEPHYR
    path = write("train.jsonl", [{"messages": CHAT}])
    check_chat(
        one_batch(make_dm(format="chat", train_files=path, validation_files=path, tokenizer=t).val_dataloader()),
        t,
        ZEPHYR_PIECES,
    )
    chatml = "".join(p for p, _ in CHATML_PIECES)
    dm = make_dm(format="chat", validation_files=path, tokenizer=t, chat_template=CHATML_TEMPLATE)
    dm.setup("validate")
    check_chat(one_batch(dm.val_dataloader()), t, CHATML_PIECES)
    assert t.decode(tokens(one_batch(dm.val_dataloader()), 0)) == chatml


def test_chat_train_on_prompt_and_predict(make_dm, write, tok):
    t = tok()
    path = write("train.jsonl", [{"messages": CHAT}])
    dm = make_dm(format="chat", train_files=path, validation_files=path, predict_files=path, train_on_prompt=True)
    batch = one_batch(dm.val_dataloader())
    assert tokens(batch, 0, "labels") == tokens(batch, 0)
    prompt = "".join(p for p, _ in CHATML_PIECES[:3])  # the trailing assistant message dropped, generation prompt on
    assert one_batch(dm.predict_dataloader())["input_ids"][0].tolist() == enc(t, prompt, special=False)


def test_chat_without_assistant_turn_has_no_loss_and_is_reported(make_dm, write):
    path = write("train.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    dm = make_dm(format="chat", train_files=path)
    with pytest.warns(
        UserWarning, match=r"1 of 2 rows \(50.0%\) have no tokens to compute the loss on .*train.jsonl: 1"
    ):
        dm.setup("fit")
    assert dm.stats["train"]["no_loss_rows"] == 1


# ------------------------------------------------------------------------------------------- classification
def test_classification_pairs_token_types_and_sorted_labels(make_dm, write, tok):
    t = tok("bert")
    rows = [
        {"text": "the cat", "text_pair": "sat on the mat", "label": "positive"},
        {"text": "a dog", "text_pair": "one two", "label": "negative"},
        {"text": "hello", "text_pair": "world", "label": "neutral"},
        {"text": "hello", "text_pair": None, "label": "neutral"},  # no pair in this row
    ]
    path = write("train.jsonl", rows)
    dm = make_dm("bert", format="classification", objective="classification", train_files=path, validation_files=path)
    batch = one_batch(dm.val_dataloader())
    assert dm.label_names == ["negative", "neutral", "positive"]
    assert batch["labels"].tolist() == [2, 0, 1, 1] and batch["labels"].dtype == torch.long
    for i, row in enumerate(rows):
        e = t(row["text"], row["text_pair"])
        assert tokens(batch, i) == e["input_ids"]
        assert tokens(batch, i, "token_type_ids") == e["token_type_ids"]
    assert batch["input_ids"][3, -1].item() == t.pad_token_id and batch["token_type_ids"][3].sum() == 0


def test_classification_integer_labels_sort_by_value_and_explicit_labels(make_dm, write, tok):
    path = write("train.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 3}])
    dm = make_dm("gpt", format="classification", objective="classification", train_files=path, validation_files=path)
    batch = one_batch(dm.val_dataloader())
    assert dm.label_names == ["2", "3", "10"] and batch["labels"].tolist() == [2, 0, 1]
    assert "token_type_ids" not in batch  # the gpt-style tokenizer has none
    dm = make_dm(
        "gpt", format="classification", objective="classification", validation_files=path, labels=["10", "3", "2"]
    )
    dm.setup("validate")
    assert dm.label_names == ["10", "3", "2"] and one_batch(dm.val_dataloader())["labels"].tolist() == [0, 2, 1]


def test_classification_classlabel_names(make_dm, tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 1]}, features=features).to_parquet(path)
    dm = make_dm(format="classification", objective="classification", train_files=path, validation_files=path)
    batch = one_batch(dm.val_dataloader())
    assert dm.label_names == ["neg", "pos"] and batch["labels"].tolist() == [1, 1]


# -------------------------------------------------------------------------------------------------- seq2seq
def test_seq2seq_source_and_target_with_special_tokens(make_dm, write, tok):
    t = tok("t5")
    rows = [{"source": "the cat sat", "target": "a dog"}, {"source": "hello", "target": "one two three four"}]
    path = write("train.jsonl", rows)
    dm = make_dm(
        "t5", format="seq2seq", objective="seq2seq", train_files=path, validation_files=path, predict_files=path
    )
    batch = one_batch(dm.val_dataloader())
    targets = [enc(t, r["target"]) for r in rows]
    assert batch["labels"].shape == (2, max(map(len, targets)))  # (B, T_tgt)
    for i, row in enumerate(rows):
        assert tokens(batch, i) == enc(t, row["source"]) and tokens(batch, i)[-1] == t.eos_token_id
        assert batch["labels"][i].tolist() == targets[i] + [-100] * (batch["labels"].shape[1] - len(targets[i]))
    assert batch["num_tokens"] == sum(len(enc(t, r["source"])) for r in rows) + sum(map(len, targets))
    predict = one_batch(dm.predict_dataloader())
    assert "labels" not in predict and predict["row"].tolist() == [0, 1]
    assert predict["input_ids"][1].tolist()[: len(enc(t, "hello"))] == enc(t, "hello")  # encoder input: right padding


def test_seq2seq_target_truncation_keeps_eos_and_is_counted(make_dm, write, tok):
    t = tok("t5")
    path = write("train.jsonl", [{"source": "hello", "target": "one two three four five six seven"}])
    dm = make_dm("t5", format="seq2seq", objective="seq2seq", train_files=path, max_target_length=4)
    with pytest.warns(UserWarning, match="max_target_length"):
        dm.setup("fit")
    batch = one_batch(dm.train_dataloader())
    assert batch["labels"].shape == (1, 4) and batch["labels"][0, -1].item() == t.eos_token_id
    assert dm.stats["train"]["truncated_rows"] == 1


# ------------------------------------------------------------------------------------------------ masked LM
def test_masked_lm_special_tokens_mask(make_dm, write, tok):
    t = tok("bert")
    texts = ["the quick brown fox jumps", "hello"]
    path = write("train.jsonl", [{"text": x} for x in texts])
    dm = make_dm("bert", objective="masked_lm", train_files=path, validation_files=path, max_length=8)
    with pytest.warns(UserWarning, match=r"1 of 2 rows \(50.0%\) longer than max_length=8"):
        batch = one_batch(dm.val_dataloader())
    long, short = t(texts[0])["input_ids"], t(texts[1])["input_ids"]
    assert batch["input_ids"][0].tolist() == long[:7] + [t.sep_token_id]  # truncated, keeping [SEP]
    assert tokens(batch, 1) == short
    assert batch["special_tokens_mask"][0].tolist() == [1] + [0] * 6 + [1]
    assert batch["special_tokens_mask"][1].tolist() == [1] + [0] * (len(short) - 2) + [1] * (9 - len(short))  # pads: 1
    assert "labels" not in batch


# ---------------------------------------------------------------------------------------------- truncation
def test_truncation_is_counted_and_warned(make_dm, write, tok):
    t = tok()
    short = len(enc(t, ALPACA_NO_INPUT.format(instruction="hi")) + enc(t, "ok", special=False)) + 1
    max_length = short + 4
    long = "the quick brown fox jumps over the lazy dog " * 3
    rows = [{"instruction": long, "output": "yes"}, {"instruction": "hi", "output": long}]  # prompt cut; response cut
    rows += [{"instruction": "hi", "output": "ok"}]
    path = write("train.jsonl", rows)
    dm = make_dm(format="instruction", train_files=path, max_length=max_length)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    (message,) = [str(w.message) for w in record if "train split" in str(w.message)]
    assert f"2 of 3 rows (66.7%) longer than max_length={max_length} were truncated from the right" in message
    assert f"{path}: 2" in message
    assert "1 of 3 rows (33.3%) have no tokens to compute the loss on" in message
    assert dm.stats["train"] == {
        "rows": 3,
        "tokens": 2 * max_length + short,
        "truncated_rows": 2,
        "no_loss_rows": 1,
        "packed_rows": 0,
        "split_rows": 0,
    }
    assert sum(b["num_tokens"] for b in dm.train_dataloader()) == 2 * max_length + short
