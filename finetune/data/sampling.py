"""Data order: seeded per-epoch shuffling (optionally grouped by length) sharded over data-parallel ranks, exact
eval shards, and a train DataLoader that resumes mid-epoch.

These replace Lightning's ``DistributedSampler`` (run the Trainer with ``use_distributed_sampler=False``).
"""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")


def length_grouped_order(lengths, batch_size: int, generator: torch.Generator) -> list[int]:
    """A shuffled order of ``range(len(lengths))`` in which each run of ``batch_size`` holds rows of similar length:
    ``transformers``' ``get_length_grouped_indices``, index for index. A random permutation is cut into megabatches
    of 50 batches (fewer, to make at least 4 megabatches), each is sorted by descending length, and the longest row
    of all is swapped to the very front (an out-of-memory shows on the first step rather than late in an epoch)."""
    mult = max(min(len(lengths) // (batch_size * 4), 50), 1)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = mult * batch_size
    megabatches = [
        sorted(order[i : i + size], key=lambda i: lengths[i], reverse=True) for i in range(0, len(order), size)
    ]
    if megabatches:
        longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])  # first of the longest
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


class TrainSampler(Sampler[int]):
    """A permutation of ``range(size)`` from ``torch.Generator().manual_seed(seed + epoch)``, sharded by rank.

    Like ``DistributedSampler``, the permutation is padded by wrapping around to a multiple of ``num_replicas``, so
    every rank gets ``ceil(size / num_replicas)`` indices and the same number of batches. Lightning calls
    ``set_epoch`` before each epoch. ``skip`` drops that many leading indices from the next iteration only (resume).

    With ``lengths`` (one per row), the permutation is ``length_grouped_order`` over windows of
    ``rows_per_step * num_replicas`` rows (``rows_per_step``: a rank's rows per optimizer step, batch size times
    gradient accumulation, as `transformers` groups), so each step's batches hold rows of similar length (less
    padding) and each step trains on the same rows whatever the number of processes; seeding, sharding and resume
    are the same.
    """

    def __init__(
        self, size: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0, lengths=None, rows_per_step: int = 1
    ) -> None:
        _check_rank(num_replicas, rank)
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"lengths holds {len(lengths)} values for {size} rows")
        self.size, self.seed, self.num_replicas, self.rank = size, seed, num_replicas, rank
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        self.rows_per_step = rows_per_step
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            order = torch.randperm(self.size, generator=g).tolist()
        else:  # rank r's rows of step k are rows r, r + R, ... of window k
            order = length_grouped_order(self.lengths, self.rows_per_step * self.num_replicas, g)
        total = len(self) * self.num_replicas
        if total > self.size:  # wrap around: a few samples twice per epoch, spread over the ranks
            order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.indices()[skip:])


class EvalSampler(Sampler[int]):
    """``range(size)`` in order, rank ``r`` taking ``r, r + num_replicas, …``: no padding and no duplicates, so a
    metric over the epoch gathered from all ranks covers each row exactly once (ranks may get one batch fewer)."""

    def __init__(self, size: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        _check_rank(num_replicas, rank)
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A train ``DataLoader`` over a ``TrainSampler`` whose position within an epoch can be saved and restored.

    ``state_dict()`` is ``{"epoch", "batches_yielded"}``: the batches yielded so far this epoch (Lightning's fetcher
    doesn't prefetch from a loader with a length, so these are the batches consumed). After ``load_state_dict``, the
    next iteration of that epoch skips that many batches by skipping their indices in the sampler, so the skipped
    samples are never loaded. Lightning calls ``load_state_dict`` before ``iter()`` when it restores a checkpoint.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, TrainSampler) or self.batch_size is None:
            raise ValueError("ResumableDataLoader needs sampler=TrainSampler(...) and a batch_size")
        self.batches_yielded = 0
        self._resume: dict | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator:
        # A generator: nothing runs until the first batch is asked for, after Lightning's set_epoch.
        resume, self._resume = self._resume, None
        skip = resume["batches_yielded"] if resume and resume["epoch"] == self.sampler.epoch else 0
        self.sampler.skip = skip * self.batch_size
        self.batches_yielded = skip
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch
