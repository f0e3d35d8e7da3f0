"""Metrics the recipes name, built on ``torchmetrics``: each has a factory and says which step outputs it reads.

Every metric accumulates state over the whole epoch and is synced across processes by ``torchmetrics`` when it is
computed, so epoch values are exact (not averages of per-batch values).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.text import BLEUScore, ROUGEScore
from torchmetrics.utilities.data import dim_zero_sum


class TokenMean(MeanMetric):
    """The mean of per-batch values weighted by their token counts; update with ``(mean, n_tokens)``.

    ``MeanMetric`` without its NaN check: the check reads the value on the host (a device sync every training step)
    and drops NaN values from the mean, which would hide a diverged run; here a NaN loss makes a NaN epoch loss.
    (``nan_strategy="disable"`` skips the check but, in torchmetrics 1.9, also drops the weights.)
    """

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        weight = torch.broadcast_to(torch.as_tensor(weight, dtype=self.dtype, device=self.device), value.shape)
        self.mean_value += (value * weight).sum()
        self.weight += weight.sum()


def summed_states(metrics) -> dict[str, dict[str, torch.Tensor]]:
    """The accumulated states of a ``MetricCollection``'s sum-reduced metrics (``TokenMean``'s), summed over
    processes (a collective: every process calls it), keyed by metric name: what a checkpoint saves so that an epoch
    value continues across a resume."""
    out = {}
    for name, metric in metrics.items(keep_base=True):
        if not all(metric._reductions.get(k) is dim_zero_sum for k in metric.metric_state):
            continue  # only sums can be split into "rank 0 holds the total, the others nothing"
        with metric.sync_context(should_unsync=True):  # a no-op without torch.distributed
            out[name] = {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}
    return out


def load_summed_states(metrics, states: dict[str, dict[str, torch.Tensor]], *, primary: bool) -> None:
    """Restores ``summed_states``: the process with ``primary`` takes the totals, the others start from nothing, so
    the synced epoch value is the saved one plus what follows."""
    for name, state in states.items():
        metric = metrics[name] if name in metrics.keys(keep_base=True) else None
        if metric is None:
            continue
        metric.reset()
        if primary:
            for key, value in state.items():
                setattr(metric, key, value.to(device=metric.device, dtype=getattr(metric, key).dtype))


class Perplexity(TokenMean):
    """exp of the token-weighted mean negative log-likelihood; update with ``(mean_nll, n_tokens)``.

    Equal to ``torchmetrics.text.Perplexity`` on the same logits, without a second softmax over the vocabulary.
    """

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class RougeL(ROUGEScore):
    """ROUGE-L F-measure over the generated and reference texts of the epoch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(rouge_keys="rougeL", **kwargs)

    def compute(self) -> torch.Tensor:
        return super().compute()["rougeL_fmeasure"]


class Bleu(BLEUScore):
    """Corpus BLEU-4 of the generated texts, one reference each."""

    def update(self, preds: list[str], target: list[str]) -> None:
        super().update(preds, [[t] for t in target])


@dataclass(frozen=True)
class MetricSpec:
    """``build(num_classes)`` makes the metric; ``inputs(out)`` picks its ``update`` arguments from a step's outputs.

    ``scalar=False`` marks metrics that are saved as files rather than logged (a confusion matrix).
    ``needs`` names outputs that cost extra to produce (e.g. ``"generated"``: decoding text), made only on request.
    """

    build: Callable[[int], Metric]
    inputs: Callable[[dict], tuple]
    scalar: bool = True
    needs: str | None = None


_nll = lambda o: (o["loss"], o["n_tokens"])  # noqa: E731
_tokens = lambda o: (o["preds"], o["targets"])  # noqa: E731

LM_METRICS = {
    "loss": MetricSpec(lambda n: TokenMean(), _nll),
    "perplexity": MetricSpec(lambda n: Perplexity(), _nll),
    "accuracy": MetricSpec(lambda n: MulticlassAccuracy(n, average="micro", ignore_index=-100), _tokens),
}

CLASSIFICATION_METRICS = {
    "loss": MetricSpec(lambda n: TokenMean(), _nll),
    "accuracy": MetricSpec(lambda n: MulticlassAccuracy(n, average="micro"), _tokens),
    "f1": MetricSpec(lambda n: MulticlassF1Score(n, average="macro"), _tokens),
    "precision": MetricSpec(lambda n: MulticlassPrecision(n, average="macro"), _tokens),
    "recall": MetricSpec(lambda n: MulticlassRecall(n, average="macro"), _tokens),
    "confusion_matrix": MetricSpec(lambda n: MulticlassConfusionMatrix(n), _tokens, scalar=False),
}

_texts = lambda o: (o["generated"], o["references"])  # noqa: E731

SEQ2SEQ_METRICS = {
    **LM_METRICS,
    "rouge_l": MetricSpec(lambda n: RougeL(), _texts, needs="generated"),
    "bleu": MetricSpec(lambda n: Bleu(), _texts, needs="generated"),
}


def _pair_mean(key: str):
    return lambda o: (o[key], 1)  # each pair weighs one


# TRL's names; each a mean over the epoch's pairs (``nll/chosen`` over its chosen tokens).
PREFERENCE_METRICS = {
    "loss": MetricSpec(lambda n: TokenMean(), _nll),
    "rewards/chosen": MetricSpec(lambda n: TokenMean(), _pair_mean("rewards_chosen")),
    "rewards/rejected": MetricSpec(lambda n: TokenMean(), _pair_mean("rewards_rejected")),
    "rewards/margins": MetricSpec(lambda n: TokenMean(), lambda o: (o["rewards_chosen"] - o["rewards_rejected"], 1)),
    "rewards/accuracies": MetricSpec(
        lambda n: TokenMean(), lambda o: ((o["rewards_chosen"] > o["rewards_rejected"]).float(), 1)
    ),
    "logps/chosen": MetricSpec(lambda n: TokenMean(), _pair_mean("logps_chosen")),
    "logps/rejected": MetricSpec(lambda n: TokenMean(), _pair_mean("logps_rejected")),
    "nll/chosen": MetricSpec(lambda n: TokenMean(), lambda o: (o["nll_chosen"], o["chosen_tokens"])),
}
