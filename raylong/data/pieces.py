"""What the data stage reads, and in what order.

Every source's files are cut into pieces: byte ranges of an uncompressed JSONL file (a line belongs to the
piece it starts in, so a multi-GB file is read in parallel, in bounded memory), runs of row groups of a large
Parquet file, whole files otherwise (a compressed file cannot be entered mid-stream; a text file is one
document). The pieces of all sources are
then interleaved by weight, so the tokenized stream carries every source close to its share from its first
sequence on, instead of one corpus and then the next.

Reading a piece yields its records in chunks; a file that cannot be decompressed is a bad record naming
the file, and the records read before the damage are kept.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass, replace

from raylong.config import SourceConfig
from raylong.data.sources import (BadRecord, ParsedFile, SourceFile, filesystem_and_path, parse_line, parse_text,
                                  record_from_object)

MIN_PIECE_BYTES, MAX_PIECE_BYTES = 4 << 10, 64 << 20  # the bounds of a JSONL piece
COMPRESSED_RATIO = 4  # assumed expansion of .gz / .zst, only to order pieces (weights are in tokens)
CHUNK_RECORDS = 256  # records per block a read task hands on, at most
CHUNK_CHARS = 1 << 20  # or about this much text: the first block, and so the first batch, comes early
SAMPLE_BYTES = 64 << 10  # of a source's first file, to estimate its tokens per byte
LINE_NUMBERS_UP_TO = MAX_PIECE_BYTES  # counting lines further would read a large file from its start per piece


@dataclass(frozen=True)
class Piece:
    source: str
    path: str
    start: int = 0  # the lines that start in bytes [start, end) of an uncompressed JSONL file;
    end: int = -1  # row groups [start, end) of a Parquet file. -1: to the end of the file
    size: int = 0  # for ordering: estimated uncompressed bytes, estimated tokens once planned
    file_size: int = 0  # a bad record in a file up to LINE_NUMBERS_UP_TO bytes is named by line, else by byte

    def as_row(self) -> dict:
        return {"source": self.source, "path": self.path, "start": self.start, "end": self.end,
                "file_size": self.file_size}


def compression(path: str) -> str | None:
    return "gzip" if path.endswith(".gz") else "zstd" if path.endswith(".zst") else None


def plan_pieces(sources: list[SourceConfig], files: dict[str, list[SourceFile]], tok, sft: bool) -> list[Piece]:
    """Every source's files cut into pieces, interleaved by weight in estimated tokens (bytes times the
    source's tokens per byte, sampled from its first file). Pieces are about 1/1024 of all the bytes
    (4 KiB to 64 MiB), so each source is cut finely enough to mix even when it is one file."""
    sizes = {f.path: f.size for name in files for f in files[name]}
    max_bytes = min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, sum(sizes.values()) // 1024))
    pieces = {}
    for src in sources:
        paths = [f.path for f in files[src.name]]
        rate = token_rate(src, paths[0], sizes[paths[0]], tok, sft)
        pieces[src.name] = [replace(p, size=max(1, round(p.size * rate)))
                            for p in cut_pieces(src, paths, sizes, max_bytes)]
    return interleave(pieces, {s.name: s.weight for s in sources})


def token_rate(source: SourceConfig, path: str, size: int, tok, sft: bool) -> float:
    """Tokens per byte of a source (uncompressed bytes; for Parquet, bytes of the file), from the first
    records of one file (about SAMPLE_BYTES of them); 1.0 when they say nothing (no valid record, a
    damaged file: the read tasks report those)."""
    try:
        return _sampled_token_rate(source, path, size, tok, sft)
    except (OSError, EOFError, ValueError, KeyError):
        return 1.0


def _sampled_token_rate(source: SourceConfig, path: str, size: int, tok, sft: bool) -> float:
    from raylong.data.tokenize import encode_conversation, encode_documents

    if source.format == "parquet":
        import pyarrow.parquet as pq

        fs, local = filesystem_and_path(path)
        file = pq.ParquetFile(fs.open_input_file(local))
        rows = file.metadata.num_rows
        column = source.messages_field if sft else source.text_field
        first = next(file.iter_batches(batch_size=64, columns=[column]), None)
        objs = [] if first is None else first.to_pylist()
        parsed, nbytes = ParsedFile(), size * len(objs) / max(1, rows)
        for i, obj in enumerate(objs):
            record, _ = record_from_object(obj, source, f"{path}#{i}", sft)
            if record is not None:
                parsed.records.append(record)
    elif source.format == "text":  # one document: its first SAMPLE_BYTES
        parsed = _read_text(Piece(source.name, path), source)
        for r in parsed.records:
            r.text = r.text.encode()[:SAMPLE_BYTES].decode("utf-8", errors="ignore")
        nbytes = sum(len(r.text.encode()) for r in parsed.records)
    else:
        parsed, nbytes = ParsedFile(), 0
        for _, raw in _open_lines(path, 0, -1):
            nbytes += len(raw)
            if raw.strip():
                parse_line(raw, path, source, sft, parsed)
            if nbytes >= SAMPLE_BYTES:
                break
    if not parsed.records or not nbytes:
        return 1.0
    if sft:
        tokens = sum(len(encode_conversation(tok, r.messages)[0]) for r in parsed.records)
    else:
        tokens = sum(map(len, encode_documents(tok, [r.text for r in parsed.records])))
    return tokens / nbytes if tokens else 1.0


def cut_pieces(source: SourceConfig, files: list[str], sizes: dict[str, int], max_bytes: int) -> list[Piece]:
    """One source's files as pieces, in file order."""
    pieces = []
    for path in files:
        size = sizes[path]
        if source.format == "parquet" and size > max_bytes:
            pieces += parquet_pieces(source.name, path, size, max_bytes)
        elif source.format == "jsonl" and compression(path) is None and size > max_bytes:
            pieces += [Piece(source.name, path, s, min(s + max_bytes, size), min(max_bytes, size - s), size)
                       for s in range(0, size, max_bytes)]
        else:
            pieces.append(Piece(source.name, path, size=size * (COMPRESSED_RATIO if compression(path) else 1),
                                file_size=size))
    return pieces


