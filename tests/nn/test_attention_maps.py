"""Attention maps: the explicit softmax path gives SDPA's outputs (blocks and whole models), its rows are
distributions with zeros above the diagonal where attention is causal, and ``finetune attention`` writes them."""

import numpy as np
import pytest
import torch

from finetune.attention_maps import attention_layers, attention_maps, keeping_weights
from finetune.cli import attention_command
from finetune.models.hub import from_hf
from finetune.nn import Attention, build_mask


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("kind", ["causal", "padded", "additive", "none"])
def test_explicit_block_equals_sdpa(n_kv, kind):
    torch.manual_seed(0)
    attn = Attention(dim=32, n_heads=4, n_kv_heads=n_kv).eval()
    x = torch.randn(2, 7, 32)  # (B, T, C)
    mask, is_causal = None, False
    if kind == "causal":
        mask, is_causal = build_mask(q_len=7, k_len=7, causal=True)
    elif kind == "padded":
        pad = torch.ones(2, 7, dtype=torch.long)
        pad[1, :3] = 0
        mask, is_causal = build_mask(q_len=7, k_len=7, padding_mask=pad, causal=True)
    elif kind == "additive":
        mask = torch.randn(1, 4, 7, 7)  # a position bias, as T5 adds
    ref = attn(x, mask=mask, is_causal=is_causal)
    attn.keep_weights = True
    got = attn(x, mask=mask, is_causal=is_causal)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    w = attn.weights  # (B, H, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))
    if kind == "causal":
        assert (w.triu(1) == 0).all()
    if kind == "padded":  # real queries: causal, and never on row 1's 3 padding keys (padding queries see all)
        assert (w[0].triu(1) == 0).all() and (w[1, :, 3:, 3:].triu(1) == 0).all()
        assert (w[1, :, 3:, :3] == 0).all()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "bert-mlm"])
def test_model_outputs_and_maps(hf_folder, name):
    """Our maps equal transformers' eager attention weights, and recording them leaves the outputs unchanged."""
    import transformers as T

    _, folder = hf_folder(name)
    cls = T.AutoModelForMaskedLM if name.startswith("bert") else T.AutoModelForCausalLM
    hf = cls.from_pretrained(folder, attn_implementation="eager").eval()
    model = from_hf(folder).eval()
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = lambda out: out if isinstance(out, torch.Tensor) else out.logits  # noqa: E731  (BERT: BertOutput)
    with torch.no_grad():
        ref = logits(model(ids))
    maps = attention_maps(model, ids)
    with torch.no_grad():
        assert torch.equal(logits(model(ids)), ref)  # the switch is off again
        with keeping_weights(attention_layers(model)):  # the whole model through the explicit path: SDPA's logits
            torch.testing.assert_close(logits(model(ids)), ref, rtol=1e-5, atol=1e-5)
    assert sorted(maps) == [0, 1] and maps[0].shape == (4, 9, 9)
    for w in maps.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 9))
        if name != "bert-mlm":
            assert (w.triu(1) == 0).all()
        else:
            assert (w.triu(1) > 0).any()  # bidirectional
    with torch.no_grad():
        reference = hf(ids, output_attentions=True).attentions  # per layer (1, H, T, T)
    for i, w in maps.items():
        torch.testing.assert_close(w, reference[i][0], rtol=1e-4, atol=1e-5)


def test_attention_command_writes_pngs_and_npz(tmp_path, capsys):
    from PIL import Image

    from tests.test_inference import tiny_llama

    model = tiny_llama(tmp_path / "m")
    out = tmp_path / "maps"
    assert attention_command([str(model), "--prompt", "the cat sat on the mat", "--layers", "1", "--out",
                              str(out)]) == 0  # fmt: skip
    data = np.load(out / "attention.npz")
    T = len(data["input_ids"])
    assert data["layer_1"].shape == (4, T, T) and "layer_0" not in data and len(data["tokens"]) == T
    np.testing.assert_allclose(data["layer_1"].sum(-1), 1.0, rtol=1e-5)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["attention.npz", "layer_1.png"]
    assert Image.open(out / "layer_1.png").format == "PNG"
    assert attention_command([str(model), "--prompt", "x", "--layers", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "--layers [5]: the model has layers 0..1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
