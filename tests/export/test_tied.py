"""Training one side of a tied embedding/head pair (``modules_to_save`` on the embedding or the head, LoRA on the
embedding) leaves the trained model with two different matrices: the merged export and ``inference.load`` must
compute what the trained model computes (the pair written untied), on both backends and both tied families."""

import json

import pytest
import torch
import transformers as T

from finetune import inference
from finetune.export import export
from tests.conftest import LLAMA, make_tokenizer
from tests.export.test_export import batch, compare, toolkit_logits
from tests.tasks.helpers import cyclic_text, fit, recipe, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# arch -> (embedding, other linear target), HF leaf names
NAMES = {"gpt2": ("wte", "c_attn"), "llama": ("embed_tokens", "q_proj")}
SETUPS = {
    "save-embedding": lambda emb, lin: {"preset": "lora", "target_modules": [lin], "modules_to_save": [emb]},
    "save-head": lambda emb, lin: {"preset": "lora", "target_modules": [lin], "modules_to_save": ["lm_head"]},
    "lora-embedding": lambda emb, lin: {"preset": "lora", "target_modules": [emb, lin]},
}


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, stand_in):
    """arch -> a tiny tied checkpoint: GPT-2 (tied always) and LLaMA with tie_word_embeddings as Llama-3.2-1B."""
    cache = {}

    def get(arch: str):
        if arch == "gpt2":
            return stand_in("gpt2")
        if arch not in cache:
            folder = tmp_path_factory.mktemp("llama-tied")
            make_tokenizer(folder, "llama")
            torch.manual_seed(0)
            config = T.LlamaConfig(**{**LLAMA, "vocab_size": 320}, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
            T.LlamaForCausalLM(config).save_pretrained(folder)
            cache[arch] = folder
        return cache[arch]

    return get


def _train(tmp_path, base, adapter, backend: str):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(16))
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(base), "backend": backend, "adapter": adapter, "lr": 3e-2},
        {"format": "text", "train_files": data, "batch_size": 4, "max_length": 32}, trainer={"max_steps": 3},
    )  # fmt: skip
    fit(config)
    return tmp_path / "run"


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("arch", list(NAMES))
@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_merged_export_of_a_trained_tied_side_has_the_trained_logits(tmp_path, tied_base, backend, arch, setup):
    run = _train(tmp_path, tied_base(arch), SETUPS[setup](*NAMES[arch]), backend)
    b = batch(arch)
    expected = toolkit_logits(run, arch, b)  # the trained task model
    out = export(run, tmp_path / "merged", format="merged", ckpt="last")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = T.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        compare(expected, merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, arch, b)
        loaded = inference.load(run, ckpt="last")
        compare(expected, loaded.model(b["input_ids"], attention_mask=b["attention_mask"]), arch, b)
    # the trained model really has two matrices: the base's tied head would give other logits
    base = T.AutoModelForCausalLM.from_pretrained(tied_base(arch)).eval()
    untrained_side = base.get_output_embeddings() if setup != "save-head" else base.get_input_embeddings()
    side = merged.get_output_embeddings() if setup != "save-head" else merged.get_input_embeddings()
    torch.testing.assert_close(side.weight, untrained_side.weight)  # the untrained side is the base's matrix


def test_a_full_fine_tune_of_a_tied_model_stays_tied(tmp_path, tied_base):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(8))
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(tied_base("llama")), "lr": 1e-2},
        {"format": "text", "train_files": data, "batch_size": 4, "max_length": 32}, trainer={"max_steps": 1},
    )  # fmt: skip
    fit(config)
    out = export(tmp_path / "run", tmp_path / "merged", format="merged", ckpt="last")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
