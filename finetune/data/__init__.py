"""Data for the tasks: dataset formats, prompt and chat templates, packing, samplers and the ``DataModule``.

``DataModule`` (Lightning, `datasets`) is imported on first use, so that the light submodules (collate,
templates) that inference needs start without them.
"""

__all__ = ["DataModule"]


def __getattr__(name: str):
    if name == "DataModule":
        from finetune.data.module import DataModule

        return DataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
