"""Preference tuning: the loss formulas by hand, log-probs against a plain HF forward, step 0 with policy =
reference (ln 2, zero rewards) for every reference, the reference unchanged by training, accumulation by pairs."""

import math

import pytest
import torch

from finetune.data import DataModule
from finetune.tasks import Preference
from finetune.tasks.preference import pair_losses
from tests.tasks.helpers import WORDS, fit, logged, recipe, save_grads, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LORA = {"preset": "lora", "lora_dropout": 0.0}


def _words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


PAIRS = [{"prompt": _words(3, i), "chosen": " " + _words(n, i + 3), "rejected": " " + _words(m, i + 7)}
         for i, (n, m) in enumerate([(2, 5), (6, 1), (3, 3), (1, 4)])]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the formulas
def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        # chosen -2, rejected -5, ref chosen -3, ref rejected -4: delta = (1) - (-1) = 2; beta 0.5 -> z = 1
        ("sigmoid", -(0.9 * math.log(_sig(1.0)) + 0.1 * math.log(_sig(-1.0)))),
        ("robust", (-0.9 * math.log(_sig(1.0)) + 0.1 * math.log(_sig(-1.0))) / 0.8),
        ("hinge", 0.0),
        ("ipo", (2 - 1 / (2 * 0.5)) ** 2),
        # reference-free on the same numbers: simpo z = 0.5 * 3 - 0.25
        ("simpo", -(0.9 * math.log(_sig(1.25)) + 0.1 * math.log(_sig(-1.25)))),
        ("orpo", -0.5 * math.log(_sig(3 - (math.log(1 - math.exp(-2)) - math.log(1 - math.exp(-5)))))),
    ],
)
def test_losses_by_hand(loss, expected):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    losses, rc, rr = pair_losses(loss, t(-2.0), t(-5.0), t(-3.0), t(-4.0), beta=0.5, label_smoothing=0.1,
                                 simpo_gamma=0.25)  # fmt: skip
    n = (t(2.0), t(1.0))  # per-token means for ipo/simpo/orpo: chosen -1, rejected -5; ratios 0.5, -1
    normalized = pair_losses(loss, t(-2.0), t(-5.0), t(-3.0), t(-4.0), lengths=n, beta=0.5, label_smoothing=0.1,
                             simpo_gamma=0.25)[0].item()  # fmt: skip
    odds = 4 - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-5)))
    by_hand = {"ipo": (1.5 - 1) ** 2, "simpo": -(0.9 * math.log(_sig(1.75)) + 0.1 * math.log(_sig(-1.75))),
               "orpo": -0.5 * math.log(_sig(odds))}  # fmt: skip
    assert normalized == pytest.approx(by_hand.get(loss, losses.item()), rel=1e-12)
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    if loss in ("simpo", "orpo"):
        assert (rc.item(), rr.item()) == pytest.approx((-1.0, -2.5))
    else:
        assert (rc.item(), rr.item()) == pytest.approx((0.5, -0.5))


def test_extreme_logps_give_finite_losses():
    big = torch.tensor([-1e6, 0.0, -1e-12])
    for loss in ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"):
        losses, _, _ = pair_losses(loss, big, big.flip(0), big.flip(0), big, beta=0.1, label_smoothing=0.1)
        assert torch.isfinite(losses).all(), loss


def test_bad_settings_are_refused(stand_in):
    with pytest.raises(ValueError, match="model.loss='sigmoid' compares the policy with a reference"):
        Preference(str(stand_in("llama")), loss="sigmoid", reference="none")
    with pytest.raises(ValueError, match="model.reference=adapter needs an adapter"):
        Preference(str(stand_in("llama")), reference="adapter")
    with pytest.raises(ValueError, match="model.loss='simpo' uses no reference"):
        Preference(str(stand_in("llama")), loss="simpo", reference="copy")


