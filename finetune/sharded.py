"""Distributed checkpoints (DCP) read in one process: the folder FSDP2 (``ModelParallelStrategy``) writes for a
checkpoint, one shard file per rank plus DCP's ``.metadata`` and Lightning's ``meta.pt`` (everything that is not a
module or optimizer state). ``export``, ``generate`` and ``chat`` read it like a ``.ckpt`` file."""

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
