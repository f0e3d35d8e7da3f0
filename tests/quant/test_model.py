"""Quantized models: close to the full-precision model (logits, greedy tokens), and the ``finetune quantize``
folder reloads to the same model with no re-quantization."""

import copy
import json

import pytest
import torch

from finetune.cli import generate_command, quantize_command
from finetune.generation import generate
from finetune.quant import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from tests.quant.helpers import V, next_token, one_thread, trained
from tests.test_inference import tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return {kind: trained(kind) for kind in ("llama", "gpt2")}


def held_out(n: int = 4, length: int = 24) -> torch.Tensor:
    """Sequences of the trained "language" the model did not see: (n, length)."""
    x = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(11))
    for _ in range(length - 1):
        x = torch.cat([x, next_token(x[:, -1:])], 1)
    return x


def prompts() -> torch.Tensor:
    return torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(7))  # (B, T)


# (config, max |logit error| relative to the logits' spread, share of greedy next tokens that must agree)
LEVELS = [(QuantConfig(8), 0.02, 0.97), (QuantConfig(4, 32), 0.1, 0.9), (QuantConfig(4, 128), 0.15, 0.85),
          (QuantConfig(8, head=True), 0.03, 0.97)]  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config, logit_tol, agree", LEVELS, ids=lambda c: getattr(c, "name", None))
def test_quantized_model_is_close_to_full_precision(models, kind, config, logit_tol, agree):
    full = models[kind]
    quant = quantize_model(copy.deepcopy(full), config)
    n_quant = sum(isinstance(m, QuantLinear) for m in quant.modules())
    assert n_quant == 2 * (7 if kind == "llama" else 4) + config.head
    x = held_out()
    with torch.no_grad():
        ref, got = full(x), quant(x)  # (B, T, V)
    spread = (ref.amax(-1) - ref.amin(-1)).mean()
    assert (got - ref).abs().max() <= logit_tol * spread
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= agree  # the greedy choice at every position


@pytest.mark.parametrize("config", [QuantConfig(8), QuantConfig(4, 64), QuantConfig(4, 32, head=True)],
                         ids=lambda c: c.name + (" head" if c.head else ""))  # fmt: skip
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_folder_reloads_the_same_model(models, kind, config, tmp_path):
    quant = quantize_model(copy.deepcopy(models[kind]), config)
    save_quantized(quant, tmp_path / "q")
    back, info = load_quantized(tmp_path / "q")
    assert info["bits"] == config.bits and info["modules"] == quant.quantized_names
    for (name, a), (_, b) in zip(quant.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = prompts()
    assert torch.equal(generate(back, ids, max_new_tokens=16), generate(quant, ids, max_new_tokens=16))
    if config.bits == 4:  # two 4-bit values a byte on disk
        from safetensors import safe_open

        with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
            packed = f.get_tensor("layers.0.mlp.up_proj.qweight" if kind == "llama" else "layers.0.mlp.c_fc.qweight")
        assert packed.dtype == torch.uint8 and packed.size(1) * 2 == quant.layers[0].mlp._modules[
            "up_proj" if kind == "llama" else "c_fc"].in_features  # fmt: skip


def test_quantize_command_folder_generates_like_quantize_flag(tmp_path, capsys):
    """``finetune quantize`` then ``generate DIR`` gives what ``generate MODEL --quantize int4`` gives."""
    model = tiny_llama(tmp_path / "m")
    assert quantize_command([str(model), "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q")]) == 0
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert info["bits"] == 4 and info["group_size"] == 32 and info["symmetric"] is False
    args = ["--prompt", "once upon a time", "--temperature", "0", "--max-new-tokens", "12"]
    capsys.readouterr()
    assert generate_command([str(tmp_path / "q"), *args]) == 0
    from_folder = capsys.readouterr().out
    assert generate_command([str(model), *args, "--quantize", "int4", "--group-size", "32"]) == 0
    assert capsys.readouterr().out == from_folder and from_folder.startswith("once upon a time")


def test_bad_quantize_requests_are_refused(tmp_path, capsys):
    model = tiny_llama(tmp_path / "m")
    assert generate_command([str(model), "--prompt", "x", "--quantize", "int8", "--group-size", "32"]) == 2
    assert "--group-size: int8 has one scale per output channel" in capsys.readouterr().err
    assert quantize_command([str(model), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    assert generate_command([str(tmp_path / "q"), "--prompt", "x", "--quantize", "int4"]) == 2
    assert "already quantized (int8)" in capsys.readouterr().err
    assert quantize_command([str(model), "--bits", "4", "--out", str(tmp_path / "q")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="group size must be a positive integer"):
        QuantConfig(4, 0)
    from finetune.models.hub import from_config

    t5 = from_config(dict(model_type="t5", vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="for decoder-only language models, not T5"):
        quantize_model(t5, QuantConfig(8))


def test_damaged_folder_is_named(models, tmp_path):
    quant = quantize_model(copy.deepcopy(models["llama"]), QuantConfig(8))
    save_quantized(quant, tmp_path / "q")
    info_file = tmp_path / "q" / "quantization.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "modules": [*info["modules"], "layers.0.attn.nope"]}))
    with pytest.raises(ValueError, match=r"quantization.json: module 'layers.0.attn.nope' is not in a llama model"):
        load_quantized(tmp_path / "q")
    info_file.write_text(json.dumps({**info, "bits": 4}))
    with pytest.raises(
        ValueError, match=r"model.safetensors: layers\.0\.attn\.k_proj\.scale has shape \(32, 1\), expected \(32, 2\)"
    ):
        load_quantized(tmp_path / "q")
    info_file.write_text("{")
    with pytest.raises(ValueError, match="quantization.json: cannot read the quantization config"):
        load_quantized(tmp_path / "q")
