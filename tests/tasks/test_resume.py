"""Resume: N steps straight equal N/2 + resume + N/2 (weights within 1e-6, same logged losses), after a clean stop
and after SIGKILL mid-run; and checkpoints are replaced atomically."""

import lightning.pytorch as L
import pytest
import torch

from finetune.callbacks import AtomicCheckpointIO
from finetune.cli import FinetuneCLI
from tests.tasks.helpers import TINY_LLAMA, cyclic_text, fit, fit_killed_mid_run, logged, recipe, weights, write_jsonl

N = 12  # optimizer steps; an epoch has 16 batches, so every stop is mid-epoch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _recipe(tmp_path, tokenizer_folder, name: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(64, length=10))
    return recipe(
        folder,
        "CausalLM",
        {"config": {**TINY_LLAMA, "attention_dropout": 0.0}, "tokenizer": str(tokenizer_folder("llama")),
         "lr": 3e-3, "warmup": 2, "weight_decay": 0.1},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": N, "val_check_interval": 4, "limit_val_batches": 2},
        last_checkpoint={"every_n_train_steps": 2},
    )  # fmt: skip


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _assert_same_run(a, b) -> None:
    wa, wb = weights(a / "checkpoints" / "last.ckpt"), weights(b / "checkpoints" / "last.ckpt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    la, lb = logged(a, "train/loss_step"), logged(b, "train/loss_step")
    assert sorted(la) == list(range(N)) and la == pytest.approx(lb, abs=1e-6)
    va, vb = logged(a, "val/loss"), logged(b, "val/loss")  # a clean stop also validates where it stops
    assert va and {s: vb[s] for s in va} == pytest.approx(va, abs=1e-6)


def test_stop_and_resume_equals_straight_run(tmp_path, tokenizer_folder):
    straight = _recipe(tmp_path, tokenizer_folder, "straight")
    fit(straight)
    split = _recipe(tmp_path, tokenizer_folder, "split")
    cli = FinetuneCLI(args=["--config", split], run=False)
    cli.trainer.callbacks.append(StopAt(N // 2))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.load(tmp_path / "split/run/checkpoints/last.ckpt", weights_only=False)["global_step"] == N // 2
    fit(split, "--ckpt_path", "last")
    _assert_same_run(tmp_path / "straight" / "run", tmp_path / "split" / "run")


def test_resume_after_sigkill_equals_straight_run(tmp_path, tokenizer_folder):
    straight = _recipe(tmp_path, tokenizer_folder, "straight")
    fit(straight)
    killed = _recipe(tmp_path, tokenizer_folder, "killed")
    step = fit_killed_mid_run(killed, tmp_path / "killed/run", N // 2)
    assert N // 2 <= step < N
    fit(killed, "--ckpt_path", "last")
    _assert_same_run(tmp_path / "straight" / "run", tmp_path / "killed" / "run")
    # The epoch-level loss covers the steps before the kill too (its metric state is in the checkpoint).
    ea, eb = (logged(tmp_path / name / "run", "train/loss") for name in ("straight", "killed"))
    assert list(ea) == [N - 1] and eb == pytest.approx(ea, abs=1e-6)


def test_fit_refuses_a_run_folder_with_checkpoints(tmp_path, tokenizer_folder):
    config = _recipe(tmp_path, tokenizer_folder, "again")
    fit(config, "--trainer.max_steps=2")
    with pytest.raises(FileExistsError, match=r"already holds checkpoints .*--ckpt_path last"):  # (fit: --debug)
        fit(config, "--trainer.max_steps=2")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint whole and no temporary file behind."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. the process is interrupted mid-write

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_clean_stop_resumed_with_more_steps_continues_the_epoch_loss(tmp_path, tokenizer_folder):
    """A run that reaches its ``max_steps`` mid-epoch and is resumed with a larger one logs the epoch's
    ``train/loss`` once, over the whole epoch, as the straight run (and the kill -9 resume) do: not also the value
    over the epoch's first part that the stop logged."""
    constant = ("--model.schedule=constant", "--model.warmup=0")  # the same schedule whatever max_steps says
    straight = _recipe(tmp_path, tokenizer_folder, "straight")
    fit(straight, *constant)
    split = _recipe(tmp_path, tokenizer_folder, "split")
    fit(split, *constant, f"--trainer.max_steps={N // 2}")
    fit(split, *constant, "--ckpt_path", "last", f"--trainer.max_steps={N}")
    ea, eb = (logged(tmp_path / name / "run", "train/loss") for name in ("straight", "split"))
    assert list(ea) == [N - 1] and eb == pytest.approx(ea, abs=1e-6)  # one value for the epoch, the whole epoch's
    la, lb = logged(tmp_path / "straight/run", "train/loss_step"), logged(tmp_path / "split/run", "train/loss_step")
    assert la == pytest.approx(lb, abs=1e-6)
