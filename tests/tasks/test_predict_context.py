"""``finetune predict`` with a prompt that fits ``max_length`` but not ``max_new_tokens`` more in the model's context:
the prompt's start is cut (its end kept), the row says so, a warning names it, and every row gets its prediction."""

import json

import pytest

from finetune.cli import main
from tests.tasks.helpers import TINY_LLAMA, WORDS, cyclic_text, fit, recipe, write_jsonl


def test_an_over_long_prompt_is_cut_to_fit_the_context_and_named(tmp_path, tokenizer_folder):
    long = " ".join(WORDS * 4)  # cut to max_length=64 (the context) by the data, and then to fit 20 new tokens
    texts = ["the quick", long, "a cat"]
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(8))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    config = recipe(
        tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "max_new_tokens": 20},
        {"format": "text", "train_files": data, "batch_size": 3, "max_length": 64}, trainer={"max_steps": 1},
    )  # fmt: skip
    fit(config)
    with pytest.warns(UserWarning, match=r"predict row 1: the prompt's \d+ tokens and max_new_tokens=20 exceed the "
                                         r"model's context of 64; its first \d+ tokens were cut"):  # fmt: skip
        assert main(["predict", "--config", config, "--ckpt_path", "last", f"--data.predict_files={prompts}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and all(isinstance(r["output"], str) and r["output"] for r in rows)
    assert [r["truncated"] for r in rows] == [False, True, False]
    assert [rows[0]["prompt"], rows[2]["prompt"]] == [texts[0], texts[2]]
    cut = rows[1]["prompt"]
    assert long.endswith(cut) and len(cut) < len(long)  # the end of the prompt is kept