def parquet_pieces(source: str, path: str, size: int, max_bytes: int) -> list[Piece]:
    """A Parquet file as runs of whole row groups of about max_bytes (compressed) each, read from its footer;
    a row group larger than that is a piece of its own."""
    import pyarrow.parquet as pq

    fs, local = filesystem_and_path(path)
    meta = pq.ParquetFile(fs.open_input_file(local)).metadata
    groups = [max(1, sum(g.column(j).total_compressed_size for j in range(g.num_columns)))
              for g in map(meta.row_group, range(meta.num_row_groups))]
    pieces, first, run = [], 0, 0
    for i, nbytes in enumerate(groups):
        if run and run + nbytes > max_bytes:
            pieces.append(Piece(source, path, first, i, run, size))
            first, run = i, 0
        run += nbytes
    if run or not pieces:
        pieces.append(Piece(source, path, first, len(groups), run, size))
    return pieces


def interleave(pieces: dict[str, list[Piece]], weights: dict[str, float]) -> list[Piece]:
    """All pieces, each next one from the source furthest below its weight's share of the bytes so far
    (ties: recipe order). Each source keeps its own file order."""
    taken = {name: 0 for name in pieces}
    cursor = {name: 0 for name in pieces}
    order = {name: i for i, name in enumerate(pieces)}
    out: list[Piece] = []
    while True:
        left = [n for n in pieces if cursor[n] < len(pieces[n])]
        if not left:
            return out
        name = min(left, key=lambda n: (taken[n] / weights[n], order[n]))
        piece = pieces[name][cursor[name]]
        cursor[name] += 1
        taken[name] += max(1, piece.size)
        out.append(piece)


