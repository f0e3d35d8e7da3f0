"""Data for the tasks: dataset formats, prompt and chat templates, packing, samplers and the ``DataModule``."""

from finetune.data.module import DataModule

__all__ = ["DataModule"]
