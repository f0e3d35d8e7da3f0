"""``finetune export --format gguf``: the file read back with the ``gguf`` reader, and loaded by ``transformers``
(``gguf_file=``) to our model's logits and token ids, for LLaMA and GPT-2, from HF folders and from runs of both
backends; the Ollama Modelfile; refusals that leave nothing behind."""

import copy

import gguf  # in the dev extra: a missing package fails here rather than skipping
import numpy as np
import pytest
import torch
import transformers as T

from finetune import inference
from finetune.cli import export_command
from finetune.export_gguf import encode_tensor, modelfile
from tests.export.test_export import toolkit_logits, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXT = "the quick brown fox jumps over the lazy dog"


def export_cli(model, out, outtype: str, *extra: str) -> None:
    assert export_command([str(model), "--format", "gguf", "--outtype", outtype, "--out", str(out), *extra]) == 0


def as_stored(model, outtype: str):
    """Our model with every weight replaced by what the GGUF holds, decoded by the ``gguf`` package itself."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            data, qtype = encode_tensor(p, outtype)
            back = gguf.quants.dequantize(data, qtype) if qtype.name not in ("F32", "F16") else data
            p.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(p.shape)))
    return ref


@pytest.fixture(scope="module")
def loadable(stand_in, tmp_path_factory):
    """``loadable(arch)``: a stand-in folder transformers' GGUF loader reads back whole. Its GPT-2 mapping puts
    ``gpt2.context_length`` into ``n_ctx``, which GPT2Config no longer reads, so a GPT-2 is rebuilt with 1024
    positions (its default) whatever the file says; the GPT-2 stand-in is therefore given 1024."""
    from tests.conftest import GPT2, make_tokenizer

    folder = tmp_path_factory.mktemp("gpt2-1024")
    make_tokenizer(folder, "gpt")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(**{**GPT2, "vocab_size": 320, "n_positions": 1024})).save_pretrained(folder)
    return lambda arch: folder if arch == "gpt2" else stand_in(arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_transformers_loads_the_gguf_to_our_logits(loadable, arch, outtype, tmp_path):
    folder = loadable(arch)
    export_cli(folder, tmp_path / "g", outtype)
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf").eval()
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    loaded = inference.load(folder)
    ids = loaded.encode(TEXT)
    assert tok(TEXT)["input_ids"] == ids  # the same ids, special tokens included
    x = torch.tensor([ids])
    with torch.no_grad():
        got, ours = hf(x).logits, loaded.model(x)
        stored = as_stored(loaded.model, outtype)(x)  # the weights as the file holds them
    torch.testing.assert_close(got, stored, rtol=1e-4, atol=1e-5)
    if outtype == "f32":
        torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-6)
    bound = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 0.2}[outtype]  # of the logits' spread
    assert (got - ours).abs().max() <= bound * (ours.amax() - ours.amin())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reader_sees_tensors_shapes_and_metadata(stand_in, arch, tmp_path):
    folder = stand_in(arch)
    export_cli(folder, tmp_path / "g", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    model = inference.load(folder).model
    c = model.config
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in reader.tensors}
    assert field("general.architecture") == arch
    if arch == "llama":
        assert field("llama.context_length") == c.max_position_embeddings == 64
        assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
        assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
        assert field("llama.rope.freq_base") == pytest.approx(c.rope_theta)
        assert field("llama.rope.dimension_count") == c.head_dim
        assert tensors["blk.0.attn_k.weight"] == ("Q8_0", (32, 16))  # GGUF shapes are (in, out)
        assert tensors["blk.1.ffn_gate.weight"] == ("Q8_0", (32, 64)) and "output.weight" in tensors
        assert field("tokenizer.ggml.add_bos_token") is True
    else:
        assert field("gpt2.context_length") == 64 and field("gpt2.attention.head_count") == 4
        assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(c.layer_norm_epsilon)
        assert tensors["blk.0.attn_qkv.weight"] == ("Q8_0", (32, 96)) and tensors["blk.0.attn_qkv.bias"][0] == "F32"
        assert tensors["position_embd.weight"] == ("Q8_0", (32, 64))
        assert "output.weight" not in tensors  # tied: loaders share the embedding
    assert len(tensors) == len(dict(model.named_parameters()))
    tok = inference.load(folder).tokenizer
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == c.vocab_size
    assert field("tokenizer.ggml.tokens")[5] == tok.convert_ids_to_tokens(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in _merges(tok)]
    assert field("tokenizer.ggml.merges") == merges and len(merges) > 10
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id


def _merges(tok) -> list:
    import json

    return json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]


def test_chat_model_gets_template_and_stops(tmp_path):
    from tests.test_inference import tiny_llama

    model = tiny_llama(tmp_path / "m")
    export_cli(model, tmp_path / "g", "f16")
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    from finetune.data.templates import CHATML

    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert (
        'TEMPLATE """{{- range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    ) in text
    assert '{{ end }}{{ end }}<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text


def test_tensors_are_streamed_to_the_file(tmp_path):
    """The writer encodes and writes one tensor at a time: the Python/numpy memory it holds at its peak (traced by
    ``tracemalloc``, which sees numpy's buffers) stays far below the encoded tensors' total, which a writer that
    keeps them all until the end needs; the file still reads back whole and exact."""
    import tracemalloc

    from finetune.export_gguf import write_gguf
    from tests.conftest import LLAMA, make_tokenizer

    folder = tmp_path / "m"
    make_tokenizer(folder, "llama")
    torch.manual_seed(0)
    config = {**LLAMA, "vocab_size": 320, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
    T.LlamaForCausalLM(T.LlamaConfig(**config)).save_pretrained(folder)
    loaded = inference.load(folder)
    total = sum(encode_tensor(p, "q8_0")[0].nbytes for p in loaded.model.parameters())
    largest = max(encode_tensor(p, "q8_0")[0].nbytes for p in loaded.model.parameters())
    tracemalloc.start()
    try:
        write_gguf(loaded, tmp_path / "g", outtype="q8_0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 3 and largest < total / 10, (peak, largest, total)
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    stored = {t.name: t for t in reader.tensors}
    up = loaded.model.layers[3].mlp.up_proj.weight
    assert stored["blk.3.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert np.array_equal(np.asarray(stored["blk.3.ffn_up.weight"].data).reshape(-1),
                          encode_tensor(up, "q8_0")[0].reshape(-1))  # fmt: skip


LLAMA3 = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
          "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")  # fmt: skip
ZEPHYR = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # fmt: skip


def test_other_chat_templates_become_ollama_templates(tokenizer_folder):
    """Templates other than ChatML are decomposed by rendering them (Llama 3's, Zephyr's): the Go template writes
    each role's header and end-of-turn around the content, then the generation prompt; Llama 3's BOS is left to
    llama.cpp (add_bos_token). A template that injects text of its own into the system turn keeps the comment."""
    from finetune.export_gguf import go_template, turn_pieces

    tok = T.AutoTokenizer.from_pretrained(tokenizer_folder("llama"))
    pieces = turn_pieces(tok, LLAMA3)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert pieces["head"] == tok.bos_token and pieces["prompt"] == header.format("assistant")
    assert all(pieces[r] == (header.format(r), "<|eot_id|>") for r in ("system", "user", "assistant"))
    assert go_template(pieces, tok.bos_token) == (
        '{{- range .Messages }}{{ if eq .Role "system" }}<|start_header_id|>system<|end_header_id|>\n\n{{ .Content }}'
        '<|eot_id|>{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        "{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    text = modelfile(ZEPHYR, ["</s>"], tokenizer=tok)
    assert '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}</s>\n' in text and text.count("TEMPLATE") == 1
    dated = LLAMA3.replace("{{ message['content'] | trim }}", "{{ message['content'] | trim }}"
                           "{% if message['role'] == 'system' %}\nToday Date: 01 Dec{% endif %}")  # fmt: skip
    assert turn_pieces(tok, dated.replace("{% for", "{{ 'Cutting Knowledge' if messages[0]['role'] != 'system' }}"
                                          "{% for")) is None  # fmt: skip


def test_modelfile_without_a_known_template():
    text = modelfile("{{ messages }}", ["</s>", "</s>", 'a"b'])
    assert "TEMPLATE" not in text.replace("# TEMPLATE", "") and text.count('PARAMETER stop "</s>"') == 1
    assert 'PARAMETER stop "a\\"b"' in text


@pytest.mark.slow
@pytest.mark.parametrize("arch, backend", [("gpt2", "scratch"), ("llama", "hf")])
def test_runs_of_both_backends(stand_in, loadable, arch, backend, tmp_path):
    """A trained run (LoRA merged in memory) as GGUF: transformers' logits are the run's."""
    run = train(tmp_path, loadable, arch, "lora", backend=backend, steps=2)
    export_cli(run, tmp_path / "g", "f32", "--ckpt", "last")
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf").eval()
    ids = torch.tensor([[5, 9, 33, 70, 11, 4, 200]])
    with torch.no_grad():
        got = hf(ids).logits
    want = toolkit_logits(run, arch, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_refusals_leave_nothing(stand_in, tmp_path, capsys):
    out = tmp_path / "g"
    assert export_command([str(stand_in("bert")), "--format", "gguf", "--out", str(out)]) == 2
    assert "no llama.cpp architecture for model type 'bert'" in capsys.readouterr().err and not out.exists()
    model = tmp_path / "wordpiece"
    import shutil

    shutil.copytree(stand_in("llama"), model)
    for f in model.glob("tok*"):
        f.unlink()
    T.BertTokenizerFast(vocab_file=None, tokenizer_object=_wordpiece()).save_pretrained(model)
    assert export_command([str(model), "--format", "gguf", "--out", str(out)]) == 2
    assert "only byte-level BPE tokenizers are written" in capsys.readouterr().err and not out.exists()
    assert export_command([str(stand_in("llama")), "--format", "merged", "--outtype", "q8_0", "--out", str(out)]) == 2
    assert "--outtype: only with --format gguf" in capsys.readouterr().err
    from finetune.cli import quantize_command

    assert quantize_command([str(stand_in("llama")), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    assert export_command([str(tmp_path / "q"), "--format", "gguf", "--out", str(out)]) == 2
    assert "export the full-precision model" in capsys.readouterr().err and not out.exists()


def _wordpiece():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok
