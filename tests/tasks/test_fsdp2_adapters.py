"""FSDP2 (``ModelParallelStrategy``, 2 gloo processes) LoRA runs end to end: the distributed checkpoint holds only
the trained weights (a few % of the base), a run SIGKILLed mid-way and resumed equals the uninterrupted run exactly
(and the one-process run with the same global batch, up to summation order), and ``finetune export`` reads the
sharded checkpoint folder directly, merged and adapter, into folders plain ``transformers`` / ``peft`` load with
the one-process run's logits; ``generate`` from it answers as the one-process run does."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers as T

from finetune.cli import main
from finetune.sharded import read_sharded_checkpoint
from tests.export.test_checkpoints import base  # noqa: F401  (the ~3M-parameter LLaMA fixture)
from tests.tasks.helpers import cyclic_text, fit, logged, recipe, weights, write_jsonl
from tests.tasks.test_strategies import FSDP2, TIMEOUT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N = 6  # optimizer steps; checkpoints every 2
LORA = {"preset": "lora", "lora_dropout": 0.0}  # no dropout: 1 and 2 processes draw different masks


def _recipe(tmp_path, base, name: str, batch_size: int) -> str:  # noqa: F811
    folder = tmp_path / name
    folder.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(48, length=10))
    return recipe(
        folder, "CausalLM",
        {"pretrained": str(base), "backend": "scratch", "adapter": LORA, "lr": 1e-2, "warmup": 2},
        {"format": "text", "train_files": data, "batch_size": batch_size, "max_length": 32},
        trainer={"max_steps": N},
        last_checkpoint={"every_n_train_steps": 2},
    )  # fmt: skip


def _torchrun(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*command, "-m", "finetune.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: one kill ends every rank
    )


def _step(last) -> int:
    """The global step of a sharded ``last.ckpt`` (0 while none is complete)."""
    try:
        return torch.load(last / "meta.pt", weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (B, T, V)


@pytest.mark.slow
def test_fsdp2_lora_checkpoint_resume_and_export(tmp_path, base):  # noqa: F811
    one = _recipe(tmp_path, base, "one", batch_size=4)
    fit(one)
    # 2 ranks x 2 rows: the one-process batch of 4; one run straight through, one killed mid-way and resumed.
    straight, killed = (_recipe(tmp_path, base, name, batch_size=2) for name in ("straight", "killed"))
    out, _ = _torchrun("fit", "--config", straight, *FSDP2).communicate(timeout=TIMEOUT)
    assert _step(tmp_path / "straight/run/checkpoints/last.ckpt") == N, out
    last = tmp_path / "killed/run/checkpoints/last.ckpt"
    proc = _torchrun("fit", "--config", killed, *FSDP2)
    deadline = time.time() + TIMEOUT
    try:
        while proc.poll() is None and time.time() < deadline and _step(last) < N // 2:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert N // 2 <= _step(last) < N

    # Only the LoRA weights (and their Adam state) are saved: under 5% of the base's bytes.
    saved = sum(p.stat().st_size for p in last.iterdir())
    assert saved < 0.05 * (base / "model.safetensors").stat().st_size, saved

    resumed = _torchrun("fit", "--config", killed, *FSDP2, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, out
    assert _step(last) == N

    # Killed and resumed = straight through, exactly: every step's loss, every trained weight.
    losses = {n: logged(tmp_path / n / "run", "train/loss_step") for n in ("one", "straight", "killed")}
    assert sorted(losses["killed"]) == list(range(N)) and losses["killed"] == losses["straight"]
    trained = {n: read_sharded_checkpoint(tmp_path / n / "run/checkpoints/last.ckpt")["state_dict"]
               for n in ("straight", "killed")}  # fmt: skip
    trained["one"] = weights(tmp_path / "one/run/checkpoints/last.ckpt")
    assert trained["one"].keys() == trained["killed"].keys() and all(".lora_" in k for k in trained["one"])
    for k, w in trained["straight"].items():
        torch.testing.assert_close(trained["killed"][k], w, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    # And the one-process run, up to the order of summation (rank-local sums, then the reduce-scatter): the losses
    # within 1e-5; the weights within 1e-3, since Adam's first steps are about lr * sign(gradient), so the few
    # elements whose gradient is ~0 there differ by up to ~4e-4 (lr = 1e-2).
    assert losses["killed"] == pytest.approx(losses["one"], abs=1e-5)
    for k, w in trained["one"].items():
        torch.testing.assert_close(trained["killed"][k], w, rtol=0, atol=1e-3, msg=lambda m, k=k: f"{k}: {m}")

    # export reads the sharded folder itself; both exports load in plain transformers / peft.
    for name in ("one", "killed"):
        for fmt in ("merged", "adapter"):
            out_dir = tmp_path / f"{name}-{fmt}"
            assert main(["export", str(tmp_path / name / "run"), "--ckpt", "last", "--format", fmt,
                         "--out", str(out_dir)]) == 0  # fmt: skip

    from peft import PeftModel

    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = T.AutoModelForCausalLM.from_pretrained(base).eval()
    reference = _logits(T.AutoModelForCausalLM.from_pretrained(tmp_path / "one-merged").eval(), ids)
    assert not torch.allclose(reference, _logits(plain, ids), atol=1e-2)  # the adapter changed the model
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "killed-merged").eval()
    torch.testing.assert_close(_logits(merged, ids), reference, rtol=0, atol=1e-3)
    adapter = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base), tmp_path / "killed-adapter")
    torch.testing.assert_close(_logits(adapter.eval(), ids), reference, rtol=0, atol=1e-3)

    # generate shares export's run loading: the sharded run answers as the one-process run does.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the quick brown"}])
    outs = {}
    for name in ("one", "killed"):
        outs[name] = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(tmp_path / name / "run"), "--ckpt", "last", "--prompts", prompts,
                     "--out", str(outs[name]), "--max-new-tokens", "6", "--temperature", "0"]) == 0  # fmt: skip
    assert outs["killed"].read_text() == outs["one"].read_text() != ""


def test_a_folder_that_is_not_a_distributed_checkpoint_is_named(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "last.ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  class_path: finetune.tasks.CausalLM\n")
    from finetune.export import load_run

    with pytest.raises(
        ValueError, match=r"last\.ckpt: a folder, but not a distributed checkpoint \(no \.metadata, meta\.pt"
    ):
        load_run(run, "last")
