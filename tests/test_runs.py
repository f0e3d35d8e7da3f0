"""``finetune.runs``: one module opens a run folder for ``export``, ``generate``/``chat`` and ``serve``; talking to
a model does not import the exporter."""

import json
import subprocess
import sys

import pytest
import torch

from finetune.data.collate import prompt_ids
from finetune.generation import generate
from finetune.runs import load_run, merged_state
from tests.export.test_export import train
from tests.tasks.helpers import TINY_LLAMA, cyclic_text, fit, recipe, write_jsonl


def test_inference_opens_a_run_without_importing_the_exporter(tmp_path, stand_in):
    run = train(tmp_path, stand_in, "llama", "lora", steps=2)
    code = (
        "import sys\nfrom finetune import inference\n"
        f"inference.load({str(run)!r}, ckpt='last')\n"
        "print(sorted(m for m in sys.modules if m.startswith('finetune.export')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # The merged state is the trained model's: same logits as the task with its adapter applied.
    config, state = merged_state(load_run(run, "last"))
    from finetune.models.hub import from_state

    merged = from_state(config, state, where="test").eval()
    task = load_run(run, "last").load_model()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), task.model(ids), rtol=1e-4, atol=1e-5)


GENERATE_IN_A_FRESH_PROCESS = """
import contextlib, io, json, sys
from finetune.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["generate", sys.argv[1], "--ckpt", "last", "--prompt", "the quick", "--max-new-tokens", "6",
                 "--temperature", "0"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"lightning", "lightning_fabric", "torchmetrics", "peft"})
print(json.dumps({"code": code, "text": out.getvalue(), "heavy": heavy}))
"""


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_generate_on_a_run_imports_no_lightning_and_gives_the_tasks_tokens(
    tmp_path, stand_in, tokenizer_folder, adapter
):
    """``finetune generate RUN`` opens the run without its LightningModule (peft only for an adapter to merge),
    and its greedy text is that of the task rebuilt the full way, with its trained model."""
    if adapter is None:  # a full run from random weights, as the quickstart
        data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(16))
        model = {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "lr": 3e-2}
        fit(recipe(tmp_path, "CausalLM", model, {"format": "text", "train_files": data, "batch_size": 4,
                                                "max_length": 32}, trainer={"max_steps": 3}))  # fmt: skip
        run = tmp_path / "run"
    else:
        run = train(tmp_path, stand_in, "llama", adapter, steps=2)
    out = subprocess.run([sys.executable, "-c", GENERATE_IN_A_FRESH_PROCESS, str(run)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    assert got["heavy"] == ([] if adapter is None else ["peft"])
    task = load_run(run, "last").load_model()  # the LightningModule, as before
    ids = torch.tensor([prompt_ids(task.tokenizer, "the quick")])
    expected = generate(task.model, ids, max_new_tokens=6, temperature=0.0, eos_token_id=task.tokenizer.eos_token_id)
    assert (
        got["text"] == "the quick" + task.tokenizer.decode(expected[0, ids.size(1) :], skip_special_tokens=True) + "\n"
    )
