"""The ``preference`` format: rows ``{prompt, chosen, rejected}`` -> a chosen and a rejected token sequence sharing
the prompt, with labels on the completion only (what DPO and its relatives compare).

Completions are strings, or message lists rendered with the chat template (the prompt is then a message list too,
or, when the row has none, the longest common message prefix of chosen and rejected). Prompt and completion are
tokenized together and split at the prompt's length, so the completion's tokens are the ones the model sees after
that prompt; a prompt that does not tokenize as a prefix of the whole is refused, naming the row.
"""

import math

import datasets

from finetune.data.templates import render

IDS = datasets.List(datasets.Value("int32"))
SIDES = ("chosen", "rejected")
# Optional columns of precomputed reference log-probs (per-sequence sums over the completion).
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
FIELDS = {"prompt": False, "chosen": True, "rejected": True, **dict.fromkeys(REF_FIELDS, False)}
COLUMNS = (*(f"{s}_{k}" for s in SIDES for k in ("input_ids", "labels")), *REF_FIELDS)


def features(columns: dict[str, str | None]) -> dict:
    """The columns the encoder writes for preference rows (besides length, truncated, no_loss)."""
    f = {f"{s}_{k}": IDS for s in SIDES for k in ("input_ids", "labels")}
    f |= {k: datasets.Value("float64") for k in REF_FIELDS if columns.get(k) is not None}
    return f


def encode_pair(enc, values: dict, row: int) -> dict:
    """One row -> both sequences. ``enc`` is the file's ``Encoder`` (tokenizer, max_length, template, columns).

    A row whose prompt alone fills ``max_length`` comes back with ``no_loss=True``: the DataModule drops it and
    reports the count. Longer sequences keep their start (the prompt) and lose the end of the completion.
    """
    where = enc._where(row)
    prompt, sides = _prompt_and_completions(enc, values, row)
    out, truncated, dropped, length = {}, False, False, 0
    for side, completion in zip(SIDES, sides, strict=True):
        prompt_ids, ids = _tokens(enc, prompt, completion, where, side)
        n_prompt = len(prompt_ids)
        dropped |= n_prompt >= enc.max_length
        truncated |= len(ids) > enc.max_length
        ids = ids[: enc.max_length]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_labels"] = [-100] * n_prompt + ids[n_prompt:]
        length += len(ids)
    for field in REF_FIELDS:
        if (column := enc.columns.get(field)) is not None:
            value = values[column]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}: column {column!r} ({field} field) must hold a finite number (a summed "
                                 f"log-probability); found {type(value).__name__} {value!r:.80}")  # fmt: skip
            out[field] = float(value)
    return {**out, "length": length, "truncated": truncated and not dropped, "no_loss": dropped}


def _prompt_and_completions(enc, values: dict, row: int):
    """(prompt, (chosen, rejected)): three strings, or message lists (the prompt implicit when not given)."""
    cols, where = enc.columns, enc._where(row)
    chosen, rejected = values[cols["chosen"]], values[cols["rejected"]]
    prompt = values[cols["prompt"]] if cols.get("prompt") is not None else None
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            column = cols.get("prompt") or "prompt"
            raise ValueError(f"{where}: column {column!r} (prompt field) must hold a string when chosen and "
                             f"rejected are strings; found {type(prompt).__name__} {prompt!r:.80}")  # fmt: skip
        return prompt, (chosen, rejected)
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = enc._messages(values, row, "chosen"), enc._messages(values, row, "rejected")
        if prompt is None:  # implicit: the longest common message prefix
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            return chosen[:n], (chosen[n:], rejected[n:])
        if not isinstance(prompt, list):
            raise ValueError(f"{where}: column {cols['prompt']!r} (prompt field) must hold a message list when "
                             f"chosen and rejected are message lists; found {type(prompt).__name__}")  # fmt: skip
        prompt = enc._messages(values, row, "prompt")
        return prompt, (chosen, rejected)
    raise ValueError(f"{where}: columns {cols['chosen']!r} and {cols['rejected']!r} must both hold strings or both "
                     f"message lists; found {type(chosen).__name__} and {type(rejected).__name__}")  # fmt: skip


def _tokens(enc, prompt, completion, where: str, side: str) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + completion ids ending in exactly one EOS)."""
    tok = enc.tokenizer
    if isinstance(completion, str):
        special = True  # the tokenizer's BOS, as documents start
        prompt_text, full_text = prompt, prompt + completion
    else:
        if not completion:
            raise ValueError(f"{where}: the {side} messages add nothing after the prompt (empty completion)")
        special = False  # templates write their own special tokens
        try:
            prompt_text = render(tok, enc.chat_template, prompt, True) if prompt else ""
            full_text = render(tok, enc.chat_template, prompt + completion, False)
        except Exception as e:
            raise ValueError(
                f"{where}: the chat template failed on the {side} messages: {type(e).__name__}: {e}"
            ) from e
    prompt_ids = tok(prompt_text, add_special_tokens=special)["input_ids"]
    ids = tok(full_text, add_special_tokens=special)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{where}: the prompt's tokens are not a prefix of the tokens of prompt + {side} (the "
                         "tokenizer merges across their boundary); end the prompt with a space or newline, or start "
                         "the completion with one")  # fmt: skip
    eos = enc.eos
    while eos is not None and len(ids) > len(prompt_ids) and ids[-1] == eos:
        ids = ids[:-1]
    if len(ids) == len(prompt_ids):
        raise ValueError(f"{where}: the {side} completion is empty; every pair needs two non-empty answers")
    return prompt_ids, ids + ([eos] if eos is not None else [])
