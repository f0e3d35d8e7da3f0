"""Bad input: every error names the file, the row or key, and what was expected; nothing is dropped silently."""

import re

import pytest

from finetune.data import DataModule

CLS = dict(format="classification", objective="classification")


def setup_error(dm, exc=ValueError, match="", stage="fit"):
    with pytest.raises(exc, match=match):
        dm.setup(stage)


# ------------------------------------------------------------------------------------------------------ files
def test_missing_file(make_dm, tmp_path):
    path = str(tmp_path / "nope.jsonl")
    setup_error(make_dm(train_files=path), FileNotFoundError, f"{re.escape(path)}: no such data file")


def test_unknown_extension_lists_the_supported(make_dm, tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\nhello\n")
    setup_error(
        make_dm(train_files=str(path)),
        match=r"train.tsv: unsupported file type '.tsv'; supported: .jsonl, .json, .csv, .parquet, .txt",
    )


def test_folder_without_data_files(make_dm, tmp_path):
    (tmp_path / "README.md").write_text("hi")
    setup_error(make_dm(path=str(tmp_path)), FileNotFoundError, "no data files in this folder; supported: .jsonl")


def test_unparsable_file_names_it(make_dm, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n')
    setup_error(make_dm(train_files=str(path)), match=r"bad.jsonl line 3: invalid JSON at column 9: Expecting value")
    path = tmp_path / "bad.csv"
    path.write_text('text\n"never closed\n')
    setup_error(
        make_dm(train_files=str(path)), match=r"bad.csv: could not load it as .csv \(csv\): .*EOF inside string"
    )


def test_empty_split_names_the_files(make_dm, write, tmp_path):
    (tmp_path / "a.jsonl").write_text("\n")
    write("b.csv", [])
    (tmp_path / "b.csv").write_text("text\n")  # a header alone
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")]
    setup_error(make_dm(train_files=files), match=r"the train split has 0 rows: .*a.jsonl, .*b.csv hold no data")


def test_missing_split_data(make_dm, write):
    setup_error(
        make_dm(train_files=write("t.jsonl", [{"text": "a"}])), match="no test data: set test_files", stage="test"
    )
    setup_error(make_dm(validation_files=write("v.jsonl", [{"text": "a"}])), match="no train data: set train_files")


# ---------------------------------------------------------------------------------------------------- columns
def test_missing_column_names_file_column_field_and_found_columns(make_dm, write):
    path = write("train.jsonl", [{"prompt": "say hi", "answer": "hello"}])
    setup_error(
        make_dm(format="instruction", train_files=path),
        match=re.escape(
            f"{path}: missing column 'instruction' for the 'instruction' field of the 'instruction' format; columns "
            "found: ['prompt', 'answer']. Map fields to columns with `fields`: fields={'instruction': <one of "
            "['prompt', 'answer']>}"  # no column is named like 'instruction': all are listed
        ),
    )
    dm = make_dm(format="instruction", train_files=path, fields={"instruction": "prompt", "output": "answer"})
    dm.setup("fit")  # remapped
    setup_error(
        make_dm(
            format="instruction", train_files=path, fields={"instruction": "prompt", "output": "answer", "input": "ctx"}
        ),
        match="missing column 'ctx' for the 'input' field",  # an optional field named explicitly must exist
    )


@pytest.mark.parametrize(
    "fmt, row, fields, hint",
    [
        ("instruction", {"output": "b", "instructions": "a"}, None, "fields={'instruction': 'instructions'}"),
        ("text", {"id": 1, "Text": "hi"}, None, "fields={'text': 'Text'}"),  # case-insensitive
        ("instruction", {"instruction": "a", "output": "b", "context": "c"}, {"input": "ctx"},
         "fields={'input': 'context'}"),  # close to the column named in `fields`
        ("chat", {"conversations": [], "message": "x"}, None, "fields={'messages': 'message'}"),
    ],
)  # fmt: skip
def test_missing_column_hint_proposes_the_closest_free_column(make_dm, write, fmt, row, fields, hint):
    path = write("train.jsonl", [row])
    setup_error(make_dm(format=fmt, train_files=path, fields=fields), match=re.escape(f"Map fields to columns with "
                f"`fields`, e.g. {hint}") + "$")  # fmt: skip


NON_STRINGS = [  # (format, objective, rows, column, type found)
    ("text", "causal_lm", [{"text": "a"}, {"text": 3}], "text", "int 3"),
    ("text", "causal_lm", [{"text": "a"}, {"text": None}], "text", "NoneType None"),
    ("instruction", "causal_lm", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 1.5}], "output",
     "float 1.5"),
    ("seq2seq", "seq2seq", [{"source": "a", "target": "b"}, {"source": "a", "target": None}], "target", "NoneType"),
    ("classification", "classification", [{"text": "a", "label": 0}, {"text": ["x"], "label": 1}], "text", "list"),
]  # fmt: skip


@pytest.mark.parametrize("fmt, objective, rows, column, found", NON_STRINGS)
@pytest.mark.parametrize("blank_line", [False, True])
def test_non_string_text_names_file_row_column_and_type(
    make_dm, tmp_path, fmt, objective, rows, column, found, blank_line
):
    import json

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + "\n" * blank_line + json.dumps(rows[1]) + "\n")
    # Mixed types load as a JSON-typed column and are caught row by row, or fail to load and are diagnosed.
    setup_error(
        make_dm(format=fmt, objective=objective, train_files=str(path)),
        match=re.escape(f"{path} row 1 (line {2 + blank_line}): column '{column}' ") + ".*" + re.escape(found),
    )


