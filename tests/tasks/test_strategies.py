"""Strategies and precisions end to end on tiny models: DDP over 2 CPU processes gives the same epoch metrics as 1
process and trains like 1 process with the doubled batch; FSDP2 (``ModelParallelStrategy``) trains with unequal
evaluation shards and writes a distributed checkpoint that loads into 1 process; bf16-mixed and bf16-true train.

The multi-process runs are ``python -m finetune.cli`` subprocesses (gloo on CPU). DDP runs are started the way a
user does on one machine: Lightning's launcher re-runs the command for rank 1. The FSDP2 run is started by
``torchrun``, as the README shows for several machines (both processes start at once, which is quicker here)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from finetune.cli import main
from tests.tasks.helpers import (
    TINY_LLAMA,
    WORDS,
    cli_subprocess,
    cyclic_text,
    fit,
    logged,
    recipe,
    save_grads,
    weights,
    write_jsonl,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIMEOUT = 300  # seconds for one multi-process command
CPU2 = ("--trainer.devices=2", "--trainer.accelerator=cpu")
DDP = ("--trainer.strategy=ddp", *CPU2)
FSDP2 = (
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    *CPU2,
)


def run_cli(*args: str, torchrun: bool = False, processes: int = 2) -> str:
    """``python -m finetune.cli ARGS`` to the end, with 2 processes, started by Lightning's launcher (which re-runs
    the command for rank 1) or by ``torchrun`` (also with more ``processes``); its output (printed when it fails)."""
    if torchrun:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        proc = subprocess.Popen(
            [*command, "-m", "finetune.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    else:
        proc = cli_subprocess(*args, start_new_session=True)  # its own process group: a timeout ends every rank
    t0 = time.time()
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT}s: {' '.join(args)}\n{out}")
    assert proc.returncode == 0, f"exit code {proc.returncode}: {' '.join(args)}\n{out}"
    assert f"All distributed processes registered. Starting with {processes} processes" in out, out
    print(f"{args[0]} with {processes} processes{' (torchrun)' if torchrun else ''} took {time.time() - t0:.1f}s")
    return out


def _json(path):
    return json.loads(path.read_text())


def _last(values: dict[int, float]) -> float:
    return values[max(values)]


# ------------------------------------------------------------------------------------- DDP, classification
def _row(text: str, label: str) -> dict:
    return {"text": text, "label": label}


LEARNABLE = [_row(f"{w} {n}", lab) for n in ("one", "two", "three", "four", "five")
             for w, lab in (("good", "positive"), ("bad", "negative"), ("fox", "neutral"))]  # fmt: skip
# Rows the words don't decide: the trained model gets some wrong, so every metric is non-trivial.
UNSEEN = [_row("cat six", "positive"), _row("dog one", "negative"), _row("mat two", "neutral"),
          _row("sat five", "negative"), _row("good bad", "neutral"), _row("fox good", "positive")]  # fmt: skip
STEPS = 4  # optimizer steps: 2 epochs of 12 training rows in batches of 6


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory, stand_in):
    """A tiny LLaMA classifier trained ``STEPS`` steps in this process (batches of 6): (folder, recipe, val/loss)."""
    folder = tmp_path_factory.mktemp("one-process")
    train = write_jsonl(folder / "train.jsonl", LEARNABLE[:12])
    val = write_jsonl(folder / "val.jsonl", LEARNABLE[5:12] + UNSEEN)  # 13 rows: the 2 ranks get 7 and 6
    config = recipe(
        folder, "Classification",
        {"pretrained": str(stand_in("llama")), "backend": "scratch", "lr": 1e-2, "schedule": "constant"},
        {"format": "classification", "train_files": train, "validation_files": val, "batch_size": 6,
         "eval_batch_size": 3, "max_length": 16},
        trainer={"max_steps": STEPS},
    )  # fmt: skip
    fit(config)
    return folder, config, _last(logged(folder / "run", "val/loss"))


def test_ddp_validate_equals_one_process(classification_run, tmp_path):
    """Unequal evaluation shards (7 and 6 rows, batches of 3): every epoch metric and the confusion matrix are
    those of 1 process, since the metrics are synced, not averaged per process."""
    folder, config, _ = classification_run
    assert main(["validate", "--config", config, "--ckpt_path", "best"]) == 0
    best = folder / "run" / "checkpoints" / "best.ckpt"
    run_cli("validate", "--config", config, *DDP, "--ckpt_path", str(best), f"--trainer.default_root_dir={tmp_path}")
    one, two = _json(folder / "run" / "validate_metrics.json"), _json(tmp_path / "validate_metrics.json")
    assert one["ckpt_path"] == two["ckpt_path"] == str(best)
    assert set(one["metrics"]) == {f"val/{m}" for m in ("loss", "accuracy", "f1", "precision", "recall")}
    assert two["metrics"] == pytest.approx(one["metrics"], rel=0, abs=1e-6)
    matrix = _json(folder / "run" / "val_confusion_matrix.json")
    assert _json(tmp_path / "val_confusion_matrix.json") == matrix
    counts = torch.tensor(matrix["confusion_matrix"])
    assert counts.sum() == 13 and 0 < counts.trace() < 13  # every row counted once; right and wrong predictions
    assert (counts.sum(0) > 0).sum() >= 2  # more than one class predicted


def test_ddp_fit_equals_one_process_with_double_batch(classification_run, tmp_path):
    """Each rank takes every other sample of the shared seeded order, so 2 ranks x 3 rows are the 1-process batch
    of 6; per-row mean losses and averaged gradients then give the same steps (no dropout)."""
    folder, config, one_val_loss = classification_run
    run_cli("fit", "--config", config, *DDP, "--data.batch_size=3", f"--trainer.default_root_dir={tmp_path}")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == STEPS
    ddp, one = weights(last), weights(folder / "run" / "checkpoints" / "last.ckpt")
    assert ddp.keys() == one.keys()
    for k in ddp:
        assert torch.isfinite(ddp[k]).all(), k
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-5, msg=k)
    assert _last(logged(tmp_path, "val/loss")) == pytest.approx(one_val_loss, abs=1e-5)


# ------------------------------------------------------------------------------- DDP, token-weighted loss
def test_ddp_with_accumulation_equals_one_process_by_tokens(tmp_path, tokenizer_folder):
    """Instruction rows with answers of 1 to 8 words: 2 processes x batch 1 x accumulate 2 give each step the
    gradient of 1 process's batch of 4 (the loss summed over all labelled tokens of the window on both ranks, over
    their count), though the ranks' shards hold unequal token counts; the logged step loss is the same token mean."""
    rows = [{"instruction": " ".join(WORDS[i : i + 2]), "output": " ".join(WORDS[i + 3 : i + 3 + n])}
            for i, n in enumerate((1, 8, 3, 6, 2, 7, 1, 5))]  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    model = {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "lr": 0.0, "schedule": "constant"}

    def config(name: str, batch_size: int, accumulate: int) -> str:
        folder = tmp_path / name
        folder.mkdir()
        trainer = {"max_steps": -1, "max_epochs": 1, "accumulate_grad_batches": accumulate,
                   "callbacks": [save_grads(folder / "grads.pt")]}  # fmt: skip
        data_args = {"format": "instruction", "train_files": data, "batch_size": batch_size, "max_length": 64,
                     "prompt_template_no_input": "{instruction}:"}  # fmt: skip
        return recipe(folder, "CausalLM", model, data_args, trainer=trainer)

    fit(config("one", batch_size=4, accumulate=1))
    run_cli("fit", "--config", config("ddp", batch_size=1, accumulate=2), *DDP)
    one, ddp = (torch.load(tmp_path / name / "grads.pt") for name in ("one", "ddp"))
    assert sorted(one) == sorted(ddp) == [1, 2]
    for step in one:
        assert one[step].keys() == ddp[step].keys()
        for k, g in one[step].items():
            assert g.abs().max() > 0, (step, k)
            torch.testing.assert_close(ddp[step][k], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=k)
    one_loss, ddp_loss = (logged(tmp_path / name / "run", "train/loss_step") for name in ("one", "ddp"))
    assert sorted(ddp_loss) == [0, 1] and ddp_loss == pytest.approx(one_loss, rel=1e-6)


