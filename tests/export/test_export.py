"""Train a few adapter steps, export merged and adapter folders, reload them with plain ``transformers``/``peft``,
and get the logits of the fine-tuned model inside the toolkit (fp32)."""

import json

import pytest
import torch
import transformers as T
from peft import PeftModel

from finetune.export import export, load_run
from tests.tasks.helpers import cyclic_text, fit, recipe, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LABELS = ("negative", "neutral", "positive")
# arch -> (task, HF auto class, data format)
ARCHS = {
    "gpt2": ("CausalLM", T.AutoModelForCausalLM, "text"),
    "llama": ("CausalLM", T.AutoModelForCausalLM, "text"),
    "bert": ("Classification", T.AutoModelForSequenceClassification, "classification"),
    "t5": ("Seq2Seq", T.AutoModelForSeq2SeqLM, "seq2seq"),
}


def _rows(fmt: str) -> list[dict]:
    if fmt == "classification":
        return [{"text": f"{w} {n}", "label": lab} for n in ("one", "two", "three")
                for w, lab in (("bad", "negative"), ("fox", "neutral"), ("good", "positive"))]  # fmt: skip
    if fmt == "seq2seq":
        return [{"source": t, "target": t} for t in ("the cat", "a dog", "the fox", "one two")] * 2
    return cyclic_text(16)


def train(tmp_path, stand_in, arch: str, adapter, *, backend: str = "scratch", steps: int = 4, **trainer):
    task, _, fmt = ARCHS[arch]
    data = write_jsonl(tmp_path / "d.jsonl", _rows(fmt))
    config = recipe(
        tmp_path, task, {"pretrained": str(stand_in(arch)), "backend": backend, "adapter": adapter, "lr": 3e-2},
        {"format": fmt, "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": steps, **trainer},
    )  # fmt: skip
    fit(config)
    return tmp_path / "run"


def batch(arch: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 7), generator=g)  # no special or padding ids
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding (ids there still count for HF's pad-id pooling, so keep them non-pad)
    if arch == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(5, 300, (2, 4), generator=g)}
    return {"input_ids": ids, "attention_mask": mask}


def hf_logits(model, arch: str, b: dict) -> torch.Tensor:
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    if arch == "t5":
        kw["labels"] = b["labels"]
    return model(**kw).logits


def toolkit_logits(run, arch: str, b: dict) -> torch.Tensor:
    task = load_run(run, "last").load_model()
    with torch.no_grad():
        return task.logits(b)


def compare(expected: torch.Tensor, got: torch.Tensor, arch: str, b: dict) -> None:
    if ARCHS[arch][0] == "CausalLM":  # padded positions are not compared
        keep = b["attention_mask"].bool()
        expected, got = expected[keep], got[keep]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def load_base(arch: str, folder, *, nf4: bool = False):
    _, auto, _ = ARCHS[arch]
    kw = {}
    if auto is T.AutoModelForSequenceClassification:
        kw = {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS))}
    if nf4:  # a QLoRA adapter on the base quantized as it trained: NF4 with double-quantized scales
        kw["quantization_config"] = T.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        kw["device_map"] = "cpu"
    model = auto.from_pretrained(folder, **kw).eval()
    for m in model.modules():  # bitsandbytes 0.50's CPU inference repacking fails (see finetune/quantize.py)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def check_exports(tmp_path, run, arch: str, *, expect_base_folder: bool, nf4: bool = False) -> None:
    b = batch(arch)
    expected = toolkit_logits(run, arch, b)
    export(run, tmp_path / "merged", format="merged", ckpt="last")
    merged = ARCHS[arch][1].from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        compare(expected, hf_logits(merged, arch, b), arch, b)
    if ARCHS[arch][0] == "Classification":
        assert merged.config.id2label == dict(enumerate(LABELS))

    export(run, tmp_path / "adapter", format="adapter", ckpt="last")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]
    assert (tmp_path / "adapter" / "base").is_dir() == expect_base_folder
    if expect_base_folder:
        assert base_path == str((tmp_path / "adapter" / "base").resolve())
    peft_model = PeftModel.from_pretrained(load_base(arch, base_path, nf4=nf4), tmp_path / "adapter").eval()
    with torch.no_grad():
        compare(expected, hf_logits(peft_model, arch, b), arch, b)
    # and the adapter trained something: the base alone differs
    with torch.no_grad():
        plain = hf_logits(load_base(arch, base_path), arch, b)
    assert not torch.allclose(plain, expected, atol=1e-3)


@pytest.mark.parametrize("backend", ["scratch", "hf"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_exports_reload_with_the_same_logits(tmp_path, stand_in, arch, backend):
    run = train(tmp_path, stand_in, arch, "lora", backend=backend)
    check_exports(tmp_path, run, arch, expect_base_folder=backend == "scratch")


@pytest.mark.parametrize("preset", ["dora", "ia3", "rslora", "lora-all-linear", "qlora"])
def test_other_presets_on_llama(tmp_path, stand_in, preset):
    run = train(tmp_path, stand_in, "llama", preset)
    check_exports(tmp_path, run, "llama", expect_base_folder=True, nf4=preset == "qlora")


def test_qlora_on_the_hf_backend_gpt2(tmp_path, stand_in):
    """GPT-2's Conv1D layers quantized as (out, in) Linear4bit; the merge dequantizes them the same way."""
    run = train(tmp_path, stand_in, "gpt2", "qlora", backend="hf")
    check_exports(tmp_path, run, "gpt2", expect_base_folder=False, nf4=True)
