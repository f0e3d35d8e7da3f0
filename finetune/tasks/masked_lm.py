"""Masked language modelling (BERT-style), e.g. domain adaptation of an encoder on raw text."""

import torch
from torch import nn

from finetune.tasks.base import Task
from finetune.tasks.causal_lm import token_loss
from finetune.tasks.head_loss import fusable_head, head_loss
from finetune.tasks.metrics import LM_METRICS


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of the non-special tokens; of those, 80% become the mask token, 10% a
    random token, 10% stay. Returns (masked inputs, labels with -100 on unpicked tokens), both (B, T)."""
    draw = lambda: torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # noqa: E731
    picked = (draw() < probability) & ~special_tokens_mask.bool()
    labels = input_ids.masked_fill(~picked, -100)
    u = draw()
    to_mask = picked & (u < 0.8)
    to_random = picked & (u >= 0.8) & (u < 0.9)
    random = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    x = input_ids.masked_fill(to_mask, mask_token_id)
    return torch.where(to_random, random, x), labels


class MaskedLM(Task):
    """Predicts randomly masked tokens. Masks are drawn on the device from a generator seeded by (seed, epoch, batch
    index), so a resumed run masks as the uninterrupted one and every evaluation masks the same tokens.

    Args:
        mlm_probability: the fraction of (non-special) tokens to mask.
        mask_seed: the seed the masks are drawn from.
    """

    objective = "masked_lm"
    auto_class = "AutoModelForMaskedLM"
    METRICS = LM_METRICS

    def __init__(self, *args, mlm_probability: float = 0.15, mask_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"model.tokenizer: {self.tokenizer_path!r} has no mask token; masked LM needs one")

    def model_overrides(self) -> dict:
        return {} if self.is_hf else {"head": "mlm"}

    def output_head(self) -> nn.Linear | None:
        """The MLM head's decoder (after its transform), when the chunked loss can apply it (see ``fusable_head``)."""
        head = self.model.get_output_embeddings() if self.is_hf else getattr(self.model, "mlm_head", None)
        return fusable_head(self, head if self.is_hf else getattr(head, "decoder", None))

    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        epoch = self.current_epoch if stage == "train" else {"val": -1, "test": -2}[stage]
        g = torch.Generator(device=batch["input_ids"].device)
        g.manual_seed(hash((self.hparams.mask_seed, epoch, batch_idx)) & (2**63 - 1))
        x, labels = mask_tokens(
            batch["input_ids"],
            batch["special_tokens_mask"],
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            probability=self.hparams.mlm_probability,
            generator=g,
        )
        kw = {"attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            kw["token_type_ids"] = batch["token_type_ids"]
        forward = lambda: self.model(input_ids=x, **kw).logits if self.is_hf else self.model(x, **kw).logits  # noqa: E731
        evaluating = stage != "train"
        head = self.output_head()
        if head is not None:  # the chunked loss: no (B, T, V) logits are ever held
            loss, n, preds = head_loss(forward, head, labels, preds=evaluating)
        else:
            logits = forward()  # (B, T, V)
            loss, n = token_loss(logits, labels)
            preds = logits.argmax(-1) if evaluating else None
        out = {"loss": loss, "n_tokens": n, "batch_size": labels.size(0)}
        if evaluating:
            out |= {"preds": preds.flatten(), "targets": labels.flatten()}
        return out
