"""Adapter runs checkpoint only what trains (plus a reference to the base) and resume exactly."""

import pytest
import torch
import transformers as T

from finetune.cli import FinetuneCLI
from tests.conftest import make_tokenizer
from tests.tasks.helpers import cyclic_text, fit, logged, recipe, weights, write_jsonl
from tests.tasks.test_resume import StopAt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A LLaMA of ~3M parameters (12 MB in fp32), big enough that a LoRA checkpoint is a small fraction of it."""
    folder = tmp_path_factory.mktemp("llama-3m")
    make_tokenizer(folder, "llama")
    config = T.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _recipe(tmp_path, base, name: str, backend: str = "scratch") -> str:
    folder = tmp_path / name
    folder.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(48, length=10))
    return recipe(
        folder, "CausalLM",
        {"pretrained": str(base), "backend": backend, "adapter": "lora", "lr": 1e-2, "warmup": 2},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": N, "val_check_interval": 4, "limit_val_batches": 2},
        last_checkpoint={"every_n_train_steps": 2},
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_lora_checkpoint_is_small_and_holds_only_trained_weights(tmp_path, base, backend):
    fit(_recipe(tmp_path, base, "run", backend))
    ckpt = tmp_path / "run/run/checkpoints/last.ckpt"
    base_bytes = (base / "model.safetensors").stat().st_size
    assert ckpt.stat().st_size < 0.05 * base_bytes, (ckpt.stat().st_size, base_bytes)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["base"] == {"pretrained": str(base), "backend": backend}
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])
    # every trained tensor has Adam state; nothing else does
    (opt,) = saved["optimizer_states"]
    assert len(opt["state"]) == len(saved["state_dict"])


def test_lora_run_resumes_to_the_same_weights(tmp_path, base):
    fit(_recipe(tmp_path, base, "straight"))
    split = _recipe(tmp_path, base, "split")
    cli = FinetuneCLI(args=["--config", split], run=False)
    cli.trainer.callbacks.append(StopAt(N // 2))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit(split, "--ckpt_path", "last")
    a, b = (weights(tmp_path / f"{n}/run/checkpoints/last.ckpt") for n in ("straight", "split"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    la, lb = (logged(tmp_path / f"{n}/run", "train/loss_step") for n in ("straight", "split"))
    assert sorted(la) == list(range(N)) and la == pytest.approx(lb, abs=1e-6)


def test_a_checkpoint_of_another_adapter_is_refused(tmp_path, base):
    config = _recipe(tmp_path, base, "run")
    fit(config, "--trainer.max_steps=2")
    with pytest.raises(ValueError, match="trained weights do not match this model's adapter: missing .*lora"):
        fit(config, "--ckpt_path", "last", "--model.adapter=ia3", "--trainer.max_steps=4")
