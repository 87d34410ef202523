"""The data stage: Ray Data reads and tokenizes a stage's sources in parallel; the driver packs the
token stream into exactly seq_len-token sequences and writes Parquet under the pipeline's storage.

Why packing runs on the driver: a single ordered stream carries partial documents across blocks with
no per-block tails, so every token is counted exactly once (packed, padded or dropped). Packing is a
few numpy concatenations per sequence; the expensive part (parse + tokenize) is parallel in Ray Data.

Output (one directory per stage and cache key):
    train.parquet, heldout.parquet   columns input_ids / position_ids / labels (list<int32>)
    bad_records.jsonl                every rejected record with its file and line
    report.json                      counts per source, requested vs achieved share
    _COMPLETE.json                   written last; a directory without it is never reused
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylong.config import DataConfig, SourceConfig, StageConfig, config_hash
from raylong.data.packing import ConversationPacker, DocumentPacker, PackStats, length_copies
from raylong.log import get_logger
from raylong.storage import read_text, write_text
from raylong.data.pieces import CHUNK_CHARS, CHUNK_RECORDS, Piece, plan_pieces, read_piece, read_tasks
from raylong.data.sources import ParsedFile, SourceFile, filesystem_and_path, resolve_source_files
from raylong.data.tokenize import DocumentEncoder

log = get_logger(__name__)

COMPLETE = "_COMPLETE.json"
READ_TASKS_PER_PROCESS = 8  # read tasks per tokenizing process: enough to balance, few enough to spare per-task cost
TRAIN_FILE, HELDOUT_FILE = "train.parquet", "heldout.parquet"
TOKENS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("piece", pa.int32()),  # the piece's place in the plan: a source is exhausted once the stream passes its last
        ("origin", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)
SEQUENCE_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
)


class DataError(ValueError):
    """Bad or missing input found before any training resources are requested."""


@dataclass
class PreparedData:
    directory: str  # a URI or an absolute local path, scheme kept (workers open it as it is)
    report: dict[str, Any]
    cached: bool

    @property
    def train_uri(self) -> str:
        return f"{self.directory}/{TRAIN_FILE}"

    @property
    def heldout_uri(self) -> str:
        return f"{self.directory}/{HELDOUT_FILE}"

    @property
    def train_sequences(self) -> int:
        return int(self.report["sequences_train"])


# ------------------------------------------------------------------------------ Ray Data workers
def _read_pieces(batch: dict[str, np.ndarray], sources: dict[str, SourceConfig], sft: bool,
                 gate=None) -> Iterator[dict[str, list]]:
    """Ray Data task fn: read tasks (each a JSON list of pieces) -> blocks of CHUNK_RECORDS records and bad
    records or CHUNK_CHARS of text, in piece order (the small files of a task share blocks). A piece whose
    source the `gate` (a SourceGate actor) has closed is not read."""
    import ray

    rows, chars = _empty_rows(), 0
    for task in batch["pieces"]:
        for row in json.loads(str(task)):
            index = row.pop("index")
            if gate is not None and not ray.get(gate.admit.remote(row["source"])):
                continue
            src, piece = sources[row["source"]], Piece(**row)
            for parsed in read_piece(piece, src, sft):
                chars += _add_rows(rows, parsed, index)
                if len(rows["source"]) >= CHUNK_RECORDS or chars >= CHUNK_CHARS:
                    yield rows
                    rows, chars = _empty_rows(), 0
    if rows["source"]:
        yield rows


def _empty_rows() -> dict[str, list]:
    return {"source": [], "piece": [], "origin": [], "text": [], "messages": [], "error": []}


def _add_rows(rows: dict[str, list], parsed: ParsedFile, piece: int) -> int:
    """Appends `parsed` to `rows`; returns the characters of text and messages it added."""
    chars = 0
    for r in parsed.records:
        text, messages = r.text or "", json.dumps(r.messages) if r.messages else ""
        for k, v in (("source", r.source), ("piece", piece), ("origin", r.origin), ("text", text),
                     ("messages", messages), ("error", "")):
            rows[k].append(v)
        chars += len(text) + len(messages)
    for b in parsed.bad:
        for k, v in (("source", b.source), ("piece", piece), ("origin", b.origin), ("text", ""), ("messages", ""),
                     ("error", b.reason)):
            rows[k].append(v)
    return chars


def _read_and_encode(batch: dict[str, np.ndarray], sources: dict[str, SourceConfig], encoder: DocumentEncoder,
                     gate=None) -> Iterator[pa.Table]:
    """Ray Data task fn (documents): read tasks -> blocks of tokenized records. A task uses one thread (the
    cluster's CPUs are the parallelism); the encoder's backend is built once per worker process."""
    backend = _document_backend(encoder)
    for rows in _read_pieces(batch, sources, sft=False, gate=gate):
        n = len(rows["source"])
        ok = [i for i in range(n) if not rows["error"][i]]
        tokens = [_EMPTY] * n
        for i, ids in zip(ok, encoder.encode(backend, [rows["text"][i] for i in ok], threads=1)):
            tokens[i] = ids
        yield _tokens_table(rows, tokens, [_EMPTY] * n)


@functools.lru_cache(maxsize=2)
def _document_backend(encoder: DocumentEncoder):
    return encoder.load()


class _Tokenize:
    """Ray Data actor (conversations, or documents of a tokenizer without a `tokenizers` backend): loads the
    transformers tokenizer and its chat template once (~2.5 s), encodes records in batches."""

    def __init__(self, tokenizer_dir: str, sft: bool, separator: str):
        from raylong.data.tokenize import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.sft, self.separator = sft, separator

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from raylong.data.tokenize import encode_conversation, encode_documents

        n = len(batch["source"])
        ok = [i for i in range(n) if not batch["error"][i]]
        tokens, labels = [_EMPTY] * n, [_EMPTY] * n
        if self.sft:
            for i in ok:
                tokens[i], labels[i] = encode_conversation(self.tok, json.loads(batch["messages"][i]))
        elif ok:
            for i, ids in zip(ok, encode_documents(self.tok, [str(batch["text"][i]) for i in ok], self.separator)):
                tokens[i] = ids
        return _tokens_table(batch, tokens, labels)


_EMPTY = np.zeros(0, dtype=np.int32)


class SourceGate:
    """Ray actor: the sources whose share is filled. Read tasks ask it before each piece and skip the pieces of
    a closed source (the driver would turn every record of them away); it counts what they skipped. Which
    pieces are skipped depends on timing; the packed data does not (the driver decides what is packed)."""

    def __init__(self):
        self.closed: set[str] = set()
        self.skipped: dict[str, int] = {}

    def close(self, source: str) -> None:
        self.closed.add(source)

    def admit(self, source: str) -> bool:
        if source in self.closed:
            self.skipped[source] = self.skipped.get(source, 0) + 1
            return False
        return True

    def skipped_pieces(self) -> dict[str, int]:
        return dict(self.skipped)


@contextlib.contextmanager
def source_gate(data: DataConfig):
    """A SourceGate actor for the stage's read tasks, killed after; None without a token budget (no source
    ever fills)."""
    if not data.token_budget:
        yield None
        return
    import ray

    gate = ray.remote(num_cpus=0)(SourceGate).remote()
    try:
        yield gate
    finally:
        ray.kill(gate)


def _tokens_table(rows, tokens: list[np.ndarray], labels: list[np.ndarray]) -> pa.Table:
    """Read rows (lists or numpy columns) with their tokens, as a TOKENS_SCHEMA table."""
    return pa.table(
        {
            "source": [str(s) for s in rows["source"]],
            "piece": np.asarray(rows["piece"], dtype=np.int32),
            "origin": [str(s) for s in rows["origin"]],
            "tokens": int32_lists(tokens),
            "labels": int32_lists(labels),
            "error": [str(e) for e in rows["error"]],
        },
        schema=TOKENS_SCHEMA,
    )


def int32_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """numpy token arrays as one list<int32> Arrow column: offsets + concatenated values, no Python ints."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def tokenizer_pool_size(data: DataConfig) -> int:
    """Tokenizing processes at most: the recipe's data.tokenize_actors, else one per CPU of the cluster now."""
    import ray

    if data.tokenize_actors is not None:
        return data.tokenize_actors
    if not ray.is_initialized():
        ray.init()  # what Ray Data does on a first read outside a driver that joined a cluster
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def tokenized_dataset(pieces: list[Piece], data: DataConfig, tokenizer_dir: str, sft: bool,
                      encoder: DocumentEncoder | None = None, gate=None):
    """Ray Dataset of TOKENS_SCHEMA rows, in piece order. Documents with an `encoder`: tasks that read and
    encode (half a CPU each, at most `pool` at once, no process to start); otherwise read tasks feed an autoscaling pool of tokenizer
    actors (the chat template needs transformers, loaded once per actor). `gate`: see SourceGate."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic packing, held-out split and cache
    sources = {s.name: s for s in data.sources}
    pool = tokenizer_pool_size(data)
    index = {id(p): i for i, p in enumerate(pieces)}
    tasks = read_tasks(pieces, READ_TASKS_PER_PROCESS * pool)
    rows = [{"pieces": json.dumps([{"index": index[id(p)], **p.as_row()} for p in task])} for task in tasks]
    items = ray.data.from_items(rows, override_num_blocks=len(rows))
    if encoder is not None and not sft:
        # half a CPU each, at most one per CPU: a stage's data is prepared while the previous one trains on
        # CPUs its workers hold (docs/troubleshooting.md), one task per CPU when the cluster is idle
        return items.map_batches(_read_and_encode, fn_kwargs={"sources": sources, "encoder": encoder, "gate": gate},
                                 batch_size=1, num_cpus=0.5, concurrency=pool)
    parsed = items.map_batches(_read_pieces, fn_kwargs={"sources": sources, "sft": sft, "gate": gate}, batch_size=1,
                               num_cpus=0.25)
    return parsed.map_batches(
        _Tokenize,
        fn_constructor_args=(tokenizer_dir, sft, data.separator),
        batch_size=64,
        num_cpus=0.5,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
    )


def numpy_lists(column) -> list[np.ndarray]:
    """A list<int32> Arrow column as numpy views (no Python ints): values sliced by offsets."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


