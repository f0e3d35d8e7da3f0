"""Name maps between our parameter names and a Hugging Face checkpoint's, written as data."""

import re
from dataclasses import dataclass, field


def _compile(template: str) -> re.Pattern:
    # "{i}" is a layer index, "*" the rest of the name (so one rule carries ".weight", ".bias" and adapter keys).
    pattern = re.escape(template).replace(r"\{i\}", r"(\d+)").replace(r"\*", r"(.+)")
    return re.compile(pattern + "$")


def _fill(template: str, groups: tuple[str, ...]) -> str:
    parts = iter(groups)
    return re.sub(r"\{i\}|\*", lambda _: next(parts), template)


@dataclass(frozen=True)
class KeyMap:
    """Pairs of (ours, Hugging Face) name templates, tried in order; the first whose pattern matches wins.

    >>> KeyMap((("layers.{i}.attn.*", "model.layers.{i}.self_attn.*"),)).to_hf("layers.3.attn.q_proj.weight")
    'model.layers.3.self_attn.q_proj.weight'
    """

    pairs: tuple[tuple[str, str], ...]
    _ours: list = field(init=False, repr=False, compare=False)
    _hf: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ours", [(_compile(o), h) for o, h in self.pairs])
        object.__setattr__(self, "_hf", [(_compile(h), o) for o, h in self.pairs])

    @staticmethod
    def _map(rules, name: str) -> str | None:
        for pattern, template in rules:
            if m := pattern.match(name):
                return _fill(template, m.groups())
        return None

    def to_hf(self, name: str) -> str | None:
        return self._map(self._ours, name)

    def from_hf(self, name: str) -> str | None:
        return self._map(self._hf, name)
