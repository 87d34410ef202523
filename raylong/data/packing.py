"""Pack tokenized documents into sequences of exactly `seq_len` tokens. Pure: numpy in, numpy out.

Every sequence carries three int32 columns:
- input_ids
- position_ids: restart at 0 at each document (or document piece) start
- labels: the token to learn at this position (-100 where nothing is learned: the first token of each
  document, padding, and for SFT every non-assistant token). The trainer shifts labels by one, so a
  -100 at a document start stops the previous document from predicting it.

Pretraining streams documents end to end (a document crossing a sequence boundary continues in the
next sequence with positions restarting); SFT never splits a conversation. Every input token ends up
counted as packed or dropped, and every padding token as padded: `PackStats.check()` asserts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

IGNORE = -100


@dataclass
class Sequence:
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray


@dataclass
class SourceStats:
    documents: int = 0
    tokens_in: int = 0
    tokens_packed: int = 0
    tokens_dropped: int = 0


@dataclass
class PackStats:
    seq_len: int
    sequences: int = 0
    tokens_padded: int = 0
    per_source: dict[str, SourceStats] = field(default_factory=dict)

    def source(self, name: str) -> SourceStats:
        return self.per_source.setdefault(name, SourceStats())

    def count_in(self, name: str, tokens: int) -> SourceStats:
        """Record one document entering the packer."""
        src = self.source(name)
        src.documents += 1
        src.tokens_in += tokens
        return src

    @property
    def tokens_in(self) -> int:
        return sum(s.tokens_in for s in self.per_source.values())

    @property
    def tokens_packed(self) -> int:
        return sum(s.tokens_packed for s in self.per_source.values())

    @property
    def tokens_dropped(self) -> int:
        return sum(s.tokens_dropped for s in self.per_source.values())

    def check(self) -> None:
        """Token conservation: in = packed + dropped per source; sequences hold packed + padding."""
        for name, s in self.per_source.items():
            if s.tokens_in != s.tokens_packed + s.tokens_dropped:
                raise AssertionError(f"source {name}: {s.tokens_in} in != {s.tokens_packed} packed + {s.tokens_dropped} dropped")
        if self.sequences * self.seq_len != self.tokens_packed + self.tokens_padded:
            raise AssertionError(
                f"{self.sequences} x {self.seq_len} != {self.tokens_packed} packed + {self.tokens_padded} padded"
            )


class _SequenceBuilder:
    """Accumulates pieces until exactly seq_len tokens; tracks which source each token came from."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self._reset()

    def _reset(self) -> None:
        self.ids: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.lab: list[np.ndarray] = []
        self.owners: list[tuple[str, int]] = []
        self.length = 0

    @property
    def room(self) -> int:
        return self.seq_len - self.length

    def add(self, ids: np.ndarray, labels: np.ndarray, source: str) -> None:
        n = len(ids)
        self.ids.append(ids)
        self.pos.append(np.arange(n, dtype=np.int32))
        lab = labels.copy()
        lab[0] = IGNORE  # a piece start is never predicted from the previous piece
        self.lab.append(lab)
        self.owners.append((source, n))
        self.length += n

    def emit(self, stats: PackStats) -> Sequence:
        pad = self.room
        if pad:
            self.ids.append(np.full(pad, self.pad_id, dtype=np.int32))
            self.pos.append(np.arange(pad, dtype=np.int32))
            self.lab.append(np.full(pad, IGNORE, dtype=np.int32))
        seq = Sequence(
            np.concatenate(self.ids).astype(np.int32),
            np.concatenate(self.pos).astype(np.int32),
            np.concatenate(self.lab).astype(np.int32),
        )
        for source, n in self.owners:
            stats.source(source).tokens_packed += n
        stats.tokens_padded += pad
        stats.sequences += 1
        self._reset()
        return seq

    def drop(self, stats: PackStats) -> None:
        for source, n in self.owners:
            stats.source(source).tokens_dropped += n
        self._reset()


class DocumentPacker:
    """Streams pretraining documents into full sequences; the tail follows `tail_policy` at `finish`."""

    def __init__(self, seq_len: int, pad_id: int, tail_policy: str = "pad"):
        if tail_policy not in ("pad", "drop"):
            raise ValueError(f"tail_policy must be 'pad' or 'drop', got {tail_policy!r}")
        self.stats = PackStats(seq_len)
        self.tail_policy = tail_policy
        self._builder = _SequenceBuilder(seq_len, pad_id)

    def add(self, tokens: np.ndarray, source: str = "default") -> Iterator[Sequence]:
        tokens = np.asarray(tokens, dtype=np.int32)
        if len(tokens) == 0:
            return
        self.stats.count_in(source, len(tokens))
        start = 0
        while start < len(tokens):
            take = min(self._builder.room, len(tokens) - start)
            piece = tokens[start : start + take]
            self._builder.add(piece, piece, source)
            start += take
            if self._builder.room == 0:
                yield self._builder.emit(self.stats)

    def finish(self) -> Iterator[Sequence]:
        if self._builder.length == 0:
            return
        if self.tail_policy == "pad":
            yield self._builder.emit(self.stats)
        else:
            self._builder.drop(self.stats)


class ConversationPacker:
    """Packs SFT conversations whole (next-fit); pads each sequence's end. Over-long ones: truncate or drop."""

    def __init__(self, seq_len: int, pad_id: int, overlong: str = "drop"):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong policy must be 'truncate' or 'drop', got {overlong!r}")
        self.stats = PackStats(seq_len)
        self.overlong = overlong
        self.conversations_truncated = 0
        self.conversations_dropped = 0
        self._builder = _SequenceBuilder(seq_len, pad_id)

    def add(self, tokens: np.ndarray, labels: np.ndarray, source: str = "default") -> Iterator[Sequence]:
        tokens = np.asarray(tokens, dtype=np.int32)
        labels = np.asarray(labels, dtype=np.int32)
        if len(tokens) == 0:
            return
        src = self.stats.count_in(source, len(tokens))
        seq_len = self.stats.seq_len
        if len(tokens) > seq_len:
            if self.overlong == "drop":
                src.tokens_dropped += len(tokens)
                self.conversations_dropped += 1
                return
            src.tokens_dropped += len(tokens) - seq_len
            tokens, labels = tokens[:seq_len], labels[:seq_len]
            self.conversations_truncated += 1
        if len(tokens) > self._builder.room:
            yield self._builder.emit(self.stats)
        self._builder.add(tokens, labels, source)
        if self._builder.room == 0:
            yield self._builder.emit(self.stats)

    def finish(self) -> Iterator[Sequence]:
        if self._builder.length:
            yield self._builder.emit(self.stats)


def length_copies(n_tokens: int, origin: str, short_below: int, short_keep: float, long_above: int,
                  long_repeat: float, seed: int = 0) -> int:
    """How many times a document of n_tokens enters the packer: 0/1 for short ones (kept with probability
    short_keep), floor(long_repeat) plus one more with probability frac(long_repeat) for long ones, 1 else.
    Deterministic per (seed, origin), so reruns and the cache agree."""
    import hashlib

    u = int.from_bytes(hashlib.blake2b(f"{seed}|{origin}".encode(), digest_size=8).digest(), "big") / 2**64
    if n_tokens < short_below:
        return int(u < short_keep)
    if n_tokens > long_above:
        whole = int(long_repeat)
        return whole + int(u < long_repeat - whole)
    return 1