# ---------------------------------------------------------------------------------- the stage
def materialize_generated_sources(data: DataConfig, tokenizer_dir: str, out_dir: str) -> dict[str, str]:
    """Write each `generate:` source to a JSONL file keyed by its config; returns {source: path}."""
    from raylong.data.synth import generate_conversations, write_jsonl
    from raylong.data.tokenize import load_tokenizer

    paths = {}
    for src in data.sources:
        if src.generate is None:
            continue
        path = f"{out_dir}/{src.name}-{config_hash(src.generate)}.jsonl"
        fs, local = filesystem_and_path(path)
        if fs.get_file_info(local).type != pafs.FileType.File:
            rows = generate_conversations(src.generate, load_tokenizer(tokenizer_dir))
            write_jsonl(rows, local + ".tmp")
            fs.move(local + ".tmp", local)
        paths[src.name] = path
    return paths


def resolve_sources(data: DataConfig, generated: dict[str, str]) -> dict[str, list[SourceFile]]:
    """Every source's files (generated sources: the file written for them), listed once."""
    out = {}
    for src in data.sources:
        path = generated.get(src.name, src.path)
        try:
            files = resolve_source_files(path, src.format)
        except FileNotFoundError as exc:
            raise DataError(f"data source {src.name!r}: {exc}") from None
        if not files:
            raise DataError(f"data source {src.name!r}: no files match {path!r}")
        out[src.name] = files
    return out


