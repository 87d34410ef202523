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
    """The packed sequences of this rank, the same count on every rank (SP ranks must run the same number
    of micro-steps or they hang): positions rank, rank+world, ... of the training order, which is the
    file's row order, or a permutation of it seeded by `seed` (the same on every rank and every attempt,
    so a resumed stage continues the order an uninterrupted one follows). The first pass starts at
    `start` (a resumed stage continues where the data order left off)."""

    def __init__(self, uri: str, rank: int, world: int, start: int = 0, seed: int | None = None,
                 per_document_positions: bool = True):
        fs, path = fs_path(uri)
        self.file = pq.ParquetFile(fs.open_input_file(path))
        total = self.file.metadata.num_rows
        self.per_rank = total // world
        if self.per_rank == 0:
            raise ValueError(f"{uri} has {total} sequences, fewer than the {world} workers")
        order = np.arange(total) if seed is None else np.random.default_rng(seed).permutation(total)
        self.rows = order[rank::world][: self.per_rank]  # file rows, in this rank's training order
        self.group_starts = np.cumsum([0] + [self.file.metadata.row_group(g).num_rows
                                             for g in range(self.file.num_row_groups)])
        self.start = start % self.per_rank
        self.per_document_positions = per_document_positions
        self._group, self._columns = -1, {}

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip, self.start = self.start, 0  # only the first pass is offset
        for row in self.rows[skip:]:
            yield self.read(int(row))

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """One file row as [1, L] int64 tensors, straight from the Arrow buffers (its row group is kept
        for the next read)."""
        group = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        if group != self._group:
            table = self.file.read_row_group(group, columns=list(COLUMNS))
            self._group, self._columns = group, {k: _offsets_values(table.column(k)) for k in COLUMNS}
        i = row - int(self.group_starts[group])
        out = {}
        for k, (offsets, values) in self._columns.items():
            out[k] = torch.from_numpy(values[offsets[i] : offsets[i + 1]].astype(np.int64)).unsqueeze(0)
        if not self.per_document_positions:
            out["position_ids"] = continuous_positions(out["position_ids"])
        return out


def continuous_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """0..L-1 over the whole packed sequence: what positions must be when its documents attend across their
    boundaries (per_document_attention: false); the stored ones restart at every document."""
    return torch.arange(position_ids.shape[-1], dtype=position_ids.dtype).expand_as(position_ids).contiguous()


def _offsets_values(column) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> Arrow column as (offsets, values) numpy arrays, without Python ints."""
    arr = column.combine_chunks()
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


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
                    device: torch.device, seed: int | None = None, per_document_positions: bool = True):
    """(loader, micro-batches in the order an uninterrupted run sees them, after `micro_steps_done`).
    At SP > 1 each loader row feeds sp micro-steps (Ulysses' adapter gathers one row per SP rank)."""
    loader = shard_loader(SequenceLoader(uri, rank, world, start=micro_steps_done // sp_size, seed=seed,
                                         per_document_positions=per_document_positions), sp_rank,
                          sp_group, sp_size, device)
    batches = forever(loader)
    for _ in range(micro_steps_done % sp_size):
        next(batches)
    return loader, batches
