"""Epoch metrics written by ``finetune validate``/``test`` equal a hand computation on the same predictions."""

import json
import math

import pytest
import torch

from finetune.cli import FinetuneCLI, main
from tests.tasks.helpers import TINY_LLAMA, cyclic_text, fit, recipe, weights, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _predictions(config: str, ckpt) -> tuple[list, list, list]:
    """(logits, labels) per validation batch from the checkpoint, run by hand outside Lightning's loop."""
    cli = FinetuneCLI(args=["--config", config], run=False)
    model, dm = cli.model, cli.datamodule
    cli.trainer.strategy.connect(model)
    model.trainer = cli.trainer
    cli.trainer.datamodule = dm
    dm.trainer = cli.trainer
    dm.setup("validate")
    model.configure_model()
    model.load_state_dict(weights(ckpt))
    model.eval()
    outs = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            outs.append(batch)
    return model, outs


def _macro(per_class: list[float]) -> float:
    return sum(per_class) / len(per_class)


def test_classification_metrics_equal_hand_count(tmp_path, stand_in):
    rows = [{"text": f"{w} {n}", "label": lab} for n in ("one", "two", "three", "four", "five")
            for w, lab in (("good", "positive"), ("bad", "negative"), ("fox", "neutral"))]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = recipe(
        tmp_path, "Classification", {"pretrained": str(stand_in("llama")), "lr": 1e-3},
        {"format": "classification", "train_files": data, "validation_files": data, "batch_size": 4,
         "max_length": 32},
        trainer={"max_steps": 2},
    )  # fmt: skip
    fit(config)  # a few steps, so the predictions are neither constant nor all right
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", config, "--ckpt_path", str(ckpt)]) == 0
    written = json.loads((tmp_path / "run" / "validate_metrics.json").read_text())["metrics"]
    confusion = json.loads((tmp_path / "run" / "val_confusion_matrix.json").read_text())

    model, batches = _predictions(config, ckpt)
    preds, labels, losses = [], [], []
    with torch.no_grad():
        for b in batches:
            logits = model.logits(b)
            preds += logits.argmax(-1).tolist()
            labels += b["labels"].tolist()
            losses += torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none").tolist()
    k = len(confusion["labels"])
    counts = [[sum(1 for p, y in zip(preds, labels, strict=True) if y == i and p == j) for j in range(k)]
              for i in range(k)]  # fmt: skip
    assert confusion["confusion_matrix"] == counts
    assert confusion["labels"] == ["negative", "neutral", "positive"]
    tp = [counts[i][i] for i in range(k)]
    predicted = [sum(counts[i][j] for i in range(k)) for j in range(k)]
    actual = [sum(counts[i]) for i in range(k)]
    precision = [tp[i] / predicted[i] if predicted[i] else 0.0 for i in range(k)]
    recall = [tp[i] / actual[i] if actual[i] else 0.0 for i in range(k)]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    assert 0 < sum(tp) < len(labels)  # the check is not trivial
    assert written["val/accuracy"] == pytest.approx(sum(tp) / len(labels), abs=1e-6)
    assert written["val/precision"] == pytest.approx(_macro(precision), abs=1e-6)
    assert written["val/recall"] == pytest.approx(_macro(recall), abs=1e-6)
    assert written["val/f1"] == pytest.approx(_macro(f1), abs=1e-6)
    assert written["val/loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_causal_lm_metrics_equal_hand_count(tmp_path, tokenizer_folder):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(13, length=7))  # 13 rows: the last batch is partial
    config = recipe(
        tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "lr": 3e-3},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": 4},
    )  # fmt: skip
    fit(config)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["test", "--config", config, "--ckpt_path", str(ckpt), f"--data.test_files={data}"]) == 0
    written = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["metrics"]

    model, batches = _predictions(config, ckpt)
    nll, right, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            logits = model.logits(b)[:, :-1]
            target = b["labels"][:, 1:]
            keep = target != -100
            logp = logits.log_softmax(-1)
            nll -= logp[keep].gather(-1, target[keep][:, None]).sum().item()
            right += (logits.argmax(-1)[keep] == target[keep]).sum().item()
            n += keep.sum().item()
    assert written["test/loss"] == pytest.approx(nll / n, abs=1e-5)
    assert written["test/perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert written["test/accuracy"] == pytest.approx(right / n, abs=1e-6)


def test_validation_metrics_count_only_their_epoch(tmp_path, stand_in):
    """With the sanity check on (2 batches), each validation epoch's metrics count its own 8 rows in 4 batches
    only: the confusion matrix totals 8 (it held 12: the sanity batches too) and every metric saw 4 updates."""
    rows = [{"text": f"{w} {n}", "label": lab} for n in ("one", "two", "three", "four")
            for w, lab in (("good", "positive"), ("bad", "negative"))]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    counts = tmp_path / "counts.json"
    callback = {"class_path": "tests.tasks.helpers.SaveMetricCounts", "init_args": {"path": str(counts)}}
    config = recipe(
        tmp_path, "Classification", {"pretrained": str(stand_in("llama")), "lr": 1e-3},
        {"format": "classification", "train_files": data, "validation_files": data, "batch_size": 4,
         "eval_batch_size": 2, "max_length": 32},
        trainer={"max_steps": 4, "num_sanity_val_steps": 2, "callbacks": [callback]},
    )  # fmt: skip
    fit(config)
    epochs = json.loads(counts.read_text())
    assert len(epochs) == 2  # one validation per epoch of 2 steps
    names = ("loss", "accuracy", "f1", "precision", "recall", "confusion_matrix")
    for epoch in epochs:
        assert epoch["updates"] == dict.fromkeys(names, 4)
        assert epoch["totals"] == {"confusion_matrix": 8}
    saved = json.loads((tmp_path / "run" / "val_confusion_matrix.json").read_text())["confusion_matrix"]
    assert sum(map(sum, saved)) == 8