def test_csv_errors_give_the_line(make_dm, tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"two\nlines",pos\n,neg\n')  # row 1 starts on line 4 and has no text
    setup_error(make_dm(**CLS, train_files=str(path)), match=re.escape(f"{path} row 1 (line 4): column 'text'"))


# ----------------------------------------------------------------------------------------------------- labels
def test_unseen_label_names_file_row_label_and_known_labels(make_dm, write):
    train = write("train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    dev = write("dev.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}])
    setup_error(
        make_dm(**CLS, train_files=train, validation_files=dev),
        match=re.escape(
            f"{dev} row 1 (line 2): label 'maybe' is not among the labels of the train split: ['neg', 'pos']"
        ),
    )
    setup_error(
        make_dm(**CLS, train_files=train, labels=["pos"]),
        match=re.escape(f"{train} row 1 (line 2): label 'neg' is not among the labels of `labels`: ['pos']"),
    )


@pytest.mark.parametrize("label, message", [(None, "is empty; every row needs a label"), (0.5, "found float 0.5")])
def test_bad_label_values(make_dm, write, label, message):
    path = write("train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": label}])
    setup_error(make_dm(**CLS, train_files=path), match=rf"train.jsonl row 1 \(line 2\): column 'label'.*{message}")


def test_classification_needs_label_names(make_dm, write):
    path = write("dev.jsonl", [{"text": "a", "label": "pos"}])
    setup_error(make_dm(**CLS, validation_files=path), match="pass `labels`, or train data", stage="validate")


# ------------------------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}],
         "message 1 of column 'messages' must be a dict with 'role' and 'content'"),
        ([{"content": "hi"}], "message 0 of column 'messages' must be a dict with 'role' and 'content'"),
        ([{"role": "tool", "content": "hi"}],
         "message 0 has role 'tool'; expected one of ['system', 'user', 'assistant']"),
        ([{"role": "user", "content": 3}], "message 0 content must be a string; found int"),
        ("hello", "must hold a non-empty list of {'role', 'content'} messages; found str"),
        ([], "must hold a non-empty list"),
    ],
)  # fmt: skip
def test_bad_chat_messages_name_file_and_row(make_dm, write, messages, match):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write("chat.jsonl", [{"messages": good}, {"messages": messages}])
    setup_error(
        make_dm(format="chat", train_files=path), match=re.escape(f"{path} row 1 (line 2): ") + ".*" + re.escape(match)
    )


def test_chat_template_not_prefix_stable(make_dm, write):
    unstable = (  # marks the last message, so earlier renderings are not prefixes of later ones
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write(
        "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    )
    setup_error(
        make_dm(format="chat", train_files=path, chat_template=unstable),
        match=re.escape(f"{path} row 0 (line 1): the chat template is not prefix-stable at message 1 (assistant)"),
    )
    raising = "{{ raise_exception('roles must alternate') }}"
    setup_error(
        make_dm(format="chat", train_files=path, chat_template=raising),
        match=r"row 0 \(line 1\): the chat template failed: .*roles must alternate",
    )


# ------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_validation_fraction_range(make_dm, fraction):
    with pytest.raises(ValueError, match=rf"validation_fraction={fraction}; expected a number in \(0, 1\)"):
        make_dm(train_files="t.jsonl", validation_fraction=fraction)


def test_validation_fraction_conflicts(make_dm, write, tmp_path):
    with pytest.raises(ValueError, match="either validation_files or validation_fraction"):
        make_dm(train_files="t.jsonl", validation_files="v.jsonl", validation_fraction=0.1)
    write("data/train.jsonl", [{"text": "a"}])
    write("data/valid.jsonl", [{"text": "a"}])
    setup_error(
        make_dm(path=str(tmp_path / "data"), validation_fraction=0.1), match=r"has validation data \[.*valid.jsonl"
    )
    path = write("t.jsonl", [{"text": "a"}, {"text": "b"}])
    setup_error(make_dm(train_files=path, validation_fraction=0.1), match="of 2 train rows leaves no validation rows")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(format="text", objective="classification"),
         "format='text' can't be used for the 'classification' objective; it takes classification data"),
        (dict(format="chat", objective="seq2seq"), "it takes seq2seq or instruction data"),
        (dict(objective="regression"), r"objective='regression'; expected one of \['causal_lm'"),
        (dict(format="seq2seq", objective="seq2seq", packing=True), "packing=True is for causal_lm only"),
        (dict(format="chat", fields={"text": "body"}),
         r"unknown field\(s\) \['text'\] for the 'chat' format; its fields are \['messages'\]"),
        (dict(path="data", train_files="t.jsonl"), "either `path` or train_files"),
        (dict(format="instruction", prompt_template="{instruction} {question}"),
         r"prompt_template: unknown placeholder\(s\) \['question'\]"),
        (dict(format="instruction", prompt_template="{instruction}"), "prompt_template: must contain {input}"),
        (dict(format="classification", objective="classification", labels=["a", "a"]), "has duplicates"),
        (dict(max_length=0), "max_length=0; expected a positive integer"),
    ],
)  # fmt: skip
def test_bad_settings(make_dm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(**kwargs)


def test_tokenizer_not_set(write):
    dm = DataModule(train_files=write("t.jsonl", [{"text": "a"}]))
    setup_error(dm, match="tokenizer is not set")
