"""Sequence-to-sequence (T5-style): teacher-forced loss, and ROUGE-L/BLEU on generated text."""

import torch
from torch import nn

from finetune.generation import generate
from finetune.tasks.base import Task
from finetune.tasks.causal_lm import token_loss
from finetune.tasks.head_loss import fusable_head, head_loss
from finetune.tasks.metrics import SEQ2SEQ_METRICS


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs (B, T) from labels (B, T): the start token, then the labels shifted right (-100 -> pad)."""
    x = labels.new_full(labels.shape, pad_id)
    x[:, 0] = start_id
    x[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return x


class Seq2Seq(Task):
    """Encoder-decoder training on (source, target) pairs.

    Args:
        max_new_tokens: the longest generated target (for ROUGE-L/BLEU and ``predict``).
    """

    objective = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    METRICS = SEQ2SEQ_METRICS

    def __init__(self, *args, max_new_tokens: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)

    def logits(self, batch: dict) -> torch.Tensor:
        dec = shift_right(batch["labels"], self.model.config.decoder_start_token_id, self.tokenizer.pad_token_id)
        if self.is_hf:
            return self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec
            ).logits
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)

    def output_head(self) -> nn.Linear | None:
        """The decoder's output head, when the chunked loss can apply it (see ``fusable_head``)."""
        head = self.model.get_output_embeddings() if self.is_hf else self.model.lm_head
        return fusable_head(self, head)

    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        labels = batch["labels"]  # (B, T)
        evaluating = stage != "train"
        head = self.output_head()
        if head is not None:  # the chunked loss: no (B, T, V) logits are ever held
            loss, n, preds = head_loss(lambda: self.logits(batch), head, labels, preds=evaluating)
        else:
            logits = self.logits(batch)  # (B, T, V)
            loss, n = token_loss(logits, labels)
            preds = logits.argmax(-1) if evaluating else None
        out = {"loss": loss, "n_tokens": n, "batch_size": labels.size(0)}
        if evaluating:
            out |= {"preds": preds.flatten(), "targets": labels.flatten()}
        if self.needs(stage, "generated"):
            out["generated"] = self.decode(self.generate_ids(batch["input_ids"], batch["attention_mask"]))
            out["references"] = self.decode(labels.masked_fill(labels == -100, self.tokenizer.pad_token_id))
        return out

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Greedy targets (B, <= max_new_tokens) for sources (B, S)."""
        n, tok = self.hparams.max_new_tokens, self.tokenizer
        if self.is_hf:
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, do_sample=False
            )
            return out[:, 1:]  # drop the decoder start token
        out = generate(
            self.model, input_ids, attention_mask, max_new_tokens=n, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        return out[:, 1:]  # drop the decoder start token

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        outputs = self.decode(self.generate_ids(batch["input_ids"], batch["attention_mask"]))
        sources = self.decode(batch["input_ids"])
        rows = batch["row"].tolist()
        return [{"row": r, "source": s, "output": o} for r, s, o in zip(rows, sources, outputs, strict=True)]
