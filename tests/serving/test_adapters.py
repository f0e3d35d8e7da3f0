"""``finetune serve BASE --adapter NAME=RUN``: LoRA runs on one base, served unmerged over the base's shared weights,
each answer the one its merged export gives."""

import pytest

from finetune import inference
from finetune.export import export
from tests.export.test_export import train
from tests.serving.test_server import Server, greedy


def test_adapter_served_unmerged_equals_its_merged_export(tmp_path, stand_in):
    base = stand_in("llama")
    run = train(tmp_path, stand_in, "llama", "lora", steps=4)
    merged = export(run, tmp_path / "merged", format="merged", ckpt="last")
    base_loaded = inference.load(base)
    unmerged = inference.load_adapter(base_loaded, run, ckpt="last")
    shared = dict(base_loaded.model.named_parameters())
    assert (
        unmerged.model.get_submodule("layers.0.attn.q_proj").base_layer.weight is shared["layers.0.attn.q_proj.weight"]
    )
    s = Server(base, "--adapter", f"ft={run}", "--ckpt", "last", "--name", "base")
    try:
        client = s.client()
        assert sorted(m.id for m in client.models.list().data) == ["base", "ft"]
        differ = []
        for prompt in ("hello world", "a b c d e f"):
            out = client.completions.create(model="ft", prompt=prompt, max_tokens=10, temperature=0)
            assert out.choices[0].text == greedy(inference.load(merged), prompt, 10)
            plain = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0)
            assert plain.choices[0].text == greedy(base_loaded, prompt, 10)
            differ.append(out.choices[0].text != plain.choices[0].text)
        assert any(differ)  # the adapter changes the answers: it is applied, not the base alone
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_t5_adapter_served_unmerged_equals_its_merged_export(tmp_path, stand_in):
    """A seq2seq LoRA run on a T5 base takes the same path: unmerged over the shared base, batched as any T5."""
    base = stand_in("t5")
    run = train(tmp_path, stand_in, "t5", "lora", steps=4)
    merged = inference.load(export(run, tmp_path / "merged", format="merged", ckpt="last"))
    base_loaded = inference.load(base)
    s = Server(base, "--adapter", f"ft={run}", "--ckpt", "last", "--name", "base")
    try:
        client = s.client()
        differ = []
        for prompt in ("the cat", "one two", "a dog and the fox"):
            out = client.completions.create(model="ft", prompt=prompt, max_tokens=8, temperature=0)
            assert out.choices[0].text == greedy(merged, prompt, 8)
            plain = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0)
            assert plain.choices[0].text == greedy(base_loaded, prompt, 8)
            differ.append(out.choices[0].text != plain.choices[0].text)
        assert any(differ)  # the adapter is applied
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_adapter_of_another_base_is_refused(tmp_path, stand_in):
    run = train(tmp_path, stand_in, "llama", "lora", steps=1)
    with pytest.raises(ValueError, match="not on the served model"):
        inference.load_adapter(inference.load(stand_in("gpt2")), run, ckpt="last")