def read_tasks(pieces: list[Piece], tasks: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into about `tasks` read tasks of similar estimated tokens (a piece larger
    than a task's share is a task of its own). The stream's order is the pieces' order either way; grouping
    only spares Ray Data a task and a block per small file (a text corpus is thousands of them)."""
    share = sum(p.size for p in pieces) / max(1, tasks)
    out: list[list[Piece]] = []
    run = 0
    for piece in pieces:
        if not out or run + piece.size > share:
            out.append([])
            run = 0
        out[-1].append(piece)
        run += piece.size
    return out


def _open_lines(path: str, start: int, end: int, by_line: bool = True) -> Iterator[tuple[int, bytes]]:
    """(position, line) of the lines of a file that start in [start, end): the position is the line
    number (`by_line`: the newlines before `start` are counted first), else the line's byte offset."""
    fs, local = filesystem_and_path(path)
    codec = compression(path)
    if codec is not None:  # read whole, decompressed as it streams
        raw = fs.open_input_stream(local, compression=None)  # Ray Data's readers would decompress by suffix too
        yield from enumerate(gzip.GzipFile(fileobj=raw) if codec == "gzip" else _zstd_reader(raw), start=1)
        return
    f = fs.open_input_file(local)
    offset = lineno = 0
    if start > 0:
        if by_line:
            lineno = f.read(start - 1).count(b"\n")
        f.seek(start - 1)
    reader = io.BufferedReader(f)
    if start > 0:
        rest = reader.readline()  # the rest of the line that byte start-1 belongs to
        offset, lineno = start - 1 + len(rest), lineno + rest.endswith(b"\n")
    while end < 0 or offset < end:
        line = reader.readline()
        if not line:
            return
        lineno += 1
        yield (lineno if by_line else offset), line
        offset += len(line)


def _zstd_reader(raw):
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))


def read_piece(piece: Piece, source: SourceConfig, sft: bool) -> Iterator[ParsedFile]:
    """The records and bad records of one piece, CHUNK_RECORDS at a time."""
    if source.format == "text":
        yield _read_text(piece, source)
        return
    if source.format == "parquet":
        yield from _read_parquet(piece, source, sft)
        return
    out = ParsedFile()
    by_line = compression(piece.path) is not None or piece.file_size <= LINE_NUMBERS_UP_TO
    sep = ":" if by_line else "@"  # file:line, or file@byte in a large file (no line count from its start)
    try:
        for pos, raw in _open_lines(piece.path, piece.start, piece.end, by_line):
            if raw.strip():
                parse_line(raw, f"{piece.path}{sep}{pos}", source, sft, out)
            if len(out.records) + len(out.bad) >= CHUNK_RECORDS:
                yield out
                out = ParsedFile()
    except (OSError, EOFError, ValueError) as exc:  # a damaged archive: what was read before it is kept
        out.bad.append(BadRecord(source.name, piece.path, f"cannot decompress: {exc}"))
    yield out


def _read_parquet(piece: Piece, source: SourceConfig, sft: bool) -> Iterator[ParsedFile]:
    """The rows of the piece's row groups, CHUNK_RECORDS at a time (origin: file#row, counted from the file's
    first row)."""
    import pyarrow.parquet as pq

    fs, local = filesystem_and_path(piece.path)
    file = pq.ParquetFile(fs.open_input_file(local))
    column = source.messages_field if sft else source.text_field
    if column not in file.schema_arrow.names:
        if piece.start == 0:  # reported once per file, by its first piece
            yield ParsedFile(bad=[BadRecord(source.name, piece.path, f"missing column {column!r}")])
        return
    meta = file.metadata
    end = meta.num_row_groups if piece.end < 0 else piece.end
    row = sum(meta.row_group(i).num_rows for i in range(piece.start))
    groups = list(range(piece.start, end))
    for table in file.iter_batches(batch_size=CHUNK_RECORDS, columns=[column], row_groups=groups) if groups else ():
        parsed = ParsedFile()
        for obj in table.to_pylist():
            origin = f"{piece.path}#{row}"
            rec, reason = record_from_object(obj, source, origin, sft)
            if rec is None:
                parsed.bad.append(BadRecord(source.name, origin, reason))
            else:
                parsed.records.append(rec)
            row += 1
        yield parsed


def _read_text(piece: Piece, source: SourceConfig) -> ParsedFile:
    try:
        data = b"".join(line for _, line in _open_lines(piece.path, 0, -1))
    except (OSError, EOFError, ValueError) as exc:
        return ParsedFile(bad=[BadRecord(source.name, piece.path, f"cannot decompress: {exc}")])
    return parse_text(piece.path, data, source)
