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

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylong.config import DataConfig, SourceConfig, StageConfig, config_hash
from raylong.data.packing import ConversationPacker, DocumentPacker, PackStats, length_copies
from raylong.storage import read_text, write_text
from raylong.data.sources import BadRecord, ParsedFile, filesystem_and_path, parse_file, record_from_object, resolve_files

log = logging.getLogger("raylong.data")

COMPLETE = "_COMPLETE.json"
TOKENS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
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
    directory: str
    train_path: str
    heldout_path: str
    report: dict[str, Any]
    cached: bool

    @property
    def train_sequences(self) -> int:
        return int(self.report["sequences_train"])


# ------------------------------------------------------------------------------ Ray Data workers
def _parse_source(batch: dict[str, np.ndarray], source: SourceConfig, sft: bool) -> dict[str, list]:
    """Ray Data task fn: file bytes (or Parquet rows) of one source -> records / bad records."""
    parsed = ParsedFile()
    if source.format == "parquet":
        fields = [k for k in batch if k != "path"]
        for i, path in enumerate(batch["path"]):
            origin = f"{path}#{i}"
            rec, reason = record_from_object({k: _py(batch[k][i]) for k in fields}, source, origin, sft)
            if rec is None:
                parsed.bad.append(BadRecord(source.name, origin, reason))
            else:
                parsed.records.append(rec)
    else:
        for path, data in zip(batch["path"], batch["bytes"]):
            one = parse_file(str(path), bytes(data), source, sft)
            parsed.records += one.records
            parsed.bad += one.bad
    rows: dict[str, list] = {"source": [], "origin": [], "text": [], "messages": [], "error": []}
    for r in parsed.records:
        rows["source"].append(r.source)
        rows["origin"].append(r.origin)
        rows["text"].append(r.text or "")
        rows["messages"].append(json.dumps(r.messages) if r.messages else "")
        rows["error"].append("")
    for b in parsed.bad:
        rows["source"].append(b.source)
        rows["origin"].append(b.origin)
        rows["text"].append("")
        rows["messages"].append("")
        rows["error"].append(b.reason)
    return rows


