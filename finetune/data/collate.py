"""Batching: rows of token lists padded into tensors, plus the ``attention_mask`` and a ``num_tokens`` count."""

import numpy as np
import torch

# what padding holds, per column; input_ids pad with the tokenizer's pad id
PAD_VALUES = {"labels": -100, "position_ids": 0, "segment_ids": 0, "token_type_ids": 0, "special_tokens_mask": 1}


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """A ``text``-format document's ids as they start in training, prediction and generation from such a run: the
    tokenizer's BOS first, also where the tokenizer adds none itself (GPT-2's, whose BOS is its EOS), so that the
    document's first token is predicted from it. Ids that already start with BOS, and empty ids, are kept."""
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and ids and ids[0] != bos else ids


def bos_first(tokenizer):
    """``tokenizer``, or a copy of it whose post-processor puts BOS first as ``with_bos`` does: what the exports of a
    ``text``-format run carry, so that plain ``transformers`` (and llama.cpp, through the GGUF's ``add_bos_token``)
    prompt the exported model as the run was trained. Returned as it is when it adds BOS itself or has none."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos is None or tokenizer("a")["input_ids"][:1] == [bos_id]:
        return tokenizer
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    backend = tok.backend_tokenizer
    first = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    backend.post_processor = first if backend.post_processor is None else processors.Sequence(
        [backend.post_processor, first])  # fmt: skip
    return tok


def prompt_ids(tokenizer, text: str, *, document: bool = False) -> list[int]:
    """A prompt's ids as the model saw documents start: the tokenizer's BOS if it adds one, and with ``document``
    (a run trained on the ``text`` format) BOS as ``with_bos`` puts it; an empty prompt starts from BOS, else EOS,
    as a new document would."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids:
        bos = tokenizer.bos_token_id
        ids = [bos if bos is not None else tokenizer.eos_token_id]
    return with_bos(tokenizer, ids) if document else ids


class Collator:
    """Pads each list column to the longest in the batch (rounded up to ``pad_to_multiple_of``), on the right, or
    on the left for prompts to generate from. Integer columns (class labels, ``row``) become (B,) tensors.

    ``num_tokens`` counts the non-padding input tokens, plus the target tokens when ``count_targets`` (seq2seq, where
    ``labels`` is a sequence of its own); ``padded`` says whether any row is padded. Both are Python values, so
    reading them needs no device sync.
    """

    def __init__(
        self, pad_id: int, *, left: bool = False, pad_to_multiple_of: int | None = None, count_targets: bool = False
    ) -> None:
        self.pad_id, self.left, self.multiple, self.count_targets = pad_id, left, pad_to_multiple_of, count_targets

    def _pad(self, rows: list, value: int) -> torch.Tensor:
        T = max((len(r) for r in rows), default=0)
        if self.multiple:
            T = -(-T // self.multiple) * self.multiple
        out = np.full((len(rows), T), value, dtype=np.int64)  # (B, T); filled through numpy: faster from lists
        for i, r in enumerate(rows):
            if len(r):
                if self.left:
                    out[i, T - len(r) :] = r
                else:
                    out[i, : len(r)] = r
        return torch.from_numpy(out)

    def __call__(self, items: list[dict]) -> dict:
        batch: dict = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if isinstance(values[0], list | np.ndarray):
                batch[key] = self._pad(values, PAD_VALUES.get(key, self.pad_id))
            else:
                batch[key] = torch.as_tensor(values, dtype=torch.long)  # (B,)
        lengths = torch.tensor([[len(item["input_ids"])] for item in items])  # (B, 1)
        T = batch["input_ids"].shape[1]
        positions = torch.arange(T)  # (T,)
        mask = positions >= T - lengths if self.left else positions < lengths  # (B, T) True on tokens
        batch["attention_mask"] = mask.long()
        # Known here for free, on the host: with no padding the model may skip the mask (plain causal attention,
        # SDPA's fastest kernel) without a device sync to find out.
        batch["padded"] = bool((lengths < T).any())
        num_tokens = int(lengths.sum())
        if self.count_targets and "labels" in batch:
            num_tokens += sum(len(item["labels"]) for item in items)
        batch["num_tokens"] = num_tokens
        return batch


class PairCollator(Collator):
    """Preference pairs -> one batch of 2B rows, the B chosen sequences then the B rejected ones (one forward for
    both), right-padded; precomputed reference log-probs, when the data has them, as (B,) float tensors."""

    def __call__(self, items: list[dict]) -> dict:
        rows = [{"input_ids": it[f"{side}_input_ids"], "labels": it[f"{side}_labels"]}
                for side in ("chosen", "rejected") for it in items]  # fmt: skip
        batch = super().__call__(rows)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                batch[key] = torch.tensor([it[key] for it in items], dtype=torch.float64)  # (B,)
        return batch
