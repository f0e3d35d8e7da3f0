"""What conversion needs to know about one model family, as data: see each model file's ``FAMILY``."""

import re
from dataclasses import dataclass, field

from finetune.models.keymap import KeyMap


@dataclass(frozen=True)
class Family:
    """A from-scratch model family and its mapping onto Hugging Face checkpoints.

    Attributes:
        model_types: HF ``model_type`` values this family reads (``llama``, ``mistral``, ...).
        config_cls: our config dataclass, with ``from_hf(dict, architectures)`` and ``to_hf() -> dict``.
        model_cls: our ``nn.Module``; takes the config.
        key_map: parameter names ours <-> HF (of the full ``*For*`` model).
        tied: (output weight, embedding weight), our names, shared when the config ties them.
        heads: our task-head modules: one the checkpoint lacks is freshly initialized (with a warning), and
            checkpoint weights of a head we don't build are skipped (with a warning), as ``transformers`` does.
        hf_prefix: the base-model prefix (``model.``); checkpoints saved from the bare base model lack it.
        transposed: HF keys stored as (in, out), e.g. GPT-2's ``Conv1D`` weights.
        ignored: HF keys that hold no weights here (old causal-mask buffers, rotary caches).
        aliases: HF key -> the HF key it is a tied copy of: read when that one is absent, and written beside it.
        tensor_parallel: leaf module name -> how tensor parallelism shards it (a style of ``finetune.parallel``:
            ``colwise``, ``rowwise``, ``colwise_qkv``, ``embedding``, ``head``); modules not named stay replicated.
            Empty: the family has no plan, and ``tensor_parallel_size > 1`` is refused.
    """

    model_types: tuple[str, ...]
    config_cls: type
    model_cls: type
    key_map: KeyMap
    tied: tuple[str, str] | None = None
    heads: tuple[str, ...] = ()
    hf_prefix: str = ""
    transposed: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    tensor_parallel: dict[str, str] = field(default_factory=dict)
    _transposed: re.Pattern | None = field(init=False, repr=False, compare=False)
    _ignored: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        join = lambda pats: re.compile("|".join(f"(?:{p})" for p in pats)) if pats else None  # noqa: E731
        object.__setattr__(self, "_transposed", join(self.transposed))
        object.__setattr__(self, "_ignored", join(self.ignored))

    def is_transposed(self, hf_key: str) -> bool:
        return bool(self._transposed and self._transposed.search(hf_key))

    def is_ignored(self, hf_key: str) -> bool:
        return bool(self._ignored and self._ignored.search(hf_key))
