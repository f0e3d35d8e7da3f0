"""Preference tuning: DPO and its relatives (IPO, hinge, robust DPO, SimPO, ORPO) on pairs of chosen and rejected
completions, with TRL's formulas and metric names.

Chosen and rejected run in one forward (the DataModule collates 2B rows: the chosen, then the rejected); the
per-sequence log-probs come from the chunked output head (``linear_token_logprobs``), so no (2B, T, V) logits are
held. The reference is the same model with its adapter disabled (no second copy), a frozen copy (full fine-tuning),
log-probs precomputed in the data, or none (SimPO, ORPO).
"""

import contextlib
import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from finetune.nn.loss import linear_token_logprobs, token_logprobs
from finetune.tasks.causal_lm import CausalLM, next_token_labels
from finetune.tasks.metrics import PREFERENCE_METRICS

Loss = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]
Reference = Literal["auto", "adapter", "copy", "precomputed", "none"]
NO_REFERENCE = ("simpo", "orpo")  # losses defined without a reference model
LENGTH_NORMALIZED = ("ipo", "simpo", "orpo")  # losses over per-token mean log-probs (as TRL's)


def pair_losses(
    loss: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, all (B,), from per-sequence log-probs (B,) summed over
    the completions; ``LENGTH_NORMALIZED`` losses divide them by the completions' token ``lengths`` (chosen,
    rejected; default 1). Rewards: beta x the summed log-ratio (DPO family), beta x the mean log-prob (SimPO, ORPO).
    TRL's formulas:
    ``DPOTrainer`` (sigmoid, ipo, hinge, robust), ``CPOTrainer`` (simpo), ``ORPOTrainer`` (orpo, without its NLL
    term, which the task adds). ``sigmoid`` with ``label_smoothing`` is conservative DPO (cDPO)."""
    ls = label_smoothing
    n_c, n_r = lengths if lengths is not None else (1, 1)
    if loss in NO_REFERENCE:
        chosen, rejected = chosen / n_c, rejected / n_r
        rewards = beta * chosen, beta * rejected
        if loss == "simpo":
            z = beta * (chosen - rejected) - simpo_gamma
            return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z), *rewards
        # orpo: log odds(chosen) - log odds(rejected), log odds(p) = log p - log(1 - p); p < 1 kept finite
        c, r = chosen.clamp(max=-1e-7), rejected.clamp(max=-1e-7)
        log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))
        return -beta * F.logsigmoid(log_odds), *rewards
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    z = beta * delta
    if loss == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    elif loss == "robust":
        losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    elif loss == "hinge":
        losses = torch.relu(1 - z)
    elif loss == "ipo":
        losses = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    return losses, beta * chosen_ratio, beta * rejected_ratio


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model with every peft adapter layer (and ``modules_to_save`` copy) off: the base it started from. The
    trainable flags, which peft's switch clears, are put back after."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """No gradient and no dropout, then the model's modes back as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


