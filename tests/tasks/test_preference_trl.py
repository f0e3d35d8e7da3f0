"""Parity with TRL (a dev dependency): on the same tiny model, reference, data and batch, TRL's DPOTrainer gives
the same first-step loss, rewards and log-probs as ``Preference`` (fp32, 1e-5), on both backends; so do TRL's
ORPOTrainer (orpo, with its NLL over prompt and response) and CPOTrainer (simpo, with its completion NLL as
``sft_weight``); and the SimPO and ORPO formulas equal CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss."""

import types

import pytest
import torch

from finetune.tasks import Preference

pytestmark = pytest.mark.filterwarnings("ignore")

ROWS = [
    {"prompt": "the quick brown", "chosen": " fox jumps over", "rejected": " cat sat on the mat"},
    {"prompt": "a cat sat on", "chosen": " the mat", "rejected": " the moon and the dog"},
    {"prompt": "hello world,", "chosen": " this is a tiny corpus", "rejected": " one two"},
]


LORA = {"preset": "lora", "lora_dropout": 0.0}


def _trl_first_step(policy, loss: str, beta: float, label_smoothing: float, tmp_path):
    """TRL's collated first batch, its LoRA weights (B moved off 0, so policy and reference differ) and its logged
    metrics after one loss computation; TRL's reference is the same model with the adapter disabled, as ours."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(policy)
    model = transformers.AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), beta=beta,
                     loss_type=[loss], label_smoothing=label_smoothing, report_to=[], use_cpu=True)  # fmt: skip
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, peft_config=peft,
                         train_dataset=datasets.Dataset.from_list(ROWS))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    lora = [(n, p) for n, p in trainer.model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for _, p in lora:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss_value = trainer._compute_loss(trainer.model, batch, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return batch, lora, loss_value.item(), metrics


@pytest.mark.parametrize("backend", ["scratch", "hf"])
@pytest.mark.parametrize(("loss", "label_smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.2)])  # fmt: skip
def test_dpo_losses_equal_trl(stand_in, tmp_path, backend, loss, label_smoothing):
    policy = stand_in("llama")
    trl_batch, trl_lora, trl_loss, trl_metrics = _trl_first_step(policy, loss, 0.3, label_smoothing, tmp_path)
    task = Preference(str(policy), backend=backend, loss=loss, beta=0.3, label_smoothing=label_smoothing,
                      adapter=LORA)  # fmt: skip
    task.configure_model()
    ours = [(n, p) for n, p in task.model.named_parameters() if "lora_" in n]
    assert len(ours) == len(trl_lora)
    with torch.no_grad():  # the same LoRA weights, module by module (both in the model's layer order)
        for (name, p), (trl_name, q) in zip(ours, trl_lora, strict=True):
            assert name.split(".")[-3:] == trl_name.split(".")[-3:] and p.shape == q.shape
            p.copy_(q)
    mask = trl_batch["completion_mask"].bool()
    batch = {"input_ids": trl_batch["input_ids"], "attention_mask": trl_batch["attention_mask"],
             "labels": trl_batch["input_ids"].masked_fill(~mask, -100), "padded": True}  # fmt: skip
    out = task.step(batch, "train", 0)
    assert out["loss"].item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    values = {"rewards/chosen": out["rewards_chosen"], "rewards/rejected": out["rewards_rejected"],
              "logps/chosen": out["logps_chosen"], "logps/rejected": out["logps_rejected"],
              "rewards/accuracies": (out["rewards_chosen"] > out["rewards_rejected"]).float()}  # fmt: skip
    for name, value in values.items():
        assert value.mean().item() == pytest.approx(trl_metrics[name], abs=1e-5, rel=1e-5), name
    assert abs(trl_metrics["rewards/margins"]) > 1e-2  # policy and reference differ: the comparison means something


def _ns(**kwargs):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), alpha=0.0, **kwargs)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_equal_trl(loss):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from finetune.tasks.preference import pair_losses

    g = torch.Generator().manual_seed(0)
    sums = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 30  # summed log-probs of 5 pairs
    n = torch.randint(1, 20, (2, 5), generator=g).double()
    ours = pair_losses(loss, sums[0], sums[1], None, None, lengths=(n[0], n[1]), beta=0.2, label_smoothing=0.1,
                       simpo_gamma=0.7)  # fmt: skip
    mean_c, mean_r = sums[0] / n[0], sums[1] / n[1]  # TRL passes per-token means for both (average_log_prob)
    if loss == "simpo":
        ns = _ns(beta=0.2, label_smoothing=0.1, simpo_gamma=0.7, loss_type="simpo")
        theirs = CPOTrainer.cpo_loss(ns, mean_c, mean_r)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10)
    else:
        theirs = ORPOTrainer.odds_ratio_loss(_ns(beta=0.2), mean_c, mean_r)
        torch.testing.assert_close(ours[0], -theirs[0].double(), rtol=1e-6, atol=1e-7)  # TRL: loss = nll - mean
    torch.testing.assert_close(ours[1], theirs[1].double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[2], theirs[2].double(), rtol=1e-6, atol=1e-7)


def _trl_reference_free_first_step(policy, loss: str, tmp_path):
    """TRL's ORPOTrainer (orpo) or CPOTrainer (loss_type simpo, cpo_alpha 0.5) on ROWS: its collated first batch
    (chosen then rejected rows, as ours) and the loss and metrics of one loss computation."""
    import datasets
    import transformers
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(policy)
    model = transformers.AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    common = {"output_dir": str(tmp_path / "trl"), "per_device_train_batch_size": len(ROWS), "beta": 0.2,
              "max_length": 64, "report_to": [], "use_cpu": True}  # fmt: skip
    if loss == "orpo":
        trainer_cls, args = ORPOTrainer, ORPOConfig(**common)
    else:
        args = CPOConfig(**common, loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.1, cpo_alpha=0.5)
        trainer_cls = CPOTrainer
    trainer = trainer_cls(model=model, args=args, processing_class=tok, train_dataset=datasets.Dataset.from_list(ROWS))
    raw = next(iter(trainer.get_train_dataloader()))
    pad = getattr(trainer, "padding_value", None) or getattr(trainer, "pad_token_id", 0)  # ORPO, CPO name it apart
    both = trainer.concatenated_inputs(raw, padding_value=pad)  # (2B, T): chosen, then rejected
    batch = {"input_ids": both["concatenated_input_ids"], "attention_mask": both["concatenated_attention_mask"],
             "labels": both["concatenated_labels"], "padded": True}  # fmt: skip
    trainer.model.train()
    loss_value = trainer.compute_loss(trainer.model, raw)
    return batch, loss_value.item(), {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}


@pytest.mark.parametrize("backend", ["scratch", "hf"])
@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl_trainers(stand_in, tmp_path, backend, loss):
    """Their whole first-step loss (the NLL term included), rewards and per-token mean log-probs (TRL logs means
    for these losses; ours are sums, divided here by the completion lengths)."""
    policy = stand_in("llama")
    batch, trl_loss, trl_metrics = _trl_reference_free_first_step(policy, loss, tmp_path)
    kwargs = {"simpo_gamma": 0.7, "label_smoothing": 0.1, "sft_weight": 0.5} if loss == "simpo" else {}
    task = Preference(str(policy), backend=backend, loss=loss, beta=0.2, **kwargs)
    task.configure_model()
    out = task.step(batch, "train", 0)
    assert out["loss"].item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    B = len(ROWS)
    n = (batch["labels"][:, 1:] != -100).sum(-1)  # (2B,) completion tokens
    values = {"rewards/chosen": out["rewards_chosen"], "rewards/rejected": out["rewards_rejected"],
              "rewards/margins": out["rewards_chosen"] - out["rewards_rejected"],
              "logps/chosen": out["logps_chosen"] / n[:B], "logps/rejected": out["logps_rejected"] / n[B:]}  # fmt: skip
    for name, value in values.items():
        assert value.mean().item() == pytest.approx(trl_metrics[name], abs=1e-5, rel=1e-5), name
    if loss == "orpo":  # TRL's NLL term covers prompt and response: the task's default for orpo
        completion_only = Preference(str(policy), backend=backend, loss=loss, beta=0.2, sft_on_prompt=False)
        completion_only.configure_model()
        assert abs(completion_only.step(batch, "train", 0)["loss"].item() - trl_loss) > 1e-3
