"""Adapter presets: loading, overrides, peft configs, and targets named as in Hugging Face on both backends."""

import pytest
import torch
import transformers as T
import yaml

from finetune.adapters import inject, load_spec, presets
from finetune.models import from_hf
from finetune.quantize import nbytes
from tests.conftest import STAND_INS
from tests.tasks.helpers import cyclic_text, fit, recipe, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BUNDLED = ["dora", "ia3", "lora", "lora-all-linear", "qlora", "rslora"]


def test_bundled_presets_load_into_peft_configs():
    assert sorted(presets()) == BUNDLED
    lora, dora, rs, ia3, q = (load_spec(n) for n in ("lora", "dora", "rslora", "ia3", "qlora"))
    assert lora.peft_config().r == 8 and lora.fields["target_modules"] is None
    assert dora.peft_config().use_dora and rs.peft_config().use_rslora
    assert type(ia3.peft_config()).__name__ == "IA3Config"
    assert q.quantize == "nf4" and q.fields["target_modules"] == "all-linear"


def test_overrides_replace_preset_fields_and_a_path_works(tmp_path):
    spec = load_spec({"preset": "lora", "r": 16, "target_modules": ["q_proj"]})
    assert spec.fields["r"] == 16 and spec.fields["lora_alpha"] == 16 and spec.fields["target_modules"] == ["q_proj"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"method": "lora", "r": 2, "target_modules": "all-linear"}))
    assert load_spec(str(mine)).fields["r"] == 2


@pytest.mark.parametrize(
    "adapter, message",
    [
        (
            {"preset": "lora", "rr": 4},
            r"model.adapter: unknown field\(s\) \['rr'\] for lora \(LoraConfig\); known: .*'r'",
        ),
        ({"method": "loha"}, r"`method` must be one of \['lora', 'dora', 'rslora', 'ia3'\], got 'loha'"),
        ({"preset": "lora", "quantize": "int3"}, r"`quantize` must be one of \[None, 'nf4'\], got 'int3'"),
        ({"preset": "nope"}, r"'nope' is not a preset file nor a bundled preset \['dora', 'ia3'"),
    ],
)
def test_bad_presets_fail_clearly(adapter, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_spec(adapter)


def test_an_unknown_field_in_a_preset_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nr: 4\nalpha: 8\n")
    with pytest.raises(ValueError, match=rf"{bad}: unknown field\(s\) \['alpha'\] for lora"):
        load_spec(str(bad))


def _pair(stand_in, arch):
    folder = stand_in(arch)
    return from_hf(folder), STAND_INS[arch][2].from_pretrained(folder)


TARGETS = [None, "all-linear", ["c_proj", "o_proj", "o", "output.dense"]]  # None: peft's default per model type


@pytest.mark.parametrize(
    "arch, targets", [(a, t) for a in ("gpt2", "llama", "bert", "t5") for t in TARGETS] + [("bert", ["dense"])]
)
def test_targets_match_the_same_hf_modules_on_both_backends(stand_in, arch, targets):
    """Our module names differ from HF's (``layers.0.attn`` vs ``model.layers.0.self_attn``; BERT's MLP leaves),
    but an adapter adapts the same layers, named as in HF, with the same number of trained weights."""
    spec = load_spec({"method": "lora", "r": 2, "target_modules": targets})
    ours, hf = _pair(stand_in, arch)
    try:
        ours = inject(ours, spec, model_type=arch, heads=[])
    except ValueError as e:  # some families lack the name: then HF must lack it too
        with pytest.raises(ValueError, match="not found in the base model"):
            inject(hf, spec, model_type=arch, heads=[])
        assert "not found in the base model" in str(e)
        return
    hf = inject(hf, spec, model_type=arch, heads=[])
    assert sorted(ours.adapter_resolved.targets.values()) == sorted(hf.adapter_resolved.targets.values())
    trained = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trained(ours) == trained(hf) > 0
    if arch == "bert" and targets == ["dense"]:  # attention output, intermediate, output; the MLM transform
        assert len(ours.adapter_resolved.targets) == 2 * 3 + 1


def test_wrong_target_names_list_the_modules_that_exist(stand_in):
    spec = load_spec({"preset": "lora", "target_modules": ["q_prj"]})
    model, _ = _pair(stand_in, "llama")
    with pytest.raises(
        ValueError, match=r"Target modules \['q_prj'\] not found in the base model.*'down_proj'.*'q_proj'"
    ):
        inject(model, spec, model_type="llama", heads=[])


def test_qlora_stores_the_base_in_nf4(stand_in):
    """Linear weights of the base (not the head) become frozen 4-bit NF4 layers; LoRA trains on top."""
    model, _ = _pair(stand_in, "llama")
    model = inject(model, load_spec("qlora"), model_type="llama", heads=[])
    for name in ("layers.0.attn.q_proj", "layers.1.mlp.down_proj"):
        base = model.get_submodule(name).get_base_layer()
        assert type(base).__name__ == "Linear4bit" and base.weight.dtype == torch.uint8
    assert type(model.lm_head) is torch.nn.Linear and not model.lm_head.weight.requires_grad


def test_nf4_bytes_are_a_quarter_of_bf16_plus_scales():
    from finetune.quantize import quantize_nf4

    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 1024, bias=False))
    bf16 = sum(m.weight.numel() * 2 for m in model)
    quantize_nf4(model, ["0", "1"])
    # 4 bits per weight + 8-bit scales per 64 weights (+ their fp32 scales per 256 blocks and the code tables)
    assert 0.25 < nbytes(model) / bf16 < 0.26


def test_classification_heads_and_missing_modules_train_beside_the_adapter(tmp_path, stand_in):
    """BERT from an MLM checkpoint lacks the classifier and the pooler: both train (modules_to_save)."""
    rows = [{"text": f"{w} one", "label": w} for w in ("good", "bad")] * 4
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = recipe(
        tmp_path, "Classification", {"pretrained": str(stand_in("bert")), "adapter": "lora"},
        {"format": "classification", "train_files": data, "validation_files": data, "batch_size": 4,
         "max_length": 32},
        trainer={"max_steps": 1},
    )  # fmt: skip
    fit(config)
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    saved = {k.split(".modules_to_save.")[0] for k in state if ".modules_to_save." in k}
    assert saved == {"model.classifier", "model.pooler"}


def test_cli_override_of_a_preset_named_by_a_string(tmp_path, stand_in):
    """``adapter: lora`` in the recipe, ``--model.adapter.r=4`` on the command line: the preset, with r=4."""
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(8))
    config = recipe(
        tmp_path, "CausalLM", {"pretrained": str(stand_in("llama")), "adapter": "lora"},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 16},
        trainer={"max_steps": 1},
    )  # fmt: skip
    fit(config, "--model.adapter.r=4")
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())["model"]["init_args"]["adapter"]
    assert saved == {"preset": "lora", "r": 4}
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert state["model.layers.0.attn.q_proj.lora_A.default.weight"].shape[0] == 4


def test_gpt2_conv1d_adapters_use_fan_in_fan_out_only_on_the_hf_backend(stand_in):
    spec = load_spec("lora")
    ours, hf = _pair(stand_in, "gpt2")
    ours, hf = inject(ours, spec, model_type="gpt2", heads=[]), inject(hf, spec, model_type="gpt2", heads=[])
    assert not ours.peft_config["default"].fan_in_fan_out  # our GPT-2 uses nn.Linear
    assert hf.peft_config["default"].fan_in_fan_out  # HF's Conv1D stores (in, out)
    assert isinstance(hf.transformer.h[0].attn.c_attn.get_base_layer(), T.pytorch_utils.Conv1D)