def cache_key(stage: StageConfig, files: dict[str, list[SourceFile]], tokenizer_dir: str) -> str:
    """Hash of source identities (path, size, mtime), the tokenizer files and the packing settings."""
    h = hashlib.sha256()
    for name in sorted(files):
        for f in files[name]:
            h.update(f"{name}|{f.path}|{f.size}|{f.mtime_ns}\n".encode())
    fs, local = filesystem_and_path(tokenizer_dir)
    for info in sorted(fs.get_file_info(pafs.FileSelector(local, recursive=True)), key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    # what changes the packed output (not how it is read: the loader's order, the tokenizer pool)
    data = stage.data.model_dump(mode="json", exclude={"shuffle", "tokenize_actors"})
    packing = {"kind": stage.kind, "seq_len": stage.seq_len, "data": data}
    h.update(json.dumps(packing, sort_keys=True).encode())
    return h.hexdigest()[:16]


class _SequenceWriter:
    """Buffers packed sequences and writes them to Parquet in small row groups."""

    def __init__(self, fs: pafs.FileSystem, path: str, seq_len: int):
        self.writer = pq.ParquetWriter(path, SEQUENCE_SCHEMA, filesystem=fs)
        self.rows_per_group = max(1, (1 << 20) // seq_len)  # a loader reading rows in random order reads groups
        self.buffer: list = []
        self.count = 0

    def write(self, seq) -> None:
        self.buffer.append(seq)
        self.count += 1
        if len(self.buffer) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            cols = {k: [getattr(s, k) for s in self.buffer] for k in SEQUENCE_SCHEMA.names}
            self.writer.write_table(pa.table(cols, schema=SEQUENCE_SCHEMA))
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class SplitWriter:
    """Every `1/heldout_fraction`-th packed sequence to heldout.parquet, the rest to train.parquet."""

    def __init__(self, fs: pafs.FileSystem, local_dir: str, seq_len: int, heldout_fraction: float):
        self.train = _SequenceWriter(fs, f"{local_dir}/{TRAIN_FILE}", seq_len)
        self.heldout = _SequenceWriter(fs, f"{local_dir}/{HELDOUT_FILE}", seq_len)
        self.heldout_every = round(1 / heldout_fraction) if heldout_fraction > 0 else 0
        self.sequences = 0

    def write(self, seqs) -> None:
        for seq in seqs:
            self.sequences += 1
            held = self.heldout_every and self.sequences % self.heldout_every == 0
            (self.heldout if held else self.train).write(seq)

    def close(self) -> None:
        self.train.close()
        self.heldout.close()


class SourceBudget:
    """Each source's token budget (its weight's share of data.token_budget) and length re-sampling, with
    what they turned away or added, per source; and when the stream can stop: every source has its share
    or has no piece left (`last_piece`: each source's last piece in the plan)."""

    def __init__(self, data: DataConfig, last_piece: dict[str, int]):
        self.data = data
        self.weights = {s.name: s.weight for s in data.sources}
        total = sum(self.weights.values())
        self.budget = {n: (data.token_budget * w / total if data.token_budget else float("inf"))
                       for n, w in self.weights.items()}
        self.last_piece = last_piece
        self.over_budget = {n: 0 for n in self.weights}
        self.closed: set[str] = set()
        self.skipped_pieces: dict[str, int] = {}
        self.resampled = {n: {"skipped_short": 0, "extra_long_copies": 0} for n in self.weights}

    def full(self, source: str, stats: PackStats) -> bool:
        return stats.source(source).tokens_in >= self.budget[source]

    def newly_full(self, stats: PackStats) -> list[str]:
        """The sources that have filled their share since the last call."""
        full = [n for n in self.weights if n not in self.closed and self.full(n, stats)]
        self.closed.update(full)
        return full

    def settled(self, stats: PackStats, piece: int) -> bool:
        """Nothing left to read once the stream is at `piece`: each source is full or read to its end (a
        source short of its share no longer keeps the others reading records they would turn away)."""
        return all(self.full(n, stats) or piece > self.last_piece[n] for n in self.weights)

    def short(self, stats: PackStats) -> dict[str, tuple[int, float]]:
        """Sources that ran out below their share: {name: (tokens read, budget)}."""
        return {n: (stats.source(n).tokens_in, b) for n, b in self.budget.items()
                if b != float("inf") and not self.full(n, stats)}

    def copies(self, source: str, n_tokens: int, origin: str) -> int:
        """How many times a document enters the stream (0: skipped as short; > 1: a long one repeated)."""
        ls = self.data.length_sampling
        copies = 1 if ls is None else length_copies(n_tokens, origin, ls.short_below, ls.short_keep, ls.long_above,
                                                     ls.long_repeat, self.data.seed)
        if copies == 0:
            self.resampled[source]["skipped_short"] += 1
        self.resampled[source]["extra_long_copies"] += max(0, copies - 1)
        return copies


@dataclass
class StreamCounts:
    """What one pass over the tokenized stream saw."""

    records: int = 0
    bad: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seconds_to_first_batch: float | None = None  # the fixed cost: Ray Data start-up, the first read task


def cached_data(directory: str) -> PreparedData | None:
    """The stage's data from an earlier run, when its commit marker is there."""
    marker = read_text(f"{directory}/{COMPLETE}")
    if marker is None:
        return None
    report = json.loads(marker)
    log.info("data %s: reusing %s (%d sequences)", report["stage"], directory, report["sequences_train"])
    return PreparedData(directory, report, cached=True)


def pack_stream(stage: StageConfig, ds, packer, budget: SourceBudget, out: SplitWriter, gate=None) -> StreamCounts:
    """Tokenized records -> budget / length re-sampling -> packer -> train / held-out writers. A record of a
    source that has its share is turned away uncounted, bad or not (the `gate`, told when a source fills,
    stops the readers soon after, at a point that depends on timing; the counts do not)."""
    sft = stage.kind == "sft"
    counts = StreamCounts()
    t0 = last_log = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # blocks as the tasks wrote them
        if counts.seconds_to_first_batch is None:
            counts.seconds_to_first_batch = time.time() - t0
        rows = zip(batch.column("source").to_pylist(), batch.column("origin").to_pylist(),
                   numpy_lists(batch.column("tokens")), numpy_lists(batch.column("labels")),
                   batch.column("error").to_pylist())
        for source, origin, tokens, labels, error in rows:
            if budget.full(source, packer.stats):
                budget.over_budget[source] += 1
                continue
            counts.records += 1
            if error:
                counts.bad.append({"source": source, "origin": origin, "reason": error})
                continue
            for _ in range(budget.copies(source, len(tokens), origin)):
                out.write(packer.add(tokens, labels, source) if sft else packer.add(tokens, source))
        if time.time() - last_log > 10:
            last_log = time.time()
            log.info("data %s: %d records, %.0f tokens/s", stage.name, counts.records,
                     packer.stats.tokens_in / (last_log - t0))
        for name in budget.newly_full(packer.stats):
            if gate is not None:
                gate.close.remote(name)
        if budget.settled(packer.stats, batch.column("piece")[batch.num_rows - 1].as_py()):
            break  # every source has its share or is read to its end: stop reading
    out.write(packer.finish())
    out.close()
    if gate is not None:
        import ray

        budget.skipped_pieces = ray.get(gate.skipped_pieces.remote())
    counts.seconds = time.time() - t0
    packer.stats.check()
    for name, (tokens, share) in budget.short(packer.stats).items():
        log.warning("data %s: source %r ran out at %d tokens of its %d-token share; the mixture is off its weights",
                    stage.name, name, tokens, share)
    return counts


def prepare_stage_data(stage: StageConfig, tokenizer_dir: str, data_root: str) -> PreparedData:
    """Prepare (or reuse) the packed data of one stage. Raises DataError on bad input, before training."""
    from raylong.data.tokenize import load_tokenizer

    data = stage.data
    generated = materialize_generated_sources(data, tokenizer_dir, f"{data_root}/generated")
    files = resolve_sources(data, generated)
    directory = f"{data_root}/{stage.name}-{cache_key(stage, files, tokenizer_dir)}"
    cached = cached_data(directory)
    if cached is not None:
        return cached
    fs, local = filesystem_and_path(directory)
    fs.create_dir(local, recursive=True)
    for stale in (COMPLETE, "report.json"):
        if fs.get_file_info(f"{local}/{stale}").type == pafs.FileType.File:
            fs.delete_file(f"{local}/{stale}")

    tok = load_tokenizer(tokenizer_dir)
    pad_id = tok.pad_token_id
    packer = (ConversationPacker(stage.seq_len, pad_id, data.sft_overlong) if stage.kind == "sft"
              else DocumentPacker(stage.seq_len, pad_id, data.tail_policy))
    out = SplitWriter(fs, local, stage.seq_len, data.heldout_fraction)
    pieces = plan_pieces(data.sources, files, tok, stage.kind == "sft")
    budget = SourceBudget(data, {p.source: i for i, p in enumerate(pieces)})
    sft = stage.kind == "sft"
    encoder = None if sft else DocumentEncoder.of(tok, data.separator)
    with source_gate(data) as gate:
        counts = pack_stream(stage, tokenized_dataset(pieces, data, tokenizer_dir, sft, encoder, gate), packer,
                             budget, out, gate)

    with fs.open_output_stream(f"{local}/bad_records.jsonl") as f:
        f.write("".join(json.dumps(b) + "\n" for b in counts.bad).encode())
    report = build_report(stage, packer, budget, counts, out)
    write_text(f"{directory}/report.json", json.dumps(report, indent=2))
    check_report(stage, report, counts.bad, directory)
    write_text(f"{directory}/{COMPLETE}", json.dumps(report, indent=2))  # commit marker, last
    log.info("data %s: %d tokens -> %d train + %d held-out sequences of %d in %.1fs (%.0f tokens/s)", stage.name,
             report["tokens_in"], out.train.count, out.heldout.count, stage.seq_len, counts.seconds,
             report["tokens_per_s"])
    return PreparedData(directory, report, cached=False)


def build_report(stage: StageConfig, packer, budget: SourceBudget, counts: StreamCounts, out: SplitWriter) -> dict:
    stats: PackStats = packer.stats
    total_w = sum(budget.weights.values())
    packed = max(1, stats.tokens_packed)
    report = {
        "stage": stage.name,
        "seq_len": stage.seq_len,
        "records": counts.records,
        "bad_records": len(counts.bad),
        "documents_in": sum(s.documents for s in stats.per_source.values()),
        "tokens_in": stats.tokens_in,
        "tokens_packed": stats.tokens_packed,
        "tokens_padded": stats.tokens_padded,
        "tokens_dropped": stats.tokens_dropped,
        "sequences_train": out.train.count,
        "sequences_heldout": out.heldout.count,
        "seconds": round(counts.seconds, 2),
        "tokens_per_s": round(stats.tokens_in / max(counts.seconds, 1e-9), 1),
        "per_source": {
            name: {
                "documents": stats.source(name).documents,
                "tokens_in": stats.source(name).tokens_in,
                "tokens_packed": stats.source(name).tokens_packed,
                "tokens_dropped": stats.source(name).tokens_dropped,
                "documents_over_budget": budget.over_budget[name],  # read after the share was filled
                "pieces_skipped": budget.skipped_pieces.get(name, 0),  # not read: the share was filled
                "share_requested": round(weight / total_w, 4),
                "share_achieved": round(stats.source(name).tokens_packed / packed, 4),
                **budget.resampled[name],
            }
            for name, weight in budget.weights.items()
        },
        "seconds_to_first_batch": round(counts.seconds_to_first_batch or counts.seconds, 2),
    }
    if isinstance(packer, ConversationPacker):
        report["conversations_truncated"] = packer.conversations_truncated
        report["conversations_dropped"] = packer.conversations_dropped
    return report


def check_report(stage: StageConfig, report: dict, bad: list[dict], directory: str) -> None:
    """Fail the stage before training when bad records exceed the budget or nothing was packed."""
    records = max(1, report["records"])
    if report["bad_records"] / records > stage.data.error_budget:
        files = sorted({re.sub(r"[:@#]\d+$", "", b["origin"]) for b in bad})  # file:line, file@byte, file#row
        example = bad[0]
        raise DataError(
            f"stage {stage.name!r}: {report['bad_records']} of {report['records']} records are bad "
            f"({report['bad_records'] / records:.2%} > data.error_budget {stage.data.error_budget:.2%}); "
            f"files: {files[:5]}{' ...' if len(files) > 5 else ''}; first: {example['origin']}: {example['reason']}; "
            f"all listed in {directory}/bad_records.jsonl"
        )
    if report["sequences_train"] == 0:
        raise DataError(
            f"stage {stage.name!r}: no training sequences of {stage.seq_len} tokens could be packed "
            f"({report['tokens_in']} tokens in, {report['bad_records']} bad records); add data or lower seq_len"
        )
