"""Bad checkpoints and bad calls: each error names the file or key and what was expected."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.models import from_hf, to_hf
from finetune.models.hub import SUPPORTED_MODEL_TYPES


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json; expected a Hugging Face model folder"):
        from_hf(tmp_path)


def test_missing_folder_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        from_hf(tmp_path / "nope")


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt_neox' is not supported; supported: \[") as e:
        from_hf(tmp_path)
    for t in SUPPORTED_MODEL_TYPES:
        assert repr(t) in str(e.value)


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json: no 'model_type' key"):
        from_hf(tmp_path)


def test_wrong_shape_names_file_key_and_shapes(hf_folder, tmp_path):
    _, folder = hf_folder("llama-gqa")
    ckpt = _copy(folder, tmp_path)
    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # GQA expects (16, 32)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: 'model.layers.1.self_attn.k_proj.weight' has shape \(32, 32\), "
        r"but the config expects \(16, 32\)",
    ):
        from_hf(ckpt)


def test_missing_and_unexpected_keys(hf_folder, tmp_path):
    _, folder = hf_folder("gpt2")
    ckpt = _copy(folder, tmp_path)
    state = load_file(ckpt / "model.safetensors")
    del state["transformer.h.0.mlp.c_fc.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: missing keys \['transformer.h.0.mlp.c_fc.weight'\]"):
        from_hf(ckpt)
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 128)
    state["transformer.h.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected key 'transformer.h.0.mlp.extra.weight'"):
        from_hf(ckpt)


def test_corrupt_safetensors(hf_folder, tmp_path):
    _, folder = hf_folder("gpt2")
    ckpt = _copy(folder, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors"):
        from_hf(ckpt)


@pytest.mark.parametrize("backend", ["scratch", "hf"])
@pytest.mark.parametrize("sharded", [False, True])
def test_corrupt_safetensors_is_named_on_both_backends(stand_in, tmp_path, backend, sharded):
    """``transformers.from_pretrained`` raises a SafetensorError that names no file; the task names it."""
    import re

    import transformers as T

    from finetune.tasks import CausalLM

    ckpt = _copy(stand_in("gpt2"), tmp_path)
    if sharded:
        for f in ckpt.glob("model*.safetensors*"):
            f.unlink()
        T.AutoModelForCausalLM.from_pretrained(stand_in("gpt2")).save_pretrained(ckpt, max_shard_size="40KB")
    bad = sorted(ckpt.glob("model*.safetensors"))[-1]
    assert (bad.name == "model.safetensors") != sharded
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    task = CausalLM(pretrained=str(ckpt), backend=backend)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: cannot read safetensors (") + r".*\); expected a complete "
                       "safetensors file: it is truncated or corrupt"):  # fmt: skip
        task.build_model()


def test_missing_shard(tmp_path):
    from conftest import make_hf

    make_hf("llama-gqa").save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json: names shards that are missing"):
        from_hf(tmp_path)


def test_unknown_override(hf_folder):
    _, folder = hf_folder("bert-mlm")
    with pytest.raises(TypeError, match=r"unknown config fields \['num_lables'\] for BertConfig"):
        from_hf(folder, num_lables=3)


def test_to_hf_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(hf_folder, tmp_path, monkeypatch):
    _, folder = hf_folder("gpt2")
    model = from_hf(folder)
    target = to_hf(model, tmp_path / "out")  # an earlier export: replaceable with overwrite=True only
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out: exists and is not empty"):
        to_hf(model, target)
    assert (target / "keep.txt").read_text() == "mine"

    import finetune.models.hub as hub

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        to_hf(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert (target / "keep.txt").read_text() == "mine"  # the old content survives a failed overwrite
