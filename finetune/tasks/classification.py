"""Sequence classification (single label, optional text pair) on any encoder or decoder backbone."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from finetune.models import Bert
from finetune.models.base import DecoderLM
from finetune.tasks.base import Task
from finetune.tasks.metrics import CLASSIFICATION_METRICS


class LastTokenClassifier(nn.Module):
    """A from-scratch decoder with a classification head on the last real token (as HF's *ForSequenceClassification).

    The language-model head is dropped: it is not trained and would only hold memory.
    """

    def __init__(self, decoder: DecoderLM, num_labels: int) -> None:
        super().__init__()
        self.decoder = decoder
        decoder.lm_head = None
        width = getattr(decoder, decoder.embedding).embedding_dim
        self.score = nn.Linear(width, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=decoder.init_std)

    def hf_name(self, name: str) -> str | None:
        """Names as in HF's ``*ForSequenceClassification``: the decoder's own, and ``score``."""
        if name.startswith("decoder."):
            return self.decoder.hf_name(name.removeprefix("decoder."))
        return name if name.startswith("score.") else None

    def hf_layout(self) -> list[tuple[str, str, bool]]:
        return [(f"decoder.{n}", h, t) for n, h, t in self.decoder.hf_layout()] + [
            ("score.weight", "score.weight", False)
        ]

    def forward(self, input_ids, *, attention_mask) -> torch.Tensor:
        h = self.decoder.features(input_ids, attention_mask=attention_mask)  # (B, T, C)
        last = attention_mask.sum(1) - 1  # right padding: the last real token of each row
        return self.score(h[torch.arange(h.size(0), device=h.device), last])  # (B, num_labels)


class Classification(Task):
    """One label per text (or text pair); label names come from the training data (see ``data.labels``)."""

    objective = "classification"
    auto_class = "AutoModelForSequenceClassification"
    METRICS = CLASSIFICATION_METRICS

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label_names: list[str] | None = None

    def class_names(self) -> list[str]:
        if self.label_names is None:
            dm = self.datamodule
            names = getattr(dm, "label_names", None)
            if not names:
                raise RuntimeError("classification needs label names: run with a datamodule whose setup found them")
            self.label_names = list(names)
        return self.label_names

    def num_classes(self) -> int:
        return len(self.class_names())

    def model_overrides(self) -> dict:
        id2label = dict(enumerate(self.class_names()))
        if self.is_hf:
            return {
                "num_labels": len(id2label),
                "id2label": id2label,
                "label2id": {v: k for k, v in id2label.items()},
                "pad_token_id": self.pad_token_id,  # HF pools the last token that is not padding
            }
        if self.model_type() == "bert":  # our BERT has its own (pooled) classification head
            return {"head": "classification", "id2label": id2label}
        return {}

    def build_model(self, *, empty: bool = False) -> nn.Module:
        model = super().build_model(empty=empty)
        if self.is_hf or isinstance(model, Bert):
            return model
        if isinstance(model, DecoderLM):
            with torch.device("meta") if empty else contextlib.nullcontext():
                return LastTokenClassifier(model, self.num_classes())
        raise ValueError(
            f"classification from scratch supports BERT and decoder backbones, not {type(model).__name__}; "
            "use backend: hf"
        )

    def logits(self, batch: dict) -> torch.Tensor:
        if self.is_hf:
            kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            return self.model(**kw).logits
        if isinstance(self.model, LastTokenClassifier):
            return self.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        return self.model(
            batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids")
        ).logits

    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        logits = self.logits(batch)  # (B, num_labels)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels)
        return {
            "loss": loss,
            "n_tokens": labels.numel(),
            "batch_size": labels.numel(),
            "preds": logits.argmax(-1),
            "targets": labels,
        }

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        probs = self.logits(batch).float().softmax(-1)  # (B, num_labels)
        names = self.class_names()
        return [
            {"row": r, "label": names[int(p.argmax())], "probability": float(p.max())}
            for r, p in zip(batch["row"].tolist(), probs, strict=True)
        ]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["label_names"] = self.class_names()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("label_names")
        if saved is not None and self.label_names is not None and saved != self.label_names:
            raise ValueError(f"the checkpoint's labels {saved} differ from the data's labels {self.label_names}")
        self.label_names = saved or self.label_names