def _py(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Tokenize:
    """Ray Data actor: loads the tokenizer once, encodes documents or conversations in batches."""

    def __init__(self, tokenizer_dir: str, sft: bool, separator: str):
        from raylong.data.tokenize import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.sft, self.separator = sft, separator

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from raylong.data.tokenize import encode_conversation, encode_documents

        n = len(batch["source"])
        ok = [i for i in range(n) if not batch["error"][i]]
        tokens: list[list[int] | None] = [[] for _ in range(n)]
        labels: list[list[int] | None] = [[] for _ in range(n)]
        if self.sft:
            for i in ok:
                ids, lab = encode_conversation(self.tok, json.loads(batch["messages"][i]))
                tokens[i], labels[i] = ids.tolist(), lab.tolist()
        elif ok:
            for i, ids in zip(ok, encode_documents(self.tok, [str(batch["text"][i]) for i in ok], self.separator)):
                tokens[i] = ids.tolist()
        return pa.table(
            {
                "source": [str(s) for s in batch["source"]],
                "origin": [str(s) for s in batch["origin"]],
                "tokens": tokens,
                "labels": labels,
                "error": [str(e) for e in batch["error"]],
            },
            schema=TOKENS_SCHEMA,
        )


def tokenized_dataset(sources: dict[str, list[str]], data: DataConfig, tokenizer_dir: str, sft: bool, cpus: float = 2):
    """Ray Dataset of {source, origin, tokens, labels, error}: read + parse (tasks), tokenize (actors)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic packing, held-out split and cache
    parsed = []
    for src in data.sources:
        files = sources[src.name]
        if src.format == "parquet":
            cols = [src.messages_field] if sft else [src.text_field]
            ds = ray.data.read_parquet(files, columns=cols, include_paths=True, num_cpus=0.25)
        else:
            ds = ray.data.read_binary_files(files, include_paths=True, num_cpus=0.25)
        parsed.append(ds.map_batches(_parse_source, fn_kwargs={"source": src, "sft": sft}, batch_size=16, num_cpus=0.25))
    ds = parsed[0].union(*parsed[1:]) if len(parsed) > 1 else parsed[0]
    pool = max(1, int(cpus))
    return ds.map_batches(
        _Tokenize,
        fn_constructor_args=(tokenizer_dir, sft, data.separator),
        batch_size=64,
        num_cpus=0.5,
        compute=ray.data.ActorPoolStrategy(size=pool),
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


def resolve_sources(data: DataConfig, generated: dict[str, str]) -> dict[str, list[str]]:
    out = {}
    for src in data.sources:
        path = generated.get(src.name, src.path)
        try:
            files = resolve_files(path, src.format)
        except FileNotFoundError as exc:
            raise DataError(f"data source {src.name!r}: {exc}") from None
        if not files:
            raise DataError(f"data source {src.name!r}: no files match {path!r}")
        out[src.name] = files
    return out


def cache_key(stage: StageConfig, files: dict[str, list[str]], tokenizer_dir: str) -> str:
    """Hash of source identities (path, size, mtime), the tokenizer files and the packing settings."""
    h = hashlib.sha256()
    for name in sorted(files):
        for f in files[name]:
            fs, local = filesystem_and_path(f)
            info = fs.get_file_info(local)
            h.update(f"{name}|{f}|{info.size}|{info.mtime_ns}\n".encode())
    fs, local = filesystem_and_path(tokenizer_dir)
    for info in sorted(fs.get_file_info(pafs.FileSelector(local, recursive=True)), key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    packing = {"kind": stage.kind, "seq_len": stage.seq_len, "data": stage.data.model_dump(mode="json")}
    h.update(json.dumps(packing, sort_keys=True).encode())
    return h.hexdigest()[:16]


class _SequenceWriter:
    """Buffers packed sequences and writes them to Parquet in small row groups."""

    def __init__(self, fs: pafs.FileSystem, path: str, seq_len: int):
        self.writer = pq.ParquetWriter(path, SEQUENCE_SCHEMA, filesystem=fs)
        self.rows_per_group = max(1, (1 << 22) // seq_len)
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


def prepare_stage_data(stage: StageConfig, tokenizer_dir: str, data_root: str, cpus: float = 2) -> PreparedData:
    """Prepare (or reuse) the packed data of one stage. Raises DataError on bad input, before training."""
    from raylong.data.tokenize import load_tokenizer

    data = stage.data
    sft = stage.kind == "sft"
    generated = materialize_generated_sources(data, tokenizer_dir, f"{data_root}/generated")
    files = resolve_sources(data, generated)
    key = cache_key(stage, files, tokenizer_dir)
    directory = f"{data_root}/{stage.name}-{key}"
    fs, local = filesystem_and_path(directory)
    train_path, heldout_path = f"{local}/train.parquet", f"{local}/heldout.parquet"
    marker = read_text(f"{directory}/{COMPLETE}")
    done = json.loads(marker) if marker is not None else None
    if done is not None:
        log.info("data %s: reusing %s (%d sequences)", stage.name, directory, done["sequences_train"])
        return PreparedData(directory, train_path, heldout_path, done, cached=True)
    fs.create_dir(local, recursive=True)
    for stale in (COMPLETE, "report.json"):
        fs.delete_file(f"{local}/{stale}") if fs.get_file_info(f"{local}/{stale}").type == pafs.FileType.File else None

    tok = load_tokenizer(tokenizer_dir)
    pad_id = tok.pad_token_id
    packer = (
        ConversationPacker(stage.seq_len, pad_id, data.sft_overlong)
        if sft
        else DocumentPacker(stage.seq_len, pad_id, data.tail_policy)
    )
    weights = {s.name: s.weight for s in data.sources}
    total_w = sum(weights.values())
    budget = {n: (data.token_budget * w / total_w if data.token_budget else float("inf")) for n, w in weights.items()}
    over_budget = {n: 0 for n in weights}
    resampled = {n: {"skipped_short": 0, "extra_long_copies": 0} for n in weights}
    ls = data.length_sampling
    heldout_every = round(1 / data.heldout_fraction) if data.heldout_fraction > 0 else 0
    train_w = _SequenceWriter(fs, train_path, stage.seq_len)
    held_w = _SequenceWriter(fs, heldout_path, stage.seq_len)
    bad: list[dict] = []
    records = 0
    n_seq = 0

    def emit(seqs) -> None:
        nonlocal n_seq
        for seq in seqs:
            n_seq += 1
            (held_w if heldout_every and n_seq % heldout_every == 0 else train_w).write(seq)

    t0 = last_log = time.time()
    ds = tokenized_dataset(files, data, tokenizer_dir, sft, cpus)
    first_batch_s = None
    for batch in ds.iter_batches(batch_size=64, batch_format="pyarrow"):
        if first_batch_s is None:  # the fixed cost: planning, actor start-up, tokenizer load, first block
            first_batch_s = time.time() - t0
        rows = zip(batch.column("source").to_pylist(), batch.column("origin").to_pylist(),
                   numpy_lists(batch.column("tokens")), numpy_lists(batch.column("labels")),
                   batch.column("error").to_pylist())
        for source, origin, tokens, labels, error in rows:
            records += 1
            if error:
                bad.append({"source": source, "origin": origin, "reason": error})
                continue
            if packer.stats.source(source).tokens_in >= budget[source]:
                over_budget[source] += 1
                continue
            copies = 1 if ls is None else length_copies(len(tokens), origin, ls.short_below, ls.short_keep,
                                                         ls.long_above, ls.long_repeat, data.seed)
            if copies == 0:
                resampled[source]["skipped_short"] += 1
            resampled[source]["extra_long_copies"] += max(0, copies - 1)
            for _ in range(copies):
                emit(packer.add(tokens, labels, source) if sft else packer.add(tokens, source))
        if time.time() - last_log > 10:
            last_log = time.time()
            log.info("data %s: %d records, %.0f tokens/s", stage.name, records, packer.stats.tokens_in / (last_log - t0))
        if all(packer.stats.source(n).tokens_in >= budget[n] for n in weights):
            break  # every source has its share: stop reading
    emit(packer.finish())
    train_w.close()
    held_w.close()
    elapsed = time.time() - t0
    packer.stats.check()

    with fs.open_output_stream(f"{local}/bad_records.jsonl") as f:
        f.write("".join(json.dumps(b) + "\n" for b in bad).encode())
    report = build_report(stage, packer.stats, records, bad, over_budget, weights, train_w.count, held_w.count, elapsed)
    for name, counts in resampled.items():
        report["per_source"][name].update(counts)
    report["seconds_to_first_batch"] = round(first_batch_s or elapsed, 2)
    if isinstance(packer, ConversationPacker):
        report["conversations_truncated"] = packer.conversations_truncated
        report["conversations_dropped"] = packer.conversations_dropped
    write_text(f"{directory}/report.json", json.dumps(report, indent=2))
    check_report(stage, report, bad, directory)
    write_text(f"{directory}/{COMPLETE}", json.dumps(report, indent=2))  # commit marker, last
    log.info(
        "data %s: %d tokens -> %d train + %d held-out sequences of %d in %.1fs (%.0f tokens/s)",
        stage.name, report["tokens_in"], train_w.count, held_w.count, stage.seq_len, elapsed, report["tokens_per_s"],
    )
    return PreparedData(directory, train_path, heldout_path, report, cached=False)


def build_report(stage, stats: PackStats, records, bad, over_budget, weights, n_train, n_held, elapsed) -> dict:
    total_w = sum(weights.values())
    packed = max(1, stats.tokens_packed)
    return {
        "stage": stage.name,
        "seq_len": stage.seq_len,
        "records": records,
        "bad_records": len(bad),
        "documents_in": sum(s.documents for s in stats.per_source.values()),
        "tokens_in": stats.tokens_in,
        "tokens_packed": stats.tokens_packed,
        "tokens_padded": stats.tokens_padded,
        "tokens_dropped": stats.tokens_dropped,
        "sequences_train": n_train,
        "sequences_heldout": n_held,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(stats.tokens_in / max(elapsed, 1e-9), 1),
        "per_source": {
            name: {
                "documents": stats.source(name).documents,
                "tokens_in": stats.source(name).tokens_in,
                "tokens_packed": stats.source(name).tokens_packed,
                "tokens_dropped": stats.source(name).tokens_dropped,
                "documents_over_budget": over_budget[name],
                "share_requested": round(weights[name] / total_w, 4),
                "share_achieved": round(stats.source(name).tokens_packed / packed, 4),
            }
            for name in weights
        },
    }


def check_report(stage: StageConfig, report: dict, bad: list[dict], directory: str) -> None:
    """Fail the stage before training when bad records exceed the budget or nothing was packed."""
    records = max(1, report["records"])
    if report["bad_records"] / records > stage.data.error_budget:
        files = sorted({b["origin"].rsplit(":", 1)[0].split("#")[0] for b in bad})
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
