"""Loading: file types, folder split discovery, the validation carve, the cache, hub datasets, CLI signature."""

import datasets
import pytest

from finetune.data import DataModule
from finetune.data.encode import Encoder

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
    dm = make_dm(validation_files=write("v.txt", ["the cat sat", "", "hello world"]))
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
    with pytest.warns(UserWarning, match=r"ignoring \[.*notes.txt'\]: their names start with none of train"):
        dm.setup("fit")
    assert dm.stats["train"]["rows"] == 3


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
