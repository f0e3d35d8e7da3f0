"""Causal language modelling: pretraining and supervised fine-tuning (text, instruction and chat data)."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.collate import prompt_ids
from finetune.data.templates import tokenizer_chat_template, with_end_of_turn
from finetune.generation import context_length, generate
from finetune.models.base import DecoderLM
from finetune.models.hub import SUPPORTED_MODEL_TYPES, family_of
from finetune.nn import build_mask
from finetune.nn.loss import linear_cross_entropy
from finetune.parallel import tensor_parallel_size
from finetune.tasks.base import Task
from finetune.tasks.metrics import LM_METRICS


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled tokens (-100 = ignored) and their count.

    logits: (B, T, V) already aligned with labels (B, T); the loss is computed in fp32.
    """
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss / n.clamp(min=1), n


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: position t predicts token t+1, and the last position has none. (Shifting
    the labels instead of slicing the (B, T, C) states or (B, T, V) logits copies neither.)"""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def packed_mask(segment_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, T) packed-sample numbers -> (B, 1, T, T) bool mask: causal, within one sample and the window (True =
    attend); the same mask our models build, handed to HF models as a 4D attention mask."""
    T = segment_ids.size(1)
    mask, _ = build_mask(
        q_len=T, k_len=T, segment_ids=segment_ids, causal=True, sliding_window=sliding_window,
        device=segment_ids.device,
    )  # fmt: skip
    return mask