# ------------------------------------------------------------------------------------ FSDP2, causal LM
def test_fsdp2_fit_and_distributed_checkpoint(tmp_path, tokenizer_folder):
    """FSDP2 over 2 processes with unequal evaluation shards (17 rows in batches of 4: 3 and 2 batches). Its
    checkpoint is a folder of shards; consolidated, it loads into 1 process, whose validation reproduces the
    token loss, perplexity and accuracy the 2 processes logged."""
    train = write_jsonl(tmp_path / "train.jsonl", cyclic_text(16, length=8))  # 2 batches of 4 per rank: 2 steps
    val = write_jsonl(tmp_path / "val.jsonl", cyclic_text(17, length=9))
    config = recipe(
        tmp_path, "CausalLM",
        {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "lr": 1e-2, "max_new_tokens": 4},
        {"format": "text", "train_files": train, "validation_files": val, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": 2},
    )  # fmt: skip
    run = tmp_path / "run"
    out = run_cli("fit", "--config", config, *FSDP2, torchrun=True)
    assert "sample: " in out  # rank 0 generated a sample from the sharded model after training
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # save_distributed_checkpoint=True: one shard file per rank, plus Lightning's metadata
    assert {p.name for p in last.iterdir()} == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(last, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 2
    for k, v in full["state_dict"].items():
        assert torch.isfinite(v).all(), k
    single = tmp_path / "single.ckpt"
    torch.save({**meta, "state_dict": full["state_dict"]}, single)
    one = tmp_path / "one"
    assert main(["validate", "--config", config, "--ckpt_path", str(single), f"--trainer.default_root_dir={one}"]) == 0
    metrics = _json(one / "validate_metrics.json")["metrics"]
    assert set(metrics) == {"val/loss", "val/perplexity", "val/accuracy"}
    for name, value in metrics.items():
        assert _last(logged(run, name)) == pytest.approx(value, rel=1e-6), name


# ------------------------------------------------------------------------------------------------ precision
def test_bf16_precisions_train(tmp_path, tokenizer_folder):
    """2 steps each of 32-true, bf16-mixed and bf16-true from the same seed: finite losses; bf16-mixed starts at
    the fp32 loss (autocast only) and keeps fp32 weights; bf16-true keeps bf16 weights."""
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(16, length=8))
    losses, dtypes = {}, {}
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        folder = tmp_path / precision
        folder.mkdir()
        config = recipe(
            folder, "CausalLM",
            {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "lr": 1e-2, "max_new_tokens": 4},
            {"format": "text", "train_files": data, "batch_size": 4, "max_length": 32},
            trainer={"max_steps": 2, "precision": precision},
        )  # fmt: skip
        fit(config)
        losses[precision] = logged(folder / "run", "train/loss_step")
        dtypes[precision] = {v.dtype for v in weights(folder / "run" / "checkpoints" / "last.ckpt").values()}
    for precision, loss in losses.items():
        assert sorted(loss) == [0, 1] and all(torch.isfinite(torch.tensor(v)) for v in loss.values()), precision
    assert losses["bf16-mixed"][0] == pytest.approx(losses["32-true"][0], rel=2e-3)  # 1e-5 here
    assert dtypes == {"32-true": {torch.float32}, "bf16-mixed": {torch.float32}, "bf16-true": {torch.bfloat16}}
