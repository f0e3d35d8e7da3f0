"""``finetune generate`` and ``finetune chat``: reproducible, equal to ``transformers`` where they should be, chat
context kept in the KV cache, speculative decoding invisible in the output, and clear errors."""

import ast
import io
import json
import re
import shutil
import signal
import time

import pytest
import torch
import transformers as T

from finetune import inference
from finetune.cli import chat_command, generate_command, quantize_command
from finetune.data.templates import CHATML, render
from finetune.export import export
from tests.export.test_export import train
from tests.tasks.helpers import cli_subprocess, cyclic_text, fit, recipe, write_jsonl

SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "once upon a time there was a little fox who lived in the forest",
    "the cat sat on the mat and looked at the moon. the dog ran after the ball",
    "user assistant hello how are you today? I am fine, thank you. what is your name?",
    "one two three four five six seven eight nine ten eleven twelve",
]


def tiny_llama(folder, *, seed: int = 0, layers: int = 2, hidden: int = 64, context: int = 256):
    """A random LLaMA with unit-scale weights (greedy outputs vary with the context) and a ChatML tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     pad_token="<pad>", chat_template=CHATML)  # fmt: skip
    fast.save_pretrained(folder)
    config = T.LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    code = generate_command(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------- generate
def test_seeded_sampling_is_reproducible(model_dir, capsys):
    args = [str(model_dir), "--prompt", "once upon a time", "--temperature", "1.0", "--max-new-tokens", "24"]
    first = run_generate(capsys, *args, "--seed", "3")
    again = run_generate(capsys, *args, "--seed", "3")
    other = run_generate(capsys, *args, "--seed", "4")
    assert first[0] == 0 and first == again
    assert first[1].startswith("once upon a time") and len(first[1]) > len("once upon a time\n")
    assert other[1] != first[1]


def test_greedy_equals_transformers_generate(model_dir, capsys):
    prompt = "the cat sat on the"
    code, out, _ = run_generate(capsys, str(model_dir), "--prompt", prompt, "--temperature", "0",
                                "--max-new-tokens", "20")  # fmt: skip
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    hf = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=1)
    assert code == 0 and out == prompt + tok.decode(ref[0, ids.size(1) :], skip_special_tokens=True) + "\n"


def test_stream_prints_the_same_text(model_dir, capsys):
    args = [str(model_dir), "--prompt", "hello how are", "--max-new-tokens", "30", "--seed", "1"]
    plain = run_generate(capsys, *args)
    streamed = run_generate(capsys, *args, "--stream")
    assert plain[0] == streamed[0] == 0 and plain[1] == streamed[1]


def test_prompts_jsonl_gives_one_output_per_row(model_dir, tmp_path, capsys):
    rows = [{"prompt": "once upon", "id": 7}, {"prompt": "the dog ran", "id": 8}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "o.jsonl"
    code, _, err = run_generate(capsys, str(model_dir), "--prompts", str(prompts), "--out", str(out), "--seed", "5")
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and "2 outputs" in err
    assert [(r["prompt"], r["id"]) for r in got] == [(r["prompt"], r["id"]) for r in rows]
    # each row is seeded alone: the same as generating it by itself
    single = run_generate(capsys, str(model_dir), "--prompt", "the dog ran", "--seed", "5")[1]
    assert single == "the dog ran" + got[1]["output"] + "\n"


@pytest.mark.parametrize("draft", ["same", "other"])
def test_speculative_greedy_equals_plain_greedy(model_dir, tmp_path, capsys, draft):
    draft_dir = model_dir if draft == "same" else tiny_llama(tmp_path / "draft", seed=1, layers=1)
    args = [str(model_dir), "--prompt", "one two three", "--temperature", "0", "--max-new-tokens", "25"]
    plain = run_generate(capsys, *args)
    code, out, err = run_generate(capsys, *args, "--draft", str(draft_dir))
    assert code == 0 and out == plain[1]
    rate = "(100.0%)" if draft == "same" else "draft tokens accepted"
    assert "speculative decoding:" in err and rate in err


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_run_folder_generates_as_its_merged_export(tmp_path, stand_in, capsys, backend):
    run = train(tmp_path, stand_in, "llama", "lora", backend=backend, steps=4)
    merged = export(run, tmp_path / "merged", format="merged", ckpt="last")
    capsys.readouterr()  # the fit's own output
    args = ["--prompt", "the quick brown", "--temperature", "0", "--max-new-tokens", "12"]
    from_run = run_generate(capsys, str(run), "--ckpt", "last", *args)
    from_export = run_generate(capsys, str(merged), *args)
    assert from_run[0] == 0 and from_run[1] == from_export[1]
    tok = T.AutoTokenizer.from_pretrained(merged)
    hf = T.AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = tok("the quick brown", return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    assert from_run[1] == "the quick brown" + tok.decode(ref[0, ids.size(1) :], skip_special_tokens=True) + "\n"


def text_run(tmp_path, stand_in, fmt: str = "text"):
    """A LoRA run on the gpt2 stand-in, whose tokenizer adds no BOS (BOS = EOS, as GPT-2's), trained on text
    documents; its fit prints a greedy sample of "the lazy dog"."""
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(16))
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(stand_in("gpt2")), "adapter": "lora", "lr": 1e-2,
                               "max_new_tokens": 8, "sample_prompt": "the lazy dog"},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": 4, "val_check_interval": 4},
    )  # fmt: skip
    fit(config)
    return tmp_path / "run"


def test_text_run_prompts_start_with_bos_as_its_documents_did(tmp_path, stand_in, capsys):
    """Training wrote each document as [bos] text [eos]; generate, and the sample after fit, prompt the run with
    [bos] text: its greedy answer is that of a plain forward over [bos] + ids, token by token (which here differs
    from the answer without the bos)."""
    run = text_run(tmp_path, stand_in)
    sample = ast.literal_eval(re.search(r"^sample: (.*)$", capsys.readouterr().out, re.M).group(1))  # its repr
    loaded = inference.load(run, ckpt="last")
    tok, prompt = loaded.tokenizer, "the lazy dog"
    ids = tok(prompt)["input_ids"]
    assert ids[0] != tok.bos_token_id and loaded.encode(prompt) == [tok.bos_token_id, *ids]
    code, out, _ = run_generate(capsys, str(run), "--ckpt", "last", "--prompt", prompt, "--temperature", "0",
                                "--max-new-tokens", "8")  # fmt: skip

    def greedy_forward(start: list[int]) -> str:
        x = torch.tensor([start])  # (1, T)
        with torch.no_grad():
            for _ in range(8):
                nxt = loaded.model(x)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                if nxt.item() in loaded.stop_ids:
                    break
                x = torch.cat([x, nxt], dim=1)
        return prompt + tok.decode(x[0, len(start) :].tolist(), skip_special_tokens=True)

    expected = greedy_forward([tok.bos_token_id, *ids])
    assert code == 0 and out == expected + "\n" and sample == expected
    assert greedy_forward(ids) != expected
    quantized = tmp_path / "int8"  # a quantized folder of the run keeps its prompts' start
    assert quantize_command([str(run), "--ckpt", "last", "--bits", "8", "--out", str(quantized)]) == 0
    assert inference.load(quantized).encode(prompt) == [tok.bos_token_id, *ids]


def test_exports_of_a_text_run_prompt_as_the_run_does(tmp_path, stand_in):
    """The merged export's tokenizer puts BOS first, as the run's documents started: plain ``transformers`` greedy
    decoding from the exported folder gives ``finetune generate``'s text on the run. The GGUF says
    ``add_bos_token``, so llama.cpp adds it too."""
    import gguf

    from finetune.export_gguf import export_gguf

    run = text_run(tmp_path, stand_in)
    loaded = inference.load(run, ckpt="last")
    prompt = "the lazy dog"
    export(run, tmp_path / "merged", format="merged", ckpt="last")
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == loaded.encode(prompt) == [tok.bos_token_id, *loaded.tokenizer(prompt)["input_ids"]]
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      pad_token_id=tok.eos_token_id, eos_token_id=None)  # fmt: skip
    ours = inference.complete(loaded, prompt, inference.Sampling(8, 0.0, None, None, 0))[0]
    assert tok.decode(out[0, ids.shape[1] :]) == ours
    export_gguf(run, tmp_path / "g", outtype="f32", ckpt="last")
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True


def test_runs_on_other_formats_and_chat_keep_the_tokenizers_start(tmp_path, stand_in):
    """Only a text-format run's prompts get the documents' BOS: the same run read as an instruction run, and a chat
    with the text run (its template's own start), encode as the tokenizer does."""
    run = text_run(tmp_path, stand_in)
    loaded = inference.load(run, ckpt="last")
    tok = loaded.tokenizer
    other = tmp_path / "instruction-run"
    shutil.copytree(run, other)
    config = (other / "config.yaml").read_text()
    assert "format: text" in config
    (other / "config.yaml").write_text(config.replace("format: text", "format: instruction"))
    assert inference.load(other, ckpt="last").encode("the quick") == tok("the quick")["input_ids"]
    messages = [{"role": "user", "content": "the quick"}]
    ids, _, _ = inference.chat_prompt(loaded, messages)
    rendered = render(tok, inference.chat_template_of(loaded), messages, True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"] and ids[0] != tok.bos_token_id


# ----------------------------------------------------------------------------------------------- chat
def chat(model_dir, **sampling):
    loaded = inference.load(model_dir)
    return loaded, inference.Chat(loaded, inference.Sampling(**{"temperature": 0.0, "max_new_tokens": 12, **sampling}))


def test_chat_second_answer_depends_on_the_first_turn(model_dir):
    answers = {}
    for first in ("hello how are you today?", "one two three four five"):
        _, c = chat(model_dir)
        c.say(first)
        answers[first] = c.say("what is your name?")
    assert len(set(answers.values())) == 2, answers


def test_chat_keeps_the_conversation_in_the_cache(model_dir):
    loaded, c = chat(model_dir)
    c.say("hello how are you today?")
    second = c.say("what is your name?")
    assert c.refed == 0  # ChatML is prefix-stable: the cache was extended, never rebuilt
    # The second answer is the greedy continuation of the whole conversation, run from scratch.
    from finetune.generation import generate

    tok = loaded.tokenizer
    prompt = render(tok, CHATML, c.messages[:-1], True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = generate(loaded.model, ids, max_new_tokens=12, eos_token_id=c.stop_ids)
    assert tok.decode(out[0, ids.size(1) :], skip_special_tokens=True) == second


def test_chat_turn_over_the_context_changes_nothing(tmp_path):
    short = tiny_llama(tmp_path / "short", context=128)
    _, c = chat(short, max_new_tokens=8)
    first = c.say("hello")
    with pytest.raises(ValueError, match="over the session.s max_len of 128"):
        c.say("one two three four five six seven eight nine ten eleven twelve " * 10)
    assert len(c.messages) == 2  # the failed turn is not part of the conversation
    _, fresh = chat(short, max_new_tokens=8)
    fresh.say("hello")
    assert first and c.say("hi") == fresh.say("hi")


def test_chat_command_reads_turns_from_stdin(model_dir, capsys):
    stdin = io.StringIO("hello how are you today?\n/reset\nwhat is your name?\n/exit\n")
    assert chat_command([str(model_dir), "--temperature", "0", "--max-new-tokens", "8"], stdin=stdin) == 0
    out = capsys.readouterr()
    assert "(conversation reset)" in out.err and len(out.out.splitlines()) == 2


# ----------------------------------------------------------------------------------------------- bad input
def test_prompt_longer_than_the_context_is_refused(tmp_path, capsys):
    model_dir = tiny_llama(tmp_path / "short", context=32)
    code, _, err = run_generate(capsys, str(model_dir), "--prompt", "one two three four five six " * 10)
    assert code == 2 and "context of 32" in err


def test_model_folder_without_a_tokenizer(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    T.AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(bare)
    code, _, err = run_generate(capsys, str(bare), "--prompt", "hi")
    assert code == 2 and f"{bare}: has no tokenizer" in err


@pytest.mark.parametrize(
    "content, message",
    [("not json\n", "line 1: not valid JSON"), ('{"prompt": "a"}\n{"text": "b"}\n', 'line 2: expected an object with '
     'a string "prompt"'), ("\n", "no prompts")],
)  # fmt: skip
def test_bad_prompts_file(model_dir, tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    out = tmp_path / "o.jsonl"
    code, _, err = run_generate(capsys, str(model_dir), "--prompts", str(prompts), "--out", str(out))
    assert code == 2 and f"{prompts}: {message}" in err and not out.exists()


def test_not_a_model_folder(tmp_path, capsys):
    code, _, err = run_generate(capsys, str(tmp_path), "--prompt", "hi")
    assert code == 2 and "neither a run folder (config.yaml) nor a Hugging Face model folder" in err
    code, _, err = run_generate(capsys, str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "no such folder" in err


def test_draft_with_another_tokenizer_is_refused(model_dir, stand_in, capsys):
    code, _, err = run_generate(capsys, str(model_dir), "--prompt", "hi", "--draft", str(stand_in("llama")))
    assert code == 2 and "its tokenizer differs from the target's" in err


def test_out_is_never_the_prompts_file_and_an_existing_out_needs_force(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n')
    args = [str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "3", "--temperature", "0"]
    link = tmp_path / "link.jsonl"
    link.symlink_to(prompts)
    for same in (prompts, link):  # the file itself, or a path to it (resolved)
        code, _, err = run_generate(capsys, *args, "--out", str(same), "--force")
        assert code == 2 and f"--out {same}: is the --prompts file {prompts}" in err
    assert prompts.read_text() == '{"prompt": "the cat"}\n'

    out = tmp_path / "o.jsonl"
    out.write_text("mine\n")
    code, _, err = run_generate(capsys, *args, "--out", str(out))
    assert code == 2 and f"--out {out}: exists (pass --force to replace it)" in err
    assert out.read_text() == "mine\n"
    assert run_generate(capsys, *args, "--out", str(out), "--force")[0] == 0
    assert json.loads(out.read_text())["prompt"] == "the cat" and "output" in json.loads(out.read_text())


# ----------------------------------------------------------------------------------- generation_config.json
@pytest.mark.parametrize(
    "config, expected",
    [
        ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {"temperature": 0.6, "top_k": 50, "top_p": 0.9}),
        ({"do_sample": True, "top_k": 0, "top_p": 1.0}, {"temperature": 1.0, "top_k": None, "top_p": None}),
        ({"do_sample": False, "temperature": 0.7, "max_new_tokens": 9}, {"temperature": 0.0, "max_new_tokens": 9}),
        ({"bos_token_id": 0, "eos_token_id": 0}, {}),  # GPT-2's: special tokens only
        ({"temperature": 0.5}, {"temperature": 0.5}),
    ],
)
def test_generation_defaults_read_generation_config_as_transformers_does(tmp_path, config, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert inference.generation_defaults(tmp_path) == expected
    assert inference.generation_defaults(tmp_path / "none") == {}


def test_a_broken_generation_config_is_named(tmp_path):
    (tmp_path / "generation_config.json").write_text("{do_sample: true")
    with pytest.raises(ValueError, match=r"generation_config.json: not valid JSON"):
        inference.generation_defaults(tmp_path)


def with_generation_config(model_dir, tmp_path, config: dict):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_generate_defaults_to_the_models_generation_config(model_dir, tmp_path, capsys):
    folder = with_generation_config(model_dir, tmp_path, {"do_sample": False, "max_new_tokens": 7, "eos_token_id": 0})
    prompt = "the cat sat on the"
    code, out, _ = run_generate(capsys, str(folder), "--prompt", prompt)  # no sampling flags
    tok = T.AutoTokenizer.from_pretrained(folder)
    hf = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = hf.generate(ids, pad_token_id=1)  # transformers reads the same generation_config.json: greedy, 7 tokens
    assert ref.size(1) - ids.size(1) == 7
    assert code == 0 and out == prompt + tok.decode(ref[0, ids.size(1) :], skip_special_tokens=True) + "\n"
    code, short, _ = run_generate(capsys, str(folder), "--prompt", prompt, "--max-new-tokens", "2")  # a flag wins
    assert (
        code == 0
        and short == prompt + tok.decode(ref[0, ids.size(1) : ids.size(1) + 2], skip_special_tokens=True) + "\n"
    )


def test_generate_samples_with_the_models_settings(model_dir, tmp_path, capsys):
    folder = with_generation_config(model_dir, tmp_path, {"do_sample": True, "temperature": 1.3, "top_k": 7})
    args = ["--prompt", "once upon a time", "--max-new-tokens", "16", "--seed", "2"]
    from_file = run_generate(capsys, str(folder), *args)
    from_flags = run_generate(capsys, str(model_dir), *args, "--temperature", "1.3", "--top-k", "7")
    assert from_file[0] == 0 and from_file[1] == from_flags[1]
    assert run_generate(capsys, str(model_dir), *args)[1] != from_file[1]  # today's defaults: 0.8, top-k 50


def test_a_run_takes_the_generation_config_of_its_base_folder(tmp_path, stand_in):
    import shutil

    base = shutil.copytree(stand_in("llama"), tmp_path / "base")
    (base / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 5}))
    run = train(tmp_path, lambda arch: base, "llama", None, steps=1)
    assert inference.load(run, ckpt="last").generation == {"temperature": 0.0, "max_new_tokens": 5}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_generate_out_leaves_nothing_and_a_killed_ones_leftover_goes_next_time(model_dir, tmp_path, sig):
    """``generate --out`` writes rows into a temporary file beside the output as they come: SIGTERM or ^C removes
    it; the leftover of a SIGKILLed run is removed by the next run into the same output."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(400)))
    command = ["generate", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "32"]

    def stopped_while_writing(how) -> int:
        proc = cli_subprocess(*command)
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.jsonl.tmp-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be stopped"
        proc.send_signal(how)
        return proc.wait(timeout=60)

    assert stopped_while_writing(sig) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # no output, no temporary file
    assert stopped_while_writing(signal.SIGKILL) == -signal.SIGKILL
    (leftover,) = tmp_path.glob(".out.jsonl.tmp-*")
    prompts.write_text(json.dumps({"prompt": "row 0"}) + "\n")
    assert generate_command(command[1:]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "p.jsonl"]
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["row 0"]