class CausalLM(Task):
    """Next-token prediction; the loss covers the tokens the data labels (all, or only responses).

    Args:
        max_new_tokens: tokens generated per prompt by ``predict`` and for the sample printed after ``fit``.
        temperature: sampling temperature for ``predict`` and samples; 0 means greedy.
        top_k: keep only the k most likely tokens when sampling.
        top_p: nucleus sampling threshold.
        sample_prompt: the prompt of the sample generated after ``fit`` (default: the tokenizer's BOS).
    """

    objective = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    METRICS = LM_METRICS

    def __init__(
        self,
        *args,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        sample_prompt: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)

    def _inputs(self, batch: dict) -> dict:
        """The model's keyword inputs; packed rows (``segment_ids``) attend only within their own sample."""
        seg, pos = batch.get("segment_ids"), batch.get("position_ids")
        # Without padding (the collator says so) the mask is dropped: plain causal attention, SDPA's fast path.
        mask = batch.get("attention_mask") if batch.get("padded", True) else None
        if self.is_hf:
            if seg is not None:
                mask = packed_mask(seg, getattr(self.model.config, "sliding_window", None))
            return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": pos}
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": None if seg is not None else mask,
            "position_ids": pos,
            "segment_ids": seg,
        }

    def logits(self, batch: dict, model: nn.Module | None = None) -> torch.Tensor:
        """(B, T, V) logits of ``model`` (default: the task's)."""
        inputs, model = self._inputs(batch), model or self.model
        if self.is_hf:
            return model(**inputs).logits
        return model(inputs.pop("input_ids"), **inputs)

    def hidden_states(self, batch: dict, model: nn.Module | None = None) -> torch.Tensor:
        """(B, T, C) final hidden states of ``model`` (default: the task's), the output head's input."""
        inputs, model = self._inputs(batch), model or self.model
        if self.is_hf:
            return model.base_model(**inputs).last_hidden_state
        return model(inputs.pop("input_ids"), **inputs, head=False)

    def output_head(self, model: nn.Module | None = None) -> nn.Linear | None:
        """The model's output head when the fused loss can stand in for it: a plain bias-free ``nn.Linear`` applied
        to the final hidden states as they are. ``None`` for a head an adapter wraps or trains (``modules_to_save``),
        and for HF models outside our decoder families (some scale or soft-cap their logits). Also ``None`` for an
        HF model under FSDP2: its decoder alone, called outside the root's forward, would find the embedding still
        sharded (ours returns hidden states through its own forward). And ``None`` under tensor parallelism, whose
        head is sharded over the vocabulary and gathers its logits itself."""
        if tensor_parallel_size(self.device_mesh) > 1:
            return None
        model = model or self.model
        if self.is_hf:
            if self.device_mesh is not None:
                return None
            model_type = model.config.model_type
            if model_type not in SUPPORTED_MODEL_TYPES or not issubclass(family_of(model_type).model_cls, DecoderLM):
                return None
            head = model.get_output_embeddings()
        else:
            head = getattr(model, "lm_head", None)
        return head if type(head) is nn.Linear and head.bias is None else None

    def step(self, batch: dict, stage: str, batch_idx: int) -> dict:
        labels = next_token_labels(batch["labels"])  # (B, T)
        evaluating = stage != "train"
        head = self.output_head()
        if head is not None:  # the chunked loss: no (B, T, V) logits are ever held
            loss, n, preds = linear_cross_entropy(self.hidden_states(batch), head.weight, labels, preds=evaluating)
        else:
            logits = self.logits(batch)  # (B, T, V)
            loss, n = token_loss(logits, labels)
            preds = logits.argmax(-1) if evaluating else None
        out = {"loss": loss, "n_tokens": n, "batch_size": labels.size(0)}
        if evaluating:
            out |= {"preds": preds.flatten(), "targets": labels.flatten()}
        return out

    # -------------------------------------------------------------------------------------- generation
    def stop_ids(self) -> list[int]:
        """What ends a generation: EOS, and the chat template's end of turn (the data's template, else the
        tokenizer's), so a chat model stops after its answer instead of writing the next turn."""
        tok = self.tokenizer
        template = getattr(self.datamodule, "used_chat_template", None) or tokenizer_chat_template(tok)
        return with_end_of_turn([tok.eos_token_id] if tok.eos_token_id is not None else [], tok, template)

    @torch.no_grad()
    def generate_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int | None = 0, max_new_tokens=None
    ):
        """Left-padded prompts (B, T) -> generated continuations (B, max_new_tokens), EOS-terminated rows padded."""
        h, pad, stops = self.hparams, self.pad_token_id, self.stop_ids() or None
        max_new_tokens = max_new_tokens or h.max_new_tokens
        if self.is_hf:
            sampling = h.temperature > 0
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=h.temperature if sampling else None,
                top_k=h.top_k if sampling else None,
                top_p=h.top_p if sampling else None,
                pad_token_id=pad,
                eos_token_id=stops,
            )
        else:
            out = generate(
                self.model,
                input_ids,
                attention_mask,
                max_new_tokens=max_new_tokens,
                temperature=h.temperature,
                top_k=h.top_k,
                top_p=h.top_p,
                seed=seed,
                eos_token_id=stops,
                pad_token_id=pad,
            )
        return out[:, input_ids.size(1) :]

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def sample(self, prompt: str | None = None) -> str:
        """Generates one continuation of ``prompt`` (default: ``sample_prompt``, else just BOS) as text."""
        prompt = prompt if prompt is not None else (self.hparams.sample_prompt or "")
        ids = prompt_ids(self.tokenizer, prompt, document=getattr(self.datamodule, "format", None) == "text")
        x = torch.tensor([ids], device=self.device)
        budget = self.hparams.max_new_tokens  # a demo sample: as much as fits the context
        if (context := context_length(self.model)) is not None:
            budget = min(budget, context[0] - len(ids))
        if budget < 1:
            return prompt
        was_training = self.model.training
        self.model.eval()
        try:
            new = self.generate_ids(x, torch.ones_like(x), max_new_tokens=budget)
        finally:
            self.model.train(was_training)
        return prompt + self.decode(new)[0]

    def fit_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[int]):
        """Left-padded prompts (B, T) cut so that each, with ``max_new_tokens`` more, fits the model's context: the
        start of an over-long prompt goes and its end stays (where generation continues), as the data cuts prompts
        over ``max_length``; a warning names each row cut. Returns the prompts, their mask and which rows were cut."""
        n = self.hparams.max_new_tokens
        context = context_length(self.model)
        if context is None:
            return input_ids, attention_mask, [False] * len(rows)
        room = context[0] - n
        if room < 1:
            raise ValueError(f"model.max_new_tokens={n} leaves no room for a prompt in the model's context of "
                             f"{context[0]} positions ({context[1]}); lower max_new_tokens")  # fmt: skip
        lengths = attention_mask.sum(1).tolist()  # (B,)
        cut = [length > room for length in lengths]
        for row, length, c in zip(rows, lengths, cut, strict=True):
            if c:
                warnings.warn(
                    f"predict row {row}: the prompt's {length} tokens and max_new_tokens={n} exceed the model's "
                    f"context of {context[0]}; its first {length - room} tokens were cut (truncated: true)",
                    stacklevel=2,
                )
        if input_ids.size(1) > room:  # left padding: the last `room` columns hold the end of every row
            input_ids, attention_mask = input_ids[:, -room:], attention_mask[:, -room:]
        return input_ids, attention_mask, cut

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        rows = batch["row"].tolist()
        ids, mask, cut = self.fit_context(batch["input_ids"], batch["attention_mask"], rows)
        new = self.generate_ids(ids, mask, seed=batch_idx)
        prompts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        outputs = self.decode(new)
        return [{"row": r, "prompt": p, "output": o, "truncated": c}
                for r, p, o, c in zip(rows, prompts, outputs, cut, strict=True)]  # fmt: skip
