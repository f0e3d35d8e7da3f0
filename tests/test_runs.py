"""``finetune.runs``: one module opens a run folder for ``export``, ``generate``/``chat`` and ``serve``; talking to
a model does not import the exporter."""

import subprocess
import sys

import torch

from finetune.runs import load_run, merged_state
from tests.export.test_export import train


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

    merged = from_state(config.to_dict(), state, where="test").eval()
    task = load_run(run, "last").load_model()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), task.model(ids), rtol=1e-4, atol=1e-5)
