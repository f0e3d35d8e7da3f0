"""Loading: file types, folder split discovery, the validation carve, the cache, hub datasets, CLI signature."""

import logging

import datasets
import pytest

from finetune.data import DataModule
from finetune.data.encode import Encoder
from finetune.data.sources import SPLIT_WORDS, split_of

ROWS = [{"text": "the cat sat", "label": "pos"}, {"text": "a dog", "label": "neg"}, {"text": "hello", "label": "pos"}]


def texts(dm, split):
    """The rows of a split, decoded, in loader order."""
    loader = {"train": dm.train_dataloader, "validation": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return [
        dm.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for b in loader
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]


HOST = ("num_tokens", "padded")  # Python values, not tensors


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_types_give_the_same_batches(make_dm, write, suffix):
    kwargs = dict(format="classification", objective="classification", labels=["neg", "pos"])
    reference = make_dm(validation_files=write("a.jsonl", ROWS), **kwargs)
    dm = make_dm(validation_files=write(f"b{suffix}", ROWS), **kwargs)
    a, b = list(reference.val_dataloader())[0], list(dm.val_dataloader())[0]
    assert a.keys() == b.keys() and all(a[k].tolist() == b[k].tolist() for k in a if k not in HOST)


def test_txt_lines_are_text_rows(make_dm, write):
    dm = make_dm(validation_files=write("v.txt", ["the cat sat", "", "hello world"]), sample_by="line")
    dm.setup("validate")
    assert texts(dm, "validation") == ["the cat sat", "", "hello world"]  # a blank line is a row too
    assert dm.stats["validation"]["rows"] == 3


def test_folder_splits_by_file_name(make_dm, tmp_path, write):
    write("data/train_a.jsonl", ROWS[:2])
    write("data/train_b.csv", ROWS[2:])
    write("data/dev.jsonl", ROWS[:1])
    write("data/test.parquet", ROWS[1:])
    (tmp_path / "data" / "README.md").write_text("not data")
    dm = make_dm(path=str(tmp_path / "data"))
    dm.setup()
    assert {s: dm.stats[s]["rows"] for s in dm.stats} == {"train": 3, "validation": 1, "test": 2, "predict": 2}
    assert texts(dm, "validation") == ["the cat sat"] and texts(dm, "test") == ["a dog", "hello"]


def test_folder_without_split_names_is_all_train_and_unmatched_files_warn(make_dm, tmp_path, write):
    write("d1/a.jsonl", ROWS[:2])
    write("d1/b.jsonl", ROWS[2:])
    dm = make_dm(path=str(tmp_path / "d1"))
    dm.setup("fit")
    assert dm.stats["train"]["rows"] == 3 and "validation" not in dm.stats and dm.val_dataloader() == []
    write("d2/train.jsonl", ROWS)
    write("d2/notes.txt", ["stray"])
    dm = make_dm(path=str(tmp_path / "d2"))
    with pytest.warns(UserWarning, match=r"ignoring \[.*notes.txt'\]: their names hold no split word \(train: tr"):
        dm.setup("fit")
    assert dm.stats["train"]["rows"] == 3


SPLIT_NAMES = {  # name (relative to the data folder) -> split; split words count only as whole words
    "train-00000-of-00002.parquet": "train", "training_set.csv": "train", "Train.JSONL": "train",
    "validation.jsonl": "validation", "val_2.csv": "validation", "dev.txt": "validation",
    "valid/part.jsonl": "validation", "squad-dev.json": "validation", "test_a.jsonl": "test",
    "eval.jsonl": "test", "imdb test.csv": "test", "train_test.jsonl": "train",  # the first split word decides
    "valentine_stories.txt": None, "devices.csv": None, "testimonials.jsonl": None, "contest/evaluator.jsonl": None,
    "pretrain.txt": None,
}  # fmt: skip


@pytest.mark.parametrize("name, split", SPLIT_NAMES.items())
def test_split_of_reads_whole_words(name, split):
    assert split_of(name) == split


@pytest.fixture
def lightning_logs(caplog):
    """Lightning's INFO lines (its logger does not propagate to the root logger that caplog listens on)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_folder_splits_by_whole_words_and_logs_each_file(make_dm, tmp_path, write, lightning_logs):
    names = [n for n in SPLIT_NAMES if n != "Train.JSONL"]  # a case-insensitive file system would merge it
    for i, name in enumerate(names):
        write(f"data/{name}", [f"row {i}" if name.endswith(".txt") else {"text": f"row {i}"}])
    (tmp_path / "data" / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    write("data/dataset_info.json", [{"text": "metadata"}])
    write("data/tokenizer/tokenizer.json", [{"text": "not data"}])  # a subfolder file without a split word
    dm = make_dm(path=str(tmp_path / "data"))
    with pytest.warns(UserWarning) as warned:
        dm.setup()
    ignored = [str(tmp_path / "data" / n) for n in ("devices.csv", "pretrain.txt", "testimonials.jsonl")]
    ignored.append(str(tmp_path / "data" / "valentine_stories.txt"))  # not contest/evaluator.jsonl: a subfolder
    assert [str(w.message).split(": their")[0] for w in warned] == [f"path={tmp_path / 'data'}: ignoring {ignored}"]
    expected = {s: sorted(f"row {i}" for i, n in enumerate(names) if SPLIT_NAMES[n] == s) for s in SPLIT_WORDS}
    assert {s: sorted(texts(dm, s)) for s in expected} == expected
    for name in names:  # one line per file that is read, naming the file and its split
        line = f"data.path: {tmp_path / 'data' / name} -> {SPLIT_NAMES[name]} split"
        assert (line in lightning_logs.text) == (SPLIT_NAMES[name] is not None), name
    assert not any(word in lightning_logs.text for word in ("hidden", "dataset_info", "tokenizer"))


def test_folder_of_only_unsplit_names_is_all_train(make_dm, tmp_path, write):
    for name in ("valentine_stories.txt", "devices.csv", "testimonials.jsonl"):  # today's main: validation, test
        write(f"data/{name}", [name if name.endswith(".txt") else {"text": name}])
    write("data/tokenizer/vocab.json", [{"text": "not data"}])
    dm = make_dm(path=str(tmp_path / "data"))
    dm.setup()
    assert dm.stats["train"]["rows"] == 3 and set(dm.stats) == {"train"}


def test_single_file_path_is_train(make_dm, write):
    dm = make_dm(path=write("anything.jsonl", ROWS))
    dm.setup("fit")
    assert dm.stats["train"]["rows"] == 3


def test_validation_fraction_is_seeded_disjoint_and_covering(make_dm, write):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write("train.jsonl", rows)

    def carve(seed):
        dm = make_dm(train_files=path, validation_fraction=0.25, seed=seed)
        dm.setup("fit")
        return sorted(texts(dm, "train")), texts(dm, "validation")

    train, val = carve(0)
    assert len(val) == 5 and len(train) == 15 and sorted(train + val) == sorted(r["text"] for r in rows)
    assert carve(0) == (train, val)  # deterministic
    assert carve(1)[1] != val  # another seed, another carve


def test_second_run_reuses_the_tokenized_cache(make_dm, write, monkeypatch):
    path = write("train.jsonl", ROWS)
    make_dm(train_files=path).setup("fit")

    def fail(self, batch, indices):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Encoder, "__call__", fail)
    dm = make_dm(train_files=path)
    dm.setup("fit")  # served from the cache
    assert dm.stats["train"]["rows"] == 3
    with pytest.raises(AssertionError, match="tokenized again"):
        make_dm(train_files=path, max_length=4).setup("fit")  # another setting, another cache entry


def test_hub_dataset_splits(make_dm, monkeypatch):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}, features=features),
        validation=datasets.Dataset.from_dict({"text": ["z"], "label": [1]}, features=features),
        unsupervised=datasets.Dataset.from_dict({"text": ["w"], "label": [0]}, features=features),
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: calls.append(name) or dd)
    dm = make_dm(format="classification", objective="classification", path="someone/some-data")
    with pytest.warns(UserWarning, match=r"ignoring \['unsupervised'\]"):
        dm.setup("fit")
    assert calls == ["someone/some-data"] and dm.label_names == ["a", "b"]
    assert list(dm.val_dataloader())[0]["labels"].tolist() == [1]


def test_missing_local_path_is_not_sent_to_the_hub(make_dm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file or folder"):
        make_dm(path=str(tmp_path / "nope")).setup("fit")


def test_tokenizer_from_a_path_and_the_cli_signature(tokenizer_folder, write, tmp_path):
    from jsonargparse import ArgumentParser

    dm = DataModule(train_files=write("t.jsonl", ROWS), tokenizer=str(tokenizer_folder("gpt")), cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.tokenizer.eos_token == "<|endoftext|>"
    parser = ArgumentParser()
    parser.add_class_arguments(DataModule, "data")
    cfg = parser.parse_args(
        ["--data.format=chat", "--data.train_files=[a.jsonl, b.jsonl]", "--data.fields={messages: m}"]
    )
    assert cfg.data.format == "chat" and cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.data.fields == {"messages": "m"}
    assert "Carve this fraction of the train rows" in parser.format_help()


def test_prepare_data_then_setup_on_every_stage(make_dm, write):
    path = write("train.jsonl", ROWS)
    dm = make_dm(train_files=path, test_files=path, predict_files=path, validation_fraction=0.34)
    dm.prepare_data()  # no trainer: every split that has data
    for stage in ("fit", "validate", "test", "predict"):
        dm.setup(stage)
    assert {s: dm.stats[s]["rows"] for s in dm.stats} == {"train": 2, "validation": 1, "test": 3, "predict": 3}
