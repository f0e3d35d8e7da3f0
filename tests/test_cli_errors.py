"""The ``finetune`` command: recipe lookup and copy, bad recipes and bad data reported by key or file, predict."""

import json

import pytest

from finetune import bundled
from finetune.cli import main
from tests.tasks.helpers import TINY_LLAMA, cli_error, cyclic_text, fit, recipe, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_recipes_lists_and_copies(tmp_path, capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name, path in bundled.bundled().items():
        assert f"{name}" in listing and bundled.describe(path) in listing
    assert main(["recipes", "cp", "quickstart", str(tmp_path)]) == 0
    copied = tmp_path / "quickstart.yaml"
    assert copied.read_text() == bundled.find("quickstart").read_text()
    with pytest.raises(FileExistsError, match="pass --force"):
        main(["recipes", "cp", "quickstart", str(copied)])


def test_unknown_recipe_name(capsys):
    assert main(["fit", "--config", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe: no such recipe file" in err and "'quickstart'" in err  # lists the bundled ones


def test_unknown_recipe_key_is_named(tmp_path, tokenizer_folder, capsys):
    config = recipe(tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama"))},
                    {"format": "text", "train_files": "x.txt"})  # fmt: skip
    err = cli_error(capsys, "fit", "--config", config, "--model.init_args.learning_rate=1e-3")
    assert "learning_rate" in err and "recipe.yaml" not in err  # the command line set it, not the recipe


def test_unknown_key_of_a_second_config_names_that_file(tmp_path, tokenizer_folder, capsys):
    config = recipe(tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama"))},
                    {"format": "text", "train_files": "x.txt"})  # fmt: skip
    second = tmp_path / "overrides.yaml"
    second.write_text("trainer:\n  max_stepz: 3\n")
    err = cli_error(capsys, "fit", "--config", config, "--config", str(second))
    assert f"does not accept option 'trainer.max_stepz' (set in {second})" in err
    assert err.count("\n") == 2  # the message and the --debug hint: no usage dump


def test_a_refused_recipe_value_is_one_message(tmp_path, tokenizer_folder, capsys):
    config = recipe(tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama"))},
                    {"format": "text", "train_files": "x.txt"})  # fmt: skip
    err = cli_error(capsys, "fit", "--config", config, "--model.init_args.metrics=[bogus]")
    assert "finetune fit: error: model.metrics: unknown ['bogus'] for CausalLM; known: ['loss'," in err
    assert "NoneType" not in err
    assert "Namespace(" not in err and err.count("\n") == 2  # the message and the --debug hint, no value dump


def test_missing_data_file_is_named(tmp_path, tokenizer_folder, capsys, monkeypatch):
    config = recipe(tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama"))},
                    {"format": "text", "train_files": str(tmp_path / "missing.jsonl")})  # fmt: skip
    assert "missing.jsonl" in cli_error(capsys, "fit", "--config", config)
    monkeypatch.setenv("FINETUNE_DEBUG", "1")  # the traceback, for debugging
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        main(["fit", "--config", config])
    monkeypatch.delenv("FINETUNE_DEBUG")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        main(["fit", "--debug", "--config", config])


def test_max_length_beyond_learned_positions(tmp_path, stand_in, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(4))
    config = recipe(tmp_path, "CausalLM", {"pretrained": str(stand_in("gpt2"))},
                    {"format": "text", "train_files": data, "max_length": 128})  # fmt: skip
    err = cli_error(capsys, "fit", "--config", config)
    assert "data.max_length=128 exceeds the model's context of 64 positions" in err


def test_predict_writes_one_output_per_row_in_order(tmp_path, tokenizer_folder):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(16))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in ("the quick", "a cat", "the lazy dog", "fox")])
    config = recipe(
        tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "max_new_tokens": 5},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 3, "max_length": 32},
        trainer={"max_steps": 2},
    )  # fmt: skip
    fit(config)
    assert main(["predict", "--config", config, "--ckpt_path", "last", f"--data.predict_files={prompts}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert [r["prompt"] for r in rows] == ["the quick", "a cat", "the lazy dog", "fox"]
    assert all(isinstance(r["output"], str) for r in rows)
