"""Bad input to ``finetune export`` (and a bad preset to ``fit``): a clear error, and nothing partial left behind."""

import shutil

import pytest
import torch
import transformers as T
import yaml

from finetune.cli import main
from finetune.export import export
from tests.tasks.helpers import cyclic_text, fit, recipe, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stand_in):
    """A LoRA run on a copy of the tiny LLaMA stand-in (tests may corrupt the copy)."""
    tmp = tmp_path_factory.mktemp("trained")
    base = tmp / "base"
    shutil.copytree(stand_in("llama"), base)
    data = write_jsonl(tmp / "d.jsonl", cyclic_text(8))
    config = recipe(
        tmp, "CausalLM", {"pretrained": str(base), "adapter": "lora"},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 16},
        trainer={"max_steps": 2},
    )  # fmt: skip
    fit(config)
    return tmp / "run", base


def _left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_run_without_checkpoints(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained[0] / "config.yaml", run)
    with pytest.raises(FileNotFoundError, match=r"run: no checkpoints/best.ckpt \(checkpoints there: none\)"):
        export(run, tmp_path / "out", format="merged")
    assert _left(tmp_path) == ["run"]


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        export(tmp_path, tmp_path / "out", format="adapter")


def test_a_non_empty_target_that_is_not_an_export_is_kept_even_with_force(tmp_path, trained):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="out: exists, is not empty and is not an earlier export"):
            export(trained[0], out, format="merged", ckpt="last", force=force)
    assert _left(out) == ["mine.txt"] and _left(tmp_path) == ["out"]
    (out / "mine.txt").unlink()
    export(trained[0], out, format="merged", ckpt="last")  # an empty folder is filled
    assert "model.safetensors" in _left(out) and _left(tmp_path) == ["out"]  # no temporary or old folder left
    T.AutoModelForCausalLM.from_pretrained(out)


def test_a_corrupt_base_safetensors_file(tmp_path, trained):
    run, base = trained
    weights = base / "model.safetensors"
    good = weights.read_bytes()
    try:
        weights.write_bytes(good[: len(good) // 2])  # truncated
        with pytest.raises(ValueError, match=r"base/model.safetensors: cannot read safetensors"):
            export(run, tmp_path / "out", format="merged", ckpt="last")
    finally:
        weights.write_bytes(good)
    assert _left(tmp_path) == []


def test_a_corrupt_checkpoint(tmp_path, trained):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((trained[0] / "checkpoints/last.ckpt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"bad.ckpt: cannot read the checkpoint"):
        export(trained[0], tmp_path / "out", format="adapter", ckpt=str(bad))
    assert _left(tmp_path) == ["bad.ckpt"]


def test_a_failure_mid_write_leaves_nothing(tmp_path, trained, monkeypatch):
    import finetune.models.hub as hub

    def full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hub, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        export(trained[0], tmp_path / "out", format="merged", ckpt="last")
    assert _left(tmp_path) == []


def test_the_cli_reports_errors_and_exports(tmp_path, trained, capsys):
    assert main(["export", str(tmp_path), "--format", "merged", "--out", str(tmp_path / "o")]) == 2
    assert "finetune export: error:" in capsys.readouterr().err
    out = tmp_path / "adapter"
    args = ["export", str(trained[0]), "--ckpt", "last", "--format", "adapter", "--out", str(out), "--dtype", "bf16"]
    assert main(args) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= set(_left(out))
    assert T.AutoConfig.from_pretrained(out / "base").dtype == torch.bfloat16
    assert main(args) == 2  # now non-empty
    assert "pass --force" in capsys.readouterr().err


def test_full_fine_tune_has_no_adapter_but_exports_merged(tmp_path, stand_in):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(8))
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(stand_in("gpt2")), "backend": "hf"},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 16},
        trainer={"max_steps": 1},
    )  # fmt: skip
    fit(config)
    with pytest.raises(ValueError, match="a full fine-tune has no adapter to export; use --format merged"):
        export(tmp_path / "run", tmp_path / "a", format="adapter", ckpt="last")
    export(tmp_path / "run", tmp_path / "m", format="merged", ckpt="last")
    trained = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    for k, v in trained.items():
        torch.testing.assert_close(merged[k.removeprefix("model.")], v, rtol=0, atol=0)


def test_a_preset_with_an_unknown_field_stops_fit_before_any_output(tmp_path, stand_in):
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({"method": "lora", "r": 4, "lora_alfa": 8}))
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(8))
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(stand_in("llama")), "adapter": str(preset)},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 16},
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"{preset}: unknown field\(s\) \['lora_alfa'\] for lora"):
        fit(config)
    assert not (tmp_path / "run").exists()
