"""Every bundled recipe parses, and runs 2 steps with a tiny stand-in model and tiny data in its format."""

import json

import pytest
import yaml

from finetune import bundled
from finetune.cli import main

RECIPES = bundled.bundled()

# Tiny rows per data format: enough for a 2-step run plus validation.
ROWS = {
    "text": [{"text": f"once upon a time there was a fox number {i}."} for i in range(12)],
    "instruction": [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "numbers", "output": str(2 * i + 1)}
        for i in range(12)
    ],
    "classification": [{"text": f"this is {w} {i}", "label": w} for i in range(6) for w in ("good", "bad")],
    "seq2seq": [{"source": f"reverse: {i} {i + 1}", "target": f"{i + 1} {i}"} for i in range(12)],
    "chat": [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(12)
    ],
    "preference": [
        {"prompt": f"the fox {i}", "chosen": " sat on the mat.", "rejected": " mat the on sat."} for i in range(12)
    ],  # fmt: skip
}
# model class -> stand-in architecture for a recipe's pretrained model
ARCH = {"gpt2": "gpt2", "llama": "llama", "bert": "bert", "t5": "t5"}


def _arch(recipe: dict) -> str | None:
    pretrained = recipe["model"]["init_args"].get("pretrained")
    if pretrained is None:
        return None
    return next(a for key, a in ARCH.items() if key in pretrained.lower())


def test_bundled_recipes_exist_and_describe_themselves():
    assert {"quickstart", "gpt2-alpaca", "llama-3.2-1b-alpaca", "bert-classification", "t5-small-seq2seq",
            "bert-mlm"} <= set(RECIPES)  # fmt: skip
    for path in RECIPES.values():
        assert bundled.describe(path), f"{path} has no one-line description comment"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", name, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("finetune.tasks.")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_two_steps(name, tmp_path, stand_in):
    recipe = yaml.safe_load(RECIPES[name].read_text())
    fmt = recipe["data"]["format"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[fmt]))
    args = [
        "fit", "--config", name,
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        f"--data.train_files={data}", f"--data.validation_files={data}", "--data.validation_fraction=null",
        "--data.batch_size=4", "--data.max_length=64",
    ]  # fmt: skip
    if (arch := _arch(recipe)) is not None:
        args.append(f"--model.init_args.pretrained={stand_in(arch)}")
    if recipe["model"]["class_path"].endswith("Seq2Seq"):
        args += ["--model.init_args.max_new_tokens=4", "--data.max_target_length=16"]
    assert main(args) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()


def test_classification_lora_recipe_trains_the_adapter_at_a_constant_rate_in_fp32(tmp_path, stand_in):
    """bert-classification-lora: only the adapter and the new heads train, at lr 1e-3 from the first step to
    the last (no warmup, no decay), with AdamW betas (0.9, 0.999), in fp32; bert-classification points to it."""
    import csv

    import torch

    from tests.tasks.helpers import logged

    assert "bert-classification-lora recipe" in RECIPES["bert-classification"].read_text()
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(ROWS["classification"])
    run = tmp_path / "run"
    args = [
        "fit", "--config", "bert-classification-lora", f"--trainer.default_root_dir={run}",
        "--trainer.max_steps=3", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        f"--data.train_files={data}", f"--data.validation_files={data}", "--data.batch_size=4",
        "--data.max_length=64", f"--model.init_args.pretrained={stand_in('bert')}",
    ]  # fmt: skip
    assert main(args) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "32-true"
    assert config["model"]["init_args"]["betas"] == [0.9, 0.999]
    assert list(logged(run, "train/lr").values()) == pytest.approx([1e-3] * 3, rel=1e-6)  # logged in fp32
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    trained = set(ckpt["state_dict"])
    # the adapter, and the heads the checkpoint lacks (the stand-in, an MLM checkpoint, has no pooler either)
    assert all("lora_" in k or ".modules_to_save." in k for k in trained), sorted(trained)
    assert "model.classifier.modules_to_save.default.weight" in trained and any("lora_A" in k for k in trained)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
