"""Distributed checkpoints (DCP) read in one process: the folder FSDP2 (``ModelParallelStrategy``) writes for a
checkpoint, one shard file per rank plus DCP's ``.metadata`` and Lightning's ``meta.pt`` (everything that is not a
module or optimizer state). ``export``, ``generate`` and ``chat`` read it like a ``.ckpt`` file; ``atomic_saves``
writes it (and every checkpoint of a strategy that saves its own) atomically."""

import shutil
import warnings
from pathlib import Path

import torch

META_FILE = "meta.pt"  # Lightning's ``_METADATA_FILENAME``


def read_sharded_checkpoint(folder: Path) -> dict:
    """A distributed checkpoint folder as one checkpoint dict: ``meta.pt`` plus the consolidated (unsharded)
    ``state_dict``. Only the weights are read, through DCP itself, not the optimizer state beside them."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = Path(folder)
    missing = [name for name in (".metadata", META_FILE) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: a folder, but not a distributed checkpoint (no {', '.join(missing)}; expected "
                         "the shards, .metadata and meta.pt that ModelParallelStrategy writes)")  # fmt: skip
    checkpoint = torch.load(folder / META_FILE, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # "torch.distributed is unavailable ...": one process is what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
        state = _load_state_dict_from_keys({"state_dict"}, checkpoint_id=str(folder))
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def atomic_saves(strategy) -> None:
    """Makes ``strategy.save_checkpoint`` atomic, for the strategies that save their own checkpoints (FSDP2's
    distributed checkpoint is a folder: ``last.ckpt/``, rewritten in place, lost to a kill mid-save). Every rank
    writes into a temporary sibling of the target (``.NAME.tmp-HOST-PID-xxxx/NAME``, one name for all ranks); then
    rank 0 swaps it in: a file by ``os.replace``, a folder by moving the old one aside (``.NAME.old-...``), renaming
    the new one into place and removing the old. A failed save removes its temporary folder and leaves the target
    as it was; the leftovers of a killed writer are removed by the next save (``restore_moved_aside`` first puts
    back a target that a kill between the two renames left aside)."""
    save = strategy.save_checkpoint

    def save_checkpoint(checkpoint: dict, filepath, storage_options=None) -> None:
        import tempfile

        from finetune.folders import _scratch_name, remove_stale_leftovers, swap_in

        path = Path(strategy.broadcast(str(filepath)))
        scratch = None
        if strategy.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            restore_moved_aside(path)
            remove_stale_leftovers(path)
            scratch = tempfile.mkdtemp(prefix=_scratch_name(path, "tmp"), dir=path.parent)
        scratch = Path(strategy.broadcast(scratch))
        try:
            save(checkpoint, scratch / path.name, storage_options)
            strategy.barrier("atomic_saves")
            if strategy.is_global_zero:
                swap_in(scratch / path.name, path)
        finally:
            if strategy.is_global_zero:
                shutil.rmtree(scratch, ignore_errors=True)
        strategy.barrier("atomic_saves_done")

    strategy.save_checkpoint = save_checkpoint


def restore_moved_aside(target: Path) -> Path | None:
    """A checkpoint that a killed ``atomic_saves`` had moved aside (``.NAME.old-HOST-PID-xxxx/NAME``, its writer
    dead) and not yet replaced is put back as ``target``; returns it, or None when there is none to restore."""
    from finetune.folders import stale_leftovers

    if target.exists():
        return None
    for aside in stale_leftovers(target):
        if aside.name.startswith(f".{target.name}.old-") and (aside / target.name).exists():
            (aside / target.name).rename(target)
            return target
    return None
