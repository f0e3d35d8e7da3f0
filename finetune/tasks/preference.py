"""Preference tuning: DPO and its relatives (IPO, hinge, robust DPO, SimPO, ORPO) on pairs of chosen and rejected
completions, with TRL's formulas and metric names.

Chosen and rejected run in one forward (the DataModule collates 2B rows: the chosen, then the rejected); the
per-sequence log-probs come from the chunked output head (``linear_token_logprobs``), so no (2B, T, V) logits are
held. The reference is the same model with its adapter disabled (no second copy), a frozen copy (full fine-tuning),
log-probs precomputed (the data's columns, or one pass before training, cached), or none (SimPO, ORPO).
"""

import contextlib
import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from finetune.nn.loss import linear_token_logprobs, token_logprobs
from finetune.tasks import reference_cache
from finetune.tasks.base import hold_gathered
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
        sft_weight: weight of the chosen sequences' NLL added to the loss (ORPO always adds it with weight 1; this
            adds on top): a mean over the batch's chosen tokens, as TRL's ``sft`` loss, CPOTrainer's and
            ORPOTrainer's NLL terms.
        sft_on_prompt: whether that NLL also covers the prompt tokens; ``None``: as TRL, yes for ``orpo``
            (ORPOTrainer's NLL covers prompt and response) and no otherwise (the completion only).
        reference: what the policy is compared with: ``adapter`` (the same model with its adapter disabled; no
            second copy), ``copy`` (a frozen copy of the starting model), ``precomputed`` (the data's
            ``ref_chosen_logps``/``ref_rejected_logps`` columns; without them, one no-grad pass over every train and
            validation row before the first step, by the starting model (its adapter disabled), cached by data and
            model: full fine-tuning with one model in memory), ``none`` (SimPO, ORPO) or ``auto``: ``none`` for
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
        sft_on_prompt: bool | None = None,
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
        if built and self.reference == "precomputed":
            # The starting weights, fingerprinted before a resumed run's checkpoint is loaded into them.
            precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
            self._reference_key = reference_cache.model_fingerprint(
                self.model, backend=self.hparams.backend, precision=precision, adapter=self.adapter_spec is not None
            )

    def parallelize(self, model: nn.Module) -> None:
        """The frozen copy is taken here, before the policy is sharded (an FSDP2 module cannot be deep-copied), and
        sharded the same way: each rank holds its share of both."""
        if self.reference == "copy" and model is self.model and not self._frozen:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            super().parallelize(frozen)
            self._frozen = [frozen]
        super().parallelize(model)

    # FSDP2: evaluation holds the frozen copy gathered too (ranks make different numbers of forward passes).
    def on_validation_start(self) -> None:
        super().on_validation_start()
        hold_gathered(self._frozen[0] if self._frozen else None, True)

    def on_validation_end(self) -> None:
        super().on_validation_end()
        hold_gathered(self._frozen[0] if self._frozen else None, False)

    def on_test_start(self) -> None:
        super().on_test_start()
        hold_gathered(self._frozen[0] if self._frozen else None, True)

    def on_test_end(self) -> None:
        super().on_test_end()
        hold_gathered(self._frozen[0] if self._frozen else None, False)

    def on_fit_start(self) -> None:
        dm = self.datamodule
        if self.reference == "precomputed" and dm is not None:
            splits = dm.fit_splits()
            for split, (data, collate) in splits.items():
                if "ref_chosen_logps" not in data.dataset.column_names:
                    chosen, rejected = self._cached_reference_logps(split, data, collate)
                    dm.add_columns(split, {"ref_chosen_logps": chosen.numpy(), "ref_rejected_logps": rejected.numpy()})

    # ----------------------------------------------------------------------------------- precomputed reference
    def _cached_reference_logps(self, split: str, data, collate) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen (N,), rejected (N,)) reference log-probs of a split's rows: read from the cache when an entry
        for these rows and starting weights exists (rank 0 reads, every rank gets them), else computed in one pass
        (each data-parallel rank its share of the rows, then gathered) and written by rank 0."""
        import datasets

        strategy = self.trainer.strategy
        root = getattr(self.datamodule, "cache_dir", None) or datasets.config.HF_DATASETS_CACHE
        folder = reference_cache.entry(root, self._reference_key, reference_cache.rows_fingerprint(data.dataset))
        primary = self.global_rank == 0
        if strategy.broadcast((folder / reference_cache.FILE).is_file() if primary else None):
            return strategy.broadcast(reference_cache.read(folder, len(data)) if primary else None)
        if (
            self.trainer.ckpt_path is not None
            and self.adapter_spec is None
            and not strategy.restore_checkpoint_after_setup
        ):
            raise ValueError(f"model.reference=precomputed: the cached reference log-probs of the {split} split "
                             f"({folder}) are gone, and this resumed run's weights are already trained; restore the "
                             "cache, or start the run afresh")  # fmt: skip
        chosen, rejected = self.compute_reference_logps(data, collate)
        if primary:
            reference_cache.write(folder, chosen, rejected)
        strategy.barrier()
        return chosen, rejected

    def compute_reference_logps(self, data, collate) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad pass of the starting model (adapter disabled, dropout off, the trainer's precision) over
        ``data``: (chosen (N,), rejected (N,)) summed completion log-probs, float64 on the CPU, on every rank."""
        strategy, dm = self.trainer.strategy, self.datamodule
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        replicas, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        n, size = len(data), dm.eval_batch_size
        share = -(-n // replicas)  # every rank the same number of rows (and forwards: FSDP2 gathers in each)
        rows = [min(rank + k * replicas, n - 1) for k in range(share)]  # (share,) strided; the last row repeats
        off = adapters_disabled(self.model) if self.adapter_spec is not None else contextlib.nullcontext()
        parts = []
        with evaluating(self.model), off, self.trainer.precision_plugin.forward_context():
            for start in range(0, share, size):
                batch = strategy.batch_to_device(collate(data.__getitems__(rows[start : start + size])))
                parts.append(self.sequence_logps(batch)[0].double().view(2, -1))  # (2, b): chosen, rejected
        mine = torch.cat(parts, 1) if parts else torch.zeros(2, 0, dtype=torch.float64, device=self.device)
        if replicas == 1 and self.trainer.world_size == 1:
            return mine[0].cpu(), mine[1].cpu()
        every = strategy.all_gather(mine)  # (W, 2, share), one slice per process
        ranks = strategy.all_gather(torch.tensor(rank, device=mine.device))  # (W,) the data-parallel rank of each
        out = torch.empty(2, share * replicas, dtype=torch.float64)
        for r in range(replicas):  # tensor-parallel ranks computed the same rows: take the first of each
            out[:, r::replicas] = every[int((ranks == r).nonzero()[0])].cpu()
        return out[0, :n], out[1, :n]

    def stage_metric_names(self, stage: str) -> list[str]:
        return self.metric_names  # all cheap (no argmax over the vocabulary): every stage tracks them

    # ------------------------------------------------------------------------------------------------ log-probs
    def token_logps(self, batch: dict, labels: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """(2B, T) log-probs of the next-token ``labels`` (2B, T) under ``model`` (default: the policy); 0 where a
        label is -100."""
        head = self.output_head(model)
        if head is not None:  # chunked over the head: no (2B, T, V) logits
            return linear_token_logprobs(self.hidden_states(batch, model), head.weight, labels)
        return token_logprobs(self.logits(batch, model), labels)

    def sequence_logps(self, batch: dict, model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed completion log-probs (2B,), completion tokens (2B,)) of ``model`` (default: the policy)."""
        labels = next_token_labels(batch["labels"])  # (2B, T)
        return self.token_logps(batch, labels, model).sum(-1), (labels != -100).sum(-1)

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
            logps = self.sequence_logps(batch, frozen)[0]
        if isinstance(frozen, FSDPModule) and self.trainer.training:  # between steps only its shards stay
            frozen.reshard()  # the root's weights (fully_shard keeps them after forward, for the backward)
        return logps

    # ---------------------------------------------------------------------------------------------------- step
    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        h = self.hparams
        sft = h.sft_weight + (1.0 if h.loss == "orpo" else 0.0)
        completion = next_token_labels(batch["labels"])  # (2B, T)
        on_prompt = sft and (h.sft_on_prompt if h.sft_on_prompt is not None else h.loss == "orpo")
        # With the prompt in the NLL, one pass gives every real token's log-prob; the completions' are among them.
        seq = (
            next_token_labels(batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)) if on_prompt else None
        )
        tokens = self.token_logps(batch, completion if seq is None else seq)  # (2B, T)
        in_completion = completion != -100  # (2B, T)
        logps, n = (tokens * in_completion).sum(-1), in_completion.sum(-1)  # (2B,), (2B,)
        B = logps.size(0) // 2
        n = n.clamp(min=1)
        ref = self.reference_logps(batch) if self.reference != "none" else None  # (2B,)
        losses, rewards_c, rewards_r = pair_losses(
            h.loss, logps[:B], logps[B:], *(ref[:B], ref[B:]) if ref is not None else (None, None),
            lengths=(n[:B], n[B:]), beta=h.beta, label_smoothing=h.label_smoothing, simpo_gamma=h.simpo_gamma,
        )  # fmt: skip
        nll = -logps[:B] / n[:B]  # (B,) token-mean NLL of each chosen completion (the nll/chosen metric)
        loss = losses.mean()
        if sft:  # TRL's NLL term: a mean over the batch's chosen tokens (prompt included for on_prompt)
            in_nll = (in_completion if seq is None else seq != -100)[:B]  # (B, T)
            loss = loss - sft * (tokens[:B] * in_nll).sum() / in_nll.sum().clamp(min=1)
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