# -------------------------------------------------------------------------------- one step, no trainer
def _batch(task, tmp_path, rows=PAIRS):
    tmp_path.mkdir(exist_ok=True)
    dm = DataModule(format="preference", objective="preference", train_files=write_jsonl(tmp_path / "p.jsonl", rows),
                    tokenizer=task.tokenizer, batch_size=len(rows), cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    data = dm._dataset("train")
    return dm._collator("train")([data[i] for i in range(len(data))])  # the file's order


def _task(stand_in, backend="scratch", **kwargs):
    task = Preference(str(stand_in("llama")), backend=backend, **kwargs)
    task.configure_model()
    return task


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_sequence_logps_equal_a_plain_hf_forward(stand_in, tmp_path, backend):
    import transformers

    task = _task(stand_in, backend, adapter=LORA)
    batch = _batch(task, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(stand_in("llama"), dtype=torch.float32)
    logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    labels = batch["labels"][:, 1:]
    picked = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = (picked * (labels != -100)).sum(-1)
    logps, n = task.sequence_logps(batch)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    assert n.tolist() == (labels != -100).sum(-1).tolist()


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_lora_gradients_match_the_materialized_head(stand_in, tmp_path, backend, monkeypatch):
    task = _task(stand_in, backend, adapter=LORA)
    with torch.no_grad():  # LoRA B starts at 0: move it so the reference and the policy differ
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = _batch(task, tmp_path)

    def grads():
        task.model.zero_grad()
        task.step(batch, "train", 0)["loss"].backward()
        return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}

    chunked = grads()
    assert task.output_head() is not None
    monkeypatch.setattr(Preference, "output_head", lambda self, model=None: None)
    plain = grads()
    assert chunked.keys() == plain.keys() and any("lora_A" in k for k in chunked)
    for k in chunked:
        torch.testing.assert_close(chunked[k], plain[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_step_zero_is_ln2_for_every_reference(stand_in, tmp_path, backend):
    adapter = _task(stand_in, backend, adapter=LORA)
    frozen = _task(stand_in, backend, reference="copy")
    batch = _batch(adapter, tmp_path)
    outs = {"adapter": adapter.step(batch, "train", 0), "copy": frozen.step(batch, "train", 0)}
    B = len(PAIRS)
    with torch.no_grad():
        ref = frozen.sequence_logps(batch)[0]
    rows = [{**r, "ref_chosen_logps": ref[i].item(), "ref_rejected_logps": ref[B + i].item()}
            for i, r in enumerate(PAIRS)]  # fmt: skip
    pre = _task(stand_in, backend, reference="precomputed")
    outs["precomputed"] = pre.step(_batch(pre, tmp_path / "pre", rows), "train", 0)
    for name, out in outs.items():
        assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6), name
        assert out["rewards_chosen"].abs().max() < 1e-6 and out["rewards_rejected"].abs().max() < 1e-6, name
        torch.testing.assert_close(out["logps_chosen"], outs["adapter"]["logps_chosen"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- full runs
def _fit(tmp_path, name, stand_in, model, batch_size=4, accumulate=1, max_steps=-1, rows=PAIRS * 2):
    folder = tmp_path / name
    folder.mkdir()
    data = {"format": "preference", "train_files": write_jsonl(folder / "p.jsonl", rows), "batch_size": batch_size}
    trainer = {"max_steps": max_steps, "max_epochs": 1, "accumulate_grad_batches": accumulate,
               "callbacks": [save_grads(folder / "grads.pt")]}  # fmt: skip
    fit(recipe(folder, "Preference", {"pretrained": str(stand_in("llama")), **model}, data, trainer=trainer))
    return folder


def test_accumulation_weighs_pairs(tmp_path, stand_in):
    """8 pairs as 2 x 4 or as 8 x 1 (accumulated): the same gradients and step loss (lr 0: weights stay)."""
    model = {"adapter": LORA, "lr": 0.0, "schedule": "constant"}
    big = _fit(tmp_path, "big", stand_in, model, batch_size=8)
    acc = _fit(tmp_path, "acc", stand_in, model, batch_size=1, accumulate=8)
    a, b = torch.load(big / "grads.pt"), torch.load(acc / "grads.pt")
    assert sorted(a) == sorted(b) == [1]
    for k, g in a[1].items():
        torch.testing.assert_close(b[1][k], g, rtol=1e-5, atol=1e-7)
    big_loss, acc_loss = logged(big / "run", "train/loss_step"), logged(acc / "run", "train/loss_step")
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)


def test_metrics_logged_with_trl_names(tmp_path, stand_in):
    folder = _fit(tmp_path, "copy", stand_in, {"reference": "copy", "lr": 1e-2}, batch_size=2, max_steps=3)
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "nll/chosen")  # fmt: skip
    metrics = {k: logged(folder / "run", f"train/{k}") for k in names}
    assert all(len(v) == 1 for v in metrics.values()), metrics
    assert next(iter(metrics["rewards/margins"].values())) != 0  # the policy moved away from the reference


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_reference_weights_bitwise_unchanged_by_training(stand_in, tmp_path, reference):
    task = _task(stand_in, reference=reference, adapter=LORA if reference == "adapter" else None)
    batch = _batch(task, tmp_path)
    ref_model = task._frozen[0] if reference == "copy" else task.model
    frozen = {n: p.detach().clone() for n, p in ref_model.named_parameters() if "lora_" not in n}
    trained = [p for p in task.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    opt = torch.optim.SGD(trained, lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        task.step(batch, "train", 0)["loss"].backward()
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trained, strict=True))  # the policy trained
    for n, p in ref_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert task.step(batch, "train", 0)["rewards_chosen"].abs().max() > 0  # and now differs from its reference


@pytest.mark.slow
def test_resume_after_sigkill_equals_straight_run(tmp_path, stand_in):
    """Full fine-tuning against a frozen copy: killed mid-epoch and resumed, the weights and step losses equal an
    uninterrupted run's (the copy is rebuilt from the pretrained weights, not from the checkpoint)."""
    from tests.tasks.helpers import fit_killed_mid_run, weights

    n = 6
    rows = [{**r, "prompt": r["prompt"] + f" {i}"} for i, r in enumerate(PAIRS * 3)]  # 12 pairs: 6 batches

    def make(name):
        folder = tmp_path / name
        folder.mkdir()
        data = {"format": "preference", "train_files": write_jsonl(folder / "p.jsonl", rows), "batch_size": 2}
        model = {"pretrained": str(stand_in("llama")), "reference": "copy", "lr": 3e-3}
        return recipe(folder, "Preference", model, data, trainer={"max_steps": n + 4},
                      last_checkpoint={"every_n_train_steps": 2})  # fmt: skip

    straight, killed = make("straight"), make("killed")
    fit(straight)
    assert n // 2 <= fit_killed_mid_run(killed, tmp_path / "killed/run", n // 2) < n + 4
    fit(killed, "--ckpt_path", "last")
    wa, wb = (weights(tmp_path / k / "run/checkpoints/last.ckpt") for k in ("straight", "killed"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    la, lb = (logged(tmp_path / k / "run", "train/loss_step") for k in ("straight", "killed"))
    assert sorted(la) == list(range(n + 4)) and lb == pytest.approx(la, abs=1e-6)
    ma, mb = (logged(tmp_path / k / "run", "train/rewards/margins") for k in ("straight", "killed"))
    assert mb == pytest.approx(ma, abs=1e-6)  # the epoch metric continues across the kill


@pytest.mark.slow
def test_bundled_recipe_ranks_held_out_pairs(tmp_path):
    """The dpo-quickstart recipe, 12 steps: its held-out pairs (no prompt shared with training) are ranked right
    far more often than chance (at step 0 policy = reference: every reward is 0)."""
    from finetune.cli import main

    args = ["fit", "--config", "dpo-quickstart", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_steps=12", "--trainer.val_check_interval=12", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false", "--model.init_args.max_new_tokens=1",
            f"--data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(args) == 0
    accuracy = logged(tmp_path / "run", "val/rewards/accuracies")
    assert list(accuracy) == [11] and accuracy[11] > 0.8, accuracy


def test_lora_run_exports_like_every_task(tmp_path, stand_in):
    """A DPO LoRA run exports merged and as a PEFT adapter (task_type CAUSAL_LM); both reload in plain
    transformers/peft with the toolkit's logits."""
    import json

    from tests.export.test_export import check_exports

    folder = _fit(tmp_path, "dpo", stand_in, {"adapter": "lora", "lr": 3e-2}, batch_size=4, max_steps=4)
    check_exports(tmp_path, folder / "run", "llama", expect_base_folder=True)
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
