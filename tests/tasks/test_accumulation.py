"""Gradient accumulation weighted by labelled tokens: batch N x accumulate 1 and batch 1 x accumulate N give the
same gradients (every parameter, each optimizer step, also an epoch's last, shorter window) and log the same
token-mean loss, on rows of unequal labelled length, for causal LM (unpacked and packed), seq2seq and masked LM."""

import pytest
import torch

from finetune.cli import FinetuneCLI
from tests.tasks.helpers import TINY_LLAMA, WORDS, fit, logged, recipe, save_grads, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


# 3 rows of unequal labelled length: batch 2 and batch 1 x accumulate 2 both make the windows [2 rows], [1 row].
INSTRUCTIONS = [{"instruction": _words(2), "output": _words(n, 5)} for n in (1, 6, 3)]
TEXTS = [{"text": _words(n, i)} for i, n in enumerate((1, 2, 1, 3, 1, 2))]  # 3 packed rows of <= 24 tokens
PAIRS = [{"source": _words(4, i), "target": _words(n, i + 2)} for i, n in enumerate((1, 9, 4))]


def _case(name: str, tmp_path, stand_in, tokenizer_folder) -> tuple[str, dict, dict]:
    """(task, model, data) of a case; no dropout, learning rate 0 (the weights stay put: each step's gradients
    depend only on its rows)."""
    no_training = {"lr": 0.0, "schedule": "constant"}
    if name == "seq2seq":
        model = {"pretrained": str(stand_in("t5")), "config": {"dropout_rate": 0.0}, **no_training}
        return "Seq2Seq", model, {"format": "seq2seq", "train_files": write_jsonl(tmp_path / "d.jsonl", PAIRS)}
    if name == "masked_lm":
        dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        model = {"pretrained": str(stand_in("bert")), "config": dropout, "mlm_probability": 0.5, **no_training}
        rows = [{"text": _words(n, i)} for i, n in enumerate((2, 14, 6))]
        return "MaskedLM", model, {"format": "text", "train_files": write_jsonl(tmp_path / "d.jsonl", rows)}
    model = {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), **no_training}
    if name == "causal_lm":  # the prompt is masked: the answers' lengths are the labelled lengths
        data = {"format": "instruction", "prompt_template_no_input": "{instruction}:", "max_length": 64}
        return "CausalLM", model, {**data, "train_files": write_jsonl(tmp_path / "d.jsonl", INSTRUCTIONS)}
    data = {"format": "text", "packing": True, "max_length": 24}
    return "CausalLM", model, {**data, "train_files": write_jsonl(tmp_path / "d.jsonl", TEXTS)}


def _fit(tmp_path, name, case, batch_size: int, accumulate: int) -> tuple[dict, dict, dict]:
    """Fits one epoch; (gradients per step, logged train/loss_step, logged epoch train/loss)."""
    folder = tmp_path / name
    folder.mkdir()
    task, model, data = case
    trainer = {"max_steps": -1, "max_epochs": 1, "accumulate_grad_batches": accumulate,
               "callbacks": [save_grads(folder / "grads.pt")]}  # fmt: skip
    fit(recipe(folder, task, model, {"max_length": 32, **data, "batch_size": batch_size}, trainer=trainer))
    run = folder / "run"
    return torch.load(folder / "grads.pt"), logged(run, "train/loss_step"), logged(run, "train/loss")


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k, g in a[step].items():
            assert g.abs().max() > 0 or "pooler" in k, (step, k)  # every weight the loss reaches has a gradient
            torch.testing.assert_close(b[step][k], g, rtol=1e-5, atol=1e-6 * max(1.0, g.abs().max().item()))


@pytest.mark.parametrize("name", ["causal_lm", "causal_lm_packed", "seq2seq"])
def test_accumulated_batches_equal_one_big_batch(tmp_path, stand_in, tokenizer_folder, name):
    """2 steps: a full window of 2 micro-batches, then an epoch's last window of 1 (Lightning still divides its
    loss by 2). Gradients, the logged step loss (the window's token mean) and the epoch loss equal batch 2's."""
    case = _case(name, tmp_path, stand_in, tokenizer_folder)
    big_grads, big_step, big_epoch = _fit(tmp_path, "big", case, batch_size=2, accumulate=1)
    acc_grads, acc_step, acc_epoch = _fit(tmp_path, "accumulated", case, batch_size=1, accumulate=2)
    assert sorted(big_grads) == [1, 2], "the rows should make a window of 2 micro-batches, then one of 1"
    _assert_same_grads(big_grads, acc_grads)
    assert acc_step == pytest.approx(big_step, rel=1e-6) and sorted(acc_step) == [0, 1]
    assert acc_epoch == pytest.approx(big_epoch, rel=1e-6)


def test_masked_lm_accumulation_is_the_token_mean_of_the_window(tmp_path, stand_in, tokenizer_folder):
    """Masks are drawn per batch index, so batch 2 masks differently from 2 x batch 1: the reference is a hand
    computation over the same micro-batches (the loss summed over all masked tokens of the window, divided by
    their count), from the same initial weights."""
    case = _case("masked_lm", tmp_path, stand_in, tokenizer_folder)
    grads, step_loss, _ = _fit(tmp_path, "accumulated", case, batch_size=1, accumulate=2)
    config = str(tmp_path / "accumulated" / "recipe.yaml")
    cli = FinetuneCLI(args=["--config", config, "--trainer.callbacks=[]"], run=False)
    model, dm = cli.model, cli.datamodule
    cli.trainer.strategy.connect(model)
    model.trainer, cli.trainer.datamodule, dm.trainer = cli.trainer, dm, cli.trainer
    dm.setup("fit")
    model.configure_model()
    model.train()
    batches = list(dm.train_dataloader())
    total, tokens, counts = 0.0, 0, []
    for i, batch in enumerate(batches[:2]):  # the first window
        out = model.step(batch, "train", i)
        total = total + out["loss"] * out["n_tokens"]
        tokens += int(out["n_tokens"])
        counts.append(int(out["n_tokens"]))
    assert counts[0] != counts[1]  # unequal: a per-micro-batch mean would weigh them wrongly
    (total / tokens).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _assert_same_grads({1: ref}, {1: grads[1]})
    assert step_loss[0] == pytest.approx(total.item() / tokens, rel=1e-6)


def test_gradients_are_reached_except_under_deepspeed():
    """DeepSpeed keeps its gradients in its own buffers: its runs keep per-micro-batch means (with a warning)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from finetune.tasks.accumulation import reaches_gradients

    assert reaches_gradients(SingleDeviceStrategy("cpu")) and reaches_gradients(DDPStrategy())
    assert not reaches_gradients(object.__new__(DeepSpeedStrategy))  # deepspeed itself is not installed here
