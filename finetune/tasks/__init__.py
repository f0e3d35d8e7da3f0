"""Training tasks: one LightningModule per objective over a shared base (``Task``)."""

from finetune.tasks.base import Task
from finetune.tasks.causal_lm import CausalLM
from finetune.tasks.classification import Classification
from finetune.tasks.masked_lm import MaskedLM
from finetune.tasks.seq2seq import Seq2Seq

__all__ = ["CausalLM", "Classification", "MaskedLM", "Seq2Seq", "Task"]
