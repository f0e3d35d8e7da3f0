"""Packing causal-LM samples back to back into rows of ``max_length`` tokens.

Samples are packed in dataset order, in one of two ways:
  - whole (``fill=False``): a sample goes into the current row if it fits, else it starts the next one; a sample
    longer than ``max_length`` is first cut into ``max_length`` pieces (pretraining on long documents). Rows end
    with padding where the next sample did not fit.
  - fill (``fill=True``): every row but the last holds exactly ``max_length`` tokens; the sample that reaches a row's
    end is cut there and continues, as a sample of its own, at the start of the next row. No compute goes to
    padding, as with contiguous windows over the stream (`transformers`' run_clm), but no token attends to another
    document.
Every row is a contiguous slice of the split's token stream, so a row is cut out of flat arrays on demand and no
token is lost or repeated.
"""

import numpy as np
import pyarrow.compute as pc
import torch


def plan(lengths: np.ndarray, max_length: int, fill: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (piece_starts, row_pieces): where each piece begins in the token stream, and the first piece of
    each row. Pieces are the samples, those longer than ``max_length`` cut into ``max_length`` chunks, and with
    ``fill`` also cut where a row is full."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    if fill:
        return _plan_fill(starts, lengths, max_length)
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


def _plan_fill(starts: np.ndarray, lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``plan`` with full rows: a sample is cut wherever a row reaches ``max_length`` tokens."""
    piece_starts, row_pieces, fill = [], [], 0
    for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        while n > 0:
            if fill == 0:
                row_pieces.append(len(piece_starts))
            take = min(n, max_length - fill)
            piece_starts.append(start)
            start, n, fill = start + take, n - take, (fill + take) % max_length
    return np.asarray(piece_starts, np.int64), np.asarray(row_pieces, np.int64)


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows with ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for each sample) and
    ``segment_ids`` (1, 2, 3… for the samples of the row). The first token of every sample after the first in a row
    gets label -100: the token before it belongs to another sample, so nothing may predict it. ``fill``: full rows
    (see the module docstring)."""

    def __init__(self, dataset, max_length: int, fill: bool = False) -> None:
        table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]  # (N,) lists
        ids, labels = table.column("input_ids").combine_chunks(), table.column("labels").combine_chunks()
        self.ids = ids.flatten().to_numpy()  # (total tokens,)
        self.labels = labels.flatten().to_numpy()
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        self.piece_starts, self.row_pieces = plan(lengths, max_length, fill)
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