class Preference(CausalLM):
    """Tunes a causal LM on preference pairs (``format: preference`` data).

    Args:
        loss: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust`` (DPO robust to flipped labels, with
            ``label_smoothing``), ``simpo`` or ``orpo`` (the last two need no reference).
        beta: the temperature of the implicit reward (DPO's beta; IPO's tau; SimPO's and ORPO's beta).
        label_smoothing: the assumed fraction of flipped pairs (cDPO for ``sigmoid``, ``robust``, ``simpo``), < 0.5.
        simpo_gamma: SimPO's target reward margin.
        sft_weight: weight of the chosen completions' token-mean NLL added to the loss (ORPO always adds it with
            weight 1; this adds on top).
        reference: what the policy is compared with: ``adapter`` (the same model with its adapter disabled; no
            second copy), ``copy`` (a frozen copy of the starting model), ``precomputed`` (the data's
            ``ref_chosen_logps``/``ref_rejected_logps`` columns), ``none`` (SimPO, ORPO) or ``auto``: ``none`` for
            SimPO/ORPO, else ``adapter`` with an adapter and ``copy`` without.
    """

    objective = "preference"
    METRICS = PREFERENCE_METRICS

    def __init__(
        self,
        *args,
        loss: Loss = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        sft_weight: float = 0.0,
        reference: Reference = "auto",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss not in Loss.__args__:
            raise ValueError(f"model.loss={loss!r}; expected one of {list(Loss.__args__)}")
        if reference not in Reference.__args__:
            raise ValueError(f"model.reference={reference!r}; expected one of {list(Reference.__args__)}")
        if beta <= 0:
            raise ValueError(f"model.beta={beta}; expected a positive number")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"model.label_smoothing={label_smoothing}; expected a number in [0, 0.5)")
        if reference == "auto":
            reference = "none" if loss in NO_REFERENCE else "adapter" if self.adapter_spec is not None else "copy"
        if reference == "none" and loss not in NO_REFERENCE:
            raise ValueError(f"model.loss={loss!r} compares the policy with a reference; set model.reference to "
                             "adapter, copy or precomputed, or use a reference-free loss (simpo, orpo)")  # fmt: skip
        if reference != "none" and loss in NO_REFERENCE:
            raise ValueError(f"model.loss={loss!r} uses no reference; set model.reference=none (or auto)")
        if reference == "adapter" and self.adapter_spec is None:
            raise ValueError("model.reference=adapter needs an adapter (model.adapter); full fine-tuning uses copy")
        self.reference = reference
        self._frozen: list[nn.Module] = []  # the frozen copy, outside the module tree (never saved or optimized)

    def configure_model(self) -> None:
        built = self.model is None
        super().configure_model()
        if built and self.reference == "copy":
            self._frozen = [copy.deepcopy(self.model).eval().requires_grad_(False)]

    def stage_metric_names(self, stage: str) -> list[str]:
        return self.metric_names  # all cheap (no argmax over the vocabulary): every stage tracks them

    # ------------------------------------------------------------------------------------------------ log-probs
    def sequence_logps(self, batch: dict, model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed completion log-probs (2B,), completion tokens (2B,)) of ``model`` (default: the policy)."""
        labels = next_token_labels(batch["labels"])  # (2B, T)
        head = self.output_head(model)
        if head is not None:  # chunked over the head: no (2B, T, V) logits
            tokens = linear_token_logprobs(self.hidden_states(batch, model), head.weight, labels)  # (2B, T)
        else:
            tokens = token_logprobs(self.logits(batch, model), labels)
        return tokens.sum(-1), (labels != -100).sum(-1)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) summed completion log-probs of the reference: no gradient, dropout off."""
        if self.reference == "precomputed":
            if "ref_chosen_logps" not in batch:
                raise ValueError("model.reference=precomputed: the data has no ref_chosen_logps/ref_rejected_logps "
                                 "columns (map them with data.fields)")  # fmt: skip
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
        if self.reference == "adapter":
            with evaluating(self.model), adapters_disabled(self.model):
                return self.sequence_logps(batch)[0]
        frozen = self._frozen[0]
        p = next(self.model.parameters())
        frozen.to(device=p.device, dtype=p.dtype)  # the policy's device and precision (a no-op once there)
        with evaluating(frozen):
            return self.sequence_logps(batch, frozen)[0]

    # ---------------------------------------------------------------------------------------------------- step
    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        h = self.hparams
        logps, n = self.sequence_logps(batch)  # (2B,), (2B,)
        B = logps.size(0) // 2
        n = n.clamp(min=1)
        ref = self.reference_logps(batch) if self.reference != "none" else None  # (2B,)
        losses, rewards_c, rewards_r = pair_losses(
            h.loss, logps[:B], logps[B:], *(ref[:B], ref[B:]) if ref is not None else (None, None),
            lengths=(n[:B], n[B:]), beta=h.beta, label_smoothing=h.label_smoothing, simpo_gamma=h.simpo_gamma,
        )  # fmt: skip
        nll = -logps[:B] / n[:B]  # (B,) token-mean NLL of each chosen completion
        sft = h.sft_weight + (1.0 if h.loss == "orpo" else 0.0)
        loss = losses.mean() + sft * nll.mean() if sft else losses.mean()
        rewards_c, rewards_r = rewards_c.detach(), rewards_r.detach()
        return {
            "loss": loss,
            "n_tokens": torch.tensor(B, device=loss.device),  # a mean over pairs: accumulation weighs pairs
            "batch_size": B,
            "rewards_chosen": rewards_c,
            "rewards_rejected": rewards_r,
            "logps_chosen": logps[:B].detach(),
            "logps_rejected": logps[B:].detach(),
            "nll_chosen": nll.detach(),
            "chosen_tokens": n[:B],
        }
