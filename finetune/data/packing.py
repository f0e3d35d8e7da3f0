"""Packing causal-LM samples back to back into rows of ``max_length`` tokens.

Samples are packed greedily in dataset order: a sample goes into the current row if it fits, else it starts the
next one. A sample longer than ``max_length`` is first cut into ``max_length`` pieces (pretraining on long
documents). Every row is then a contiguous slice of the split's token stream, so a row is cut out of flat arrays
on demand and no token is lost or repeated.
"""

import numpy as np
import pyarrow.compute as pc
import torch


def plan(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (piece_starts, row_pieces): where each piece begins in the token stream, and the first piece of
    each row. Pieces are the samples, those longer than ``max_length`` cut into ``max_length`` chunks."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    piece_starts, piece_lengths = [], []
    for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        for offset in range(0, n, max_length):  # nothing for an empty sample
            piece_starts.append(start + offset)
            piece_lengths.append(min(max_length, n - offset))
    row_pieces, fill = [], max_length
    for p, n in enumerate(piece_lengths):
        if fill + n > max_length:  # doesn't fit: start a new row
            row_pieces.append(p)
            fill = 0
        fill += n
    return np.asarray(piece_starts, np.int64), np.asarray(row_pieces, np.int64)


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows with ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for each sample) and
    ``segment_ids`` (1, 2, 3… for the samples of the row). The first token of every sample after the first in a row
    gets label -100: the token before it belongs to another sample, so nothing may predict it."""

    def __init__(self, dataset, max_length: int) -> None:
        table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]  # (N,) lists
        ids, labels = table.column("input_ids").combine_chunks(), table.column("labels").combine_chunks()
        self.ids = ids.flatten().to_numpy()  # (total tokens,)
        self.labels = labels.flatten().to_numpy()
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        self.piece_starts, self.row_pieces = plan(lengths, max_length)
        self.split_samples = int((lengths > max_length).sum())

    def __len__(self) -> int:
        return len(self.row_pieces)

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        first = self.row_pieces[r]
        last = self.row_pieces[r + 1] if r + 1 < len(self.row_pieces) else len(self.piece_starts)
        s0 = self.piece_starts[first]
        s1 = self.piece_starts[last] if last < len(self.piece_starts) else len(self.ids)
        bounds = self.piece_starts[first:last] - s0  # (P,) where each sample starts in the row
        starts = np.zeros(s1 - s0, np.int64)
        starts[bounds] = 1
        segments = np.cumsum(starts)  # (T,) 1..P
        positions = np.arange(s1 - s0) - bounds[segments - 1]  # (T,)
        labels = self.labels[s0:s1].astype(np.int64)
        labels[bounds[1:]] = -100
        return {"input_ids": self.ids[s0:s1], "labels": labels, "position_ids": positions, "segment_ids": segments}

    def __getitems__(self, rows: list[int]) -> list[dict[str, np.ndarray]]:
        return [self[r] for r in rows]
