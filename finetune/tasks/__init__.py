"""Training tasks: one LightningModule per objective over a shared base (``Task``)."""

import inspect

from finetune.model_spec import check_plain
from finetune.tasks.base import Task
from finetune.tasks.causal_lm import CausalLM
from finetune.tasks.classification import Classification
from finetune.tasks.masked_lm import MaskedLM
from finetune.tasks.preference import Preference
from finetune.tasks.seq2seq import Seq2Seq

__all__ = [
    "TASKS", "CausalLM", "Classification", "MaskedLM", "Preference", "Seq2Seq", "Task", "plain_hparams", "task_class",
]  # fmt: skip

# The task classes a run folder may name (its config.yaml's model.class_path), under the paths a recipe or
# LightningCLI writes: ``finetune.tasks.CausalLM`` and ``finetune.tasks.causal_lm.CausalLM``.
TASKS: dict[str, type[Task]] = {
    path: cls
    for cls in (CausalLM, Classification, MaskedLM, Preference, Seq2Seq)
    for path in (f"{__name__}.{cls.__name__}", f"{cls.__module__}.{cls.__qualname__}")
}


def task_class(class_path: object, *, where: str) -> type[Task]:
    """The registered task class ``class_path`` names. Looked up, never imported: a run folder is untrusted, and
    importing or calling whatever it names would run its code."""
    if not isinstance(class_path, str) or class_path not in TASKS:
        names = sorted({f"{__name__}.{c.__name__}" for c in TASKS.values()})
        raise ValueError(f"{where}: model.class_path {class_path!r} is not one of the toolkit's tasks {names}; "
                         "a run folder may name only those (nothing else is imported from it)")  # fmt: skip
    return TASKS[class_path]


def plain_hparams(hparams: dict, cls: type[Task], *, where: str) -> dict:
    """``hparams`` checked as the constructor arguments of ``cls``: known names only, plain values (str, numbers,
    bools, None, lists, string-keyed mappings), and no ``class_path`` mapping anywhere (none is instantiated)."""
    known = {
        name
        for c in cls.__mro__
        if isinstance(c, type) and issubclass(c, Task)
        for name, p in inspect.signature(c.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    if unknown := sorted(set(hparams) - known):
        raise ValueError(f"{where}: hyper_parameters {unknown} are not arguments of {cls.__name__}")
    for key, value in hparams.items():
        check_plain(value, f"{where}: hyper_parameters.{key}")
    return dict(hparams)
