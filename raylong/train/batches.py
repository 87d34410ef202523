"""Loading a stage's packed sequences on a worker: which rows this rank reads, in what order, where a
resumed stage continues, and how Ulysses shards each sequence over the SP group."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from raylong.storage import fs_path

COLUMNS = ("input_ids", "position_ids", "labels")


class SequenceLoader:
    """The packed sequences of this rank: rows rank, rank+world, ... of the Parquet file, the same
    count on every rank (SP ranks must run the same number of micro-steps or they hang). The first
    pass starts at `start` (a resumed stage continues where the data order left off)."""

    def __init__(self, uri: str, rank: int, world: int, start: int = 0):
        fs, path = fs_path(uri)
        self.file = pq.ParquetFile(fs.open_input_file(path))
        total = self.file.metadata.num_rows
        self.per_rank = total // world
        if self.per_rank == 0:
            raise ValueError(f"{uri} has {total} sequences, fewer than the {world} workers")
        self.rank, self.world = rank, world
        self.start = start % self.per_rank

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip, self.start = self.start, 0  # only the first pass is offset
        index, emitted = 0, 0
        for g in range(self.file.num_row_groups):
            table = self.file.read_row_group(g)
            for row in range(table.num_rows):
                if index % self.world == self.rank and emitted < self.per_rank:
                    emitted += 1
                    if emitted > skip:
                        yield {
                            k: torch.from_numpy(np.asarray(table[k][row].as_py(), dtype=np.int64)).unsqueeze(0)
                            for k in COLUMNS
                        }
                index += 1


def shard_loader(loader, sp_rank: int, sp_group, sp_size: int, device: torch.device):
    """At SP > 1, Ulysses' adapter shards each sequence across the SP group (and adds shift_labels)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    if sp_group is None:
        return loader
    return UlyssesSPDataLoaderAdapter(loader, sp_rank, sp_group, sp_size, device)


def forever(loader) -> Iterator[dict]:
    """Cycle through the loader epoch after epoch (the Ulysses adapter raises StopIteration per epoch)."""
    while True:
        yield from loader


def resumed_batches(uri: str, rank: int, world: int, micro_steps_done: int, sp_rank: int, sp_group, sp_size: int,
                    device: torch.device):
    """(loader, micro-batches in the order an uninterrupted run sees them, after `micro_steps_done`).
    At SP > 1 each loader row feeds sp micro-steps (Ulysses' adapter gathers one row per SP rank)."""
    loader = shard_loader(SequenceLoader(uri, rank, world, start=micro_steps_done // sp_size), sp_rank, sp_group,
                          sp_size, device)
    batches = forever(loader)
    for _ in range(micro_steps_done % sp_size):
        next(batches)
    return loader, batches
