"""What the data stage reads and in what order (raylong/data/pieces.py), and the order a worker trains on
the packed sequences (SequenceLoader): no Ray here, real files on disk."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from raylong.config import SourceConfig
from raylong.data.pieces import Piece, cut_pieces, interleave, plan_pieces, read_piece, read_tasks
from raylong.data.sources import resolve_source_files
from raylong.data.sources import parse_file
from tests.conftest import STDLIB


def stdlib_jsonl(path: str, pattern_dir: str = "email", limit: int = 40) -> bytes:
    """Real text: one JSON line per standard-library file, with a blank and a malformed line in the middle."""
    names = sorted(n for n in os.listdir(f"{STDLIB}/{pattern_dir}") if n.endswith(".py"))[:limit]
    lines = [json.dumps({"text": open(f"{STDLIB}/{pattern_dir}/{n}").read()}) for n in names]
    lines[len(lines) // 2 : len(lines) // 2] = ["", "{not json"]
    raw = ("\n".join(lines) + "\n").encode()
    with open(path, "wb") as f:
        f.write(raw)
    return raw


def records(pieces, src):
    out, bad = [], []
    for piece in pieces:
        for parsed in read_piece(piece, src, sft=False):
            out += parsed.records
            bad += parsed.bad
    return out, bad


@pytest.mark.parametrize("max_bytes", [4096, 10_000, 1 << 30])
def test_a_jsonl_file_cut_in_byte_ranges_yields_every_line_once(tmp_path, max_bytes, monkeypatch):
    path = str(tmp_path / "a.jsonl")
    raw = stdlib_jsonl(path)
    src = SourceConfig(name="a", path=path, format="jsonl")
    pieces = cut_pieces(src, [path], {path: len(raw)}, max_bytes)
    assert all(p.file_size == len(raw) for p in pieces)
    assert len(pieces) == -(-len(raw) // max_bytes)
    got, bad = records(pieces, src)
    whole = parse_file(path, raw, src, sft=False)
    assert [r.text for r in got] == [r.text for r in whole.records] and len(got) >= 20
    assert [b.reason for b in bad] == [b.reason for b in whole.bad] == ["malformed JSON: Expecting property name "
                                                                         "enclosed in double quotes"]
    assert [r.origin for r in got] == [r.origin for r in whole.records]  # file:line, whichever piece
    # in a file too large to count its lines per piece, a record is named by its byte offset
    monkeypatch.setattr("raylong.data.pieces.LINE_NUMBERS_UP_TO", len(raw) - 1)
    got, _ = records(pieces, src)
    for r in got:
        line = raw[int(r.origin.rsplit("@", 1)[1]):].split(b"\n", 1)[0]
        assert json.loads(line)["text"] == r.text


def test_compressed_sources_read_like_plain_ones_and_damage_is_reported(tmp_path):
    plain = str(tmp_path / "a.jsonl")
    raw = stdlib_jsonl(plain)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    src = SourceConfig(name="a", path=plain, format="jsonl")
    want = [r.text for r in records([Piece("a", plain)], src)[0]]
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        got, bad = records([Piece("a", str(tmp_path / name))], src)
        assert [r.text for r in got] == want and len(bad) == 1, name
    # a truncated archive: the lines before the damage are kept, the file is named as bad
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(raw)[: len(raw) // 6])
    got, bad = records([Piece("a", str(tmp_path / "cut.jsonl.gz"))], src)
    assert 0 < len(got) < len(want) and [r.text for r in got] == want[: len(got)]
    assert bad[-1].origin.endswith("cut.jsonl.gz") and bad[-1].reason.startswith("cannot decompress")
    # a text source: one document per (compressed) file
    text_src = SourceConfig(name="t", path=str(tmp_path), format="text")
    doc = open(f"{STDLIB}/email/message.py").read()
    (tmp_path / "d.py.gz").write_bytes(gzip.compress(doc.encode()))
    got, bad = records([Piece("t", str(tmp_path / "d.py.gz"))], text_src)
    assert [r.text for r in got] == [doc] and not bad


def test_a_parquet_file_cut_in_row_group_runs_yields_every_row_once(tmp_path):
    names = sorted(n for n in os.listdir(f"{STDLIB}/email") if n.endswith(".py"))[:40]
    texts = [open(f"{STDLIB}/email/{n}").read() for n in names]
    texts[7] = "   "  # a bad row: its origin must name row 7 of the file, whichever piece reads it
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2)
    size = os.path.getsize(path)
    src = SourceConfig(name="a", path=path, format="parquet")
    groups = pq.ParquetFile(path).metadata.num_row_groups
    whole = cut_pieces(src, [path], {path: size}, size)
    pieces = cut_pieces(src, [path], {path: size}, size // 6)
    assert len(whole) == 1 and 5 <= len(pieces) < groups, pieces
    assert pieces[0].start == 0 and pieces[-1].end == groups
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # runs of row groups, none skipped
    assert all((p.size <= size // 6 or p.end - p.start == 1) and p.file_size == size for p in pieces)
    for cut in (whole, pieces):
        got, bad = records(cut, src)
        assert [r.text for r in got] == texts[:7] + texts[8:]
        assert [r.origin for r in got] == [f"{path}#{i}" for i in range(len(texts)) if i != 7]
        assert [(b.origin, b.reason) for b in bad] == [(f"{path}#7", "empty document")]
    # a missing column is one bad record for the file, not one per piece
    _, bad = records(pieces, SourceConfig(name="a", path=path, format="parquet", text_field="body"))
    assert [(b.origin, b.reason) for b in bad] == [(path, "missing column 'body'")]


def test_pieces_interleave_by_weight_from_the_first_piece():
    pieces = {"a": [Piece("a", f"a{i}", size=100) for i in range(300)],
              "b": [Piece("b", f"b{i}", size=300) for i in range(100)]}
    order = interleave(pieces, {"a": 3.0, "b": 1.0})
    assert sorted(p.path for p in order) == sorted(p.path for ps in pieces.values() for p in ps)
    assert [p.path for p in order if p.source == "a"] == [f"a{i}" for i in range(300)]  # file order kept
    # in every prefix of the order, while both sources last, the bytes of "a" are 3/4 of all to within
    # one piece (the finest a piece order can mix)
    taken = {"a": 0, "b": 0}
    for i, p in enumerate(order[:330]):  # "a" runs out at 333
        taken[p.source] += p.size
        assert abs(taken["a"] - 0.75 * (taken["a"] + taken["b"])) <= 300, (i, taken)


def test_read_tasks_group_consecutive_pieces_and_keep_the_order():
    sizes = [10] * 50 + [400] + [10] * 49 + [150, 150]  # a large piece, and two that exceed a share together
    pieces = [Piece("a" if i % 3 else "b", f"f{i}", size=s) for i, s in enumerate(sizes)]
    tasks = read_tasks(pieces, 8)  # share: 1690 / 8 = 211 estimated tokens per task
    assert [p for t in tasks for p in t] == pieces  # every piece once, in the plan's order
    assert [pieces[50]] in tasks  # larger than a share: a task of its own
    assert all(sum(p.size for p in t) <= 211 for t in tasks if len(t) > 1)
    assert 8 <= len(tasks) <= 10, [len(t) for t in tasks]
    assert read_tasks(pieces, 1000) == [[p] for p in pieces]  # more tasks than pieces: one piece each


def test_document_encoder_without_transformers_encodes_as_the_tokenizer_does(tokenizer_dir):
    """Tokenizer actors encode documents with the fast tokenizer's backend alone (no transformers import):
    the same ids as the transformers tokenizer, BOS/EOS included, on real text with unicode and blank lines."""
    from raylong.data.tokenize import DocumentEncoder, encode_documents, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    texts = [open(f"{STDLIB}/{n}", encoding="utf-8").read() for n in ("textwrap.py", "string.py", "locale.py")]
    texts += ["naïve café — 東京\n\n  tabs\tand trailing  ", "x"]
    for separator in ("eos", "none"):
        encoder = DocumentEncoder.of(tok, separator)
        want = [w.tolist() for w in encode_documents(tok, texts, separator)]
        for threads in (None, 1):  # batch encoding on all cores; one document at a time on one thread
            got = encoder.encode(encoder.load(), texts, threads)
            assert [g.tolist() for g in got] == want
        assert got[-1][0] == tok.bos_token_id and (got[-1][-1] == tok.eos_token_id) == (separator == "eos")


def test_one_file_sources_are_cut_finely_enough_to_mix(tmp_path, tokenizer_dir):
    from raylong.data.tokenize import load_tokenizer

    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    stdlib_jsonl(a, "email")
    stdlib_jsonl(b, "logging")
    srcs = [SourceConfig(name="a", path=a, format="jsonl", weight=1.0),
            SourceConfig(name="b", path=b, format="jsonl", weight=1.0)]
    files = {"a": resolve_source_files(a, "jsonl"), "b": resolve_source_files(b, "jsonl")}
    order = plan_pieces(srcs, files, load_tokenizer(tokenizer_dir), sft=False)
    assert len(order) > 20
    first_half = [p.source for p in order[: len(order) // 2]]
    assert 0.3 < first_half.count("a") / len(first_half) < 0.7, first_half


# ------------------------------------------------------------------------------------- training order
def write_sequences(path: str, n: int, groups_of: int) -> None:
    rows = {k: [[i * 10 + j for j in range(4)] for i in range(n)] for k in ("input_ids", "position_ids", "labels")}
    schema = pa.schema([(k, pa.list_(pa.int32())) for k in rows])
    pq.write_table(pa.table(rows, schema=schema), path, row_group_size=groups_of)


def test_the_training_order_is_a_seeded_permutation_a_resumed_loader_continues(tmp_path):
    from raylong.train.batches import SequenceLoader

    path = str(tmp_path / "train.parquet")
    write_sequences(path, 23, groups_of=5)
    first = lambda b: int(b["input_ids"][0, 0]) // 10  # noqa: E731  the file row a batch came from

    plain = [first(b) for b in SequenceLoader(path, 0, 1)]
    assert plain == list(range(23))
    ranks = [[first(b) for b in SequenceLoader(path, r, 2, seed=7)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 11 and not set(ranks[0]) & set(ranks[1])
    assert ranks[0] + ranks[1] != sorted(ranks[0] + ranks[1])  # shuffled
    assert ranks == [[first(b) for b in SequenceLoader(path, r, 2, seed=7)] for r in range(2)]  # reproducible
    assert ranks != [[first(b) for b in SequenceLoader(path, r, 2, seed=8)] for r in range(2)]
    resumed = SequenceLoader(path, 1, 2, start=4, seed=7)
    assert [first(b) for b in resumed] == ranks[1][4:]  # the first pass continues where it stopped
    assert [first(b) for b in resumed] == ranks[1]  # later passes are whole
    batch = next(iter(SequenceLoader(path, 0, 1, seed=7)))
    row = first(batch)
    assert batch["labels"].dtype == np.int64 or str(batch["labels"].dtype) == "torch.int64"
    assert batch["labels"].tolist() == [[row * 10 + j for j in range(4)]] and batch["labels"].shape == (1, 4)


def test_positions_run_through_the_sequence_when_documents_attend_across_boundaries(tmp_path):
    from raylong.train.batches import SequenceLoader

    path = str(tmp_path / "train.parquet")
    rows = {"input_ids": [[5, 6, 7, 8, 9, 10]], "position_ids": [[0, 1, 2, 0, 1, 0]], "labels": [[5, 6, 7, 8, 9, 10]]}
    pq.write_table(pa.table(rows, schema=pa.schema([(k, pa.list_(pa.int32())) for k in rows])), path)
    per_doc = next(iter(SequenceLoader(path, 0, 1)))
    across = next(iter(SequenceLoader(path, 0, 1, per_document_positions=False)))
    assert per_doc["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert across["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert across["input_ids"].tolist() == per_doc["input_ids"].tolist()
