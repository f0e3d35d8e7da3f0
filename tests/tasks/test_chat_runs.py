"""A chat run keeps the template it trained with (run tokenizer, merged and adapter exports) and stops generating at
its end of turn everywhere: predict, the end-of-fit sample, ``generate`` on the run and on the export, and the
exported ``generation_config.json``."""

import json

import pytest
import torch
import transformers as T

from finetune.cli import generate_command, main
from finetune.data.templates import CHATML, render
from finetune.export import export
from tests.tasks.helpers import fit, recipe, write_jsonl
from tests.test_inference import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A template unlike the tokenizer's ChatML, so the data's template is seen to win; its turns end with <|im_end|>.
CUSTOM = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}"
)
CHAT = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (("hello", "fine"), ("what is your name?", "fox"), ("one two", "three"))]  # fmt: skip


def end_of_turn_model(folder, *, template: str | None) -> tuple[int, int]:
    """``tiny_llama`` rewired so that greedy decoding writes " fox" after any token but " fox", and <|im_end|>
    right after it: without the end-of-turn stop it writes " fox fox fox..." to ``max_new_tokens``. Attention and MLP
    outputs are zeroed, so the last hidden state is the current token's embedding: channel 0 is 1 for every token,
    channel 1 only for " fox". Returns the ids of " fox" and <|im_end|>."""
    tiny_llama(folder)
    tok = T.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    tok.save_pretrained(folder)
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    [fox] = tok(" fox", add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight  # (V, C) each
        emb.zero_()
        emb[:, 0] = 1.0
        emb[fox, 1] = 1.0
        head.zero_()
        head[fox, :2] = torch.tensor([10.0, -30.0])
        head[eot, 1] = 20.0
    model.save_pretrained(folder)
    return fox, eot


@pytest.mark.parametrize("case", ["data-template", "chatml-fallback"])
def test_a_chat_run_keeps_its_template_and_stops_at_the_end_of_turn(tmp_path, capsys, case):
    template = CUSTOM if case == "data-template" else None  # the fallback: the tokenizer has none, ChatML is used
    used = template or CHATML
    base = tmp_path / "base"
    fox, eot = end_of_turn_model(base, template=None if case == "chatml-fallback" else CHATML)
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    adapter = {"preset": "lora", "r": 2} if case == "chatml-fallback" else None
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(base), "lr": 0.0, "adapter": adapter, "max_new_tokens": 12},
        {"format": "chat", "train_files": data, "predict_files": data, "batch_size": 3, "max_length": 64,
         "chat_template": template},
        trainer={"max_steps": 1},
    )  # fmt: skip
    fit(config)
    run = tmp_path / "run"
    assert "sample: ' fox'" in capsys.readouterr().out  # the end-of-fit sample stopped at <|im_end|>
    assert T.AutoTokenizer.from_pretrained(run / "tokenizer").chat_template == used

    assert main(["predict", "--config", config, "--ckpt_path", "last"]) == 0
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [" fox"] * len(CHAT)

    folders = [export(run, tmp_path / "merged", format="merged", ckpt="last")]
    if adapter is not None:
        folders.append(export(run, tmp_path / "adapter", format="adapter", ckpt="last"))
        folders.append(folders[-1] / "base")
    messages = CHAT[0]["messages"]
    for folder in folders:
        tok = T.AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template == used, folder
        assert tok.apply_chat_template(messages, tokenize=False) == render(tok, used, messages, False)
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert eot in generation["eos_token_id"] and tok.eos_token_id in generation["eos_token_id"]

    capsys.readouterr()
    args = ["--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12"]
    for source, ckpt in ((run, ["--ckpt", "last"]), (tmp_path / "merged", [])):
        assert generate_command([str(source), *ckpt, *args]) == 0
        assert capsys.readouterr().out == "hello fox\n", source
