"""Reference log-probs precomputed once before preference training, cached on disk by what determines them.

A cache entry is one folder ``<root>/reference-logps/<key>/`` holding ``logps.safetensors`` (``chosen``,
``rejected``: (N,) float64, the split's rows in order), written atomically (``finetune.folders.atomic_folder``).
Its key hashes the encoded rows (token ids and labels, which carry the prompt/completion split) and the reference
model's fingerprint (every weight and buffer as it is before training, its config, the backend, the precision and
how the reference is made): a changed row or weight makes a new key, so a stale entry is never read.
"""

import hashlib
from pathlib import Path

import torch
from torch import nn

from finetune.folders import atomic_folder

ROW_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
FILE = "logps.safetensors"


def _digest() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=20)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module, **settings) -> str:
    """A hash of every weight and buffer of ``model`` (names, dtypes, shapes, values; sharded DTensors gathered one
    at a time, on every rank together) and of ``settings`` (what else changes the log-probs)."""
    h = _digest()
    h.update(repr(sorted(settings.items())).encode())
    h.update(repr(getattr(model, "config", None)).encode())
    tensors = sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0])
    for name, t in tensors:
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP2, tensor parallelism): the whole weight
            t = t.full_tensor()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def rows_fingerprint(dataset) -> str:
    """A hash of a split's encoded preference rows (a ``datasets.Dataset``), in order."""
    import pyarrow as pa

    table = dataset.select_columns(list(ROW_COLUMNS)).with_format("arrow")[:]  # any row selection applied
    h = _digest()
    h.update(str(len(table)).encode())
    for name in ROW_COLUMNS:
        column = table.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        h.update(name.encode())
        h.update(memoryview(column.offsets.to_numpy(zero_copy_only=False)))
        h.update(memoryview(column.values.to_numpy(zero_copy_only=False)))
    return h.hexdigest()


def entry(root: str | Path, model_key: str, rows_key: str) -> Path:
    """The cache folder of one split's reference log-probs under one reference model."""
    h = _digest()
    h.update(f"{model_key}/{rows_key}".encode())
    return Path(root) / "reference-logps" / h.hexdigest()


def read(folder: Path, n_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(chosen (N,), rejected (N,)) from a cache folder, or ``None`` when there is none."""
    from safetensors.torch import load_file

    file = folder / FILE
    if not file.is_file():
        return None
    values = load_file(file)
    if values["chosen"].shape != (n_rows,) or values["rejected"].shape != (n_rows,):  # cannot happen for one key
        raise ValueError(f"{file}: holds {values['chosen'].numel()} rows of reference log-probs, expected {n_rows}; "
                         "delete it to recompute")  # fmt: skip
    return values["chosen"], values["rejected"]


def write(folder: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Writes a cache folder atomically (a concurrent or killed writer leaves no half-written entry)."""
    from safetensors.torch import save_file

    with atomic_folder(folder, overwrite=True) as tmp:
        save_file({"chosen": chosen.double().contiguous(), "rejected": rejected.double().contiguous()}, tmp / FILE)
