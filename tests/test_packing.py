"""Packing invariants, proved over generated inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from raylong.data.packing import IGNORE, ConversationPacker, DocumentPacker

docs_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(min_value=1, max_value=300)), min_size=0, max_size=40
)


def make_docs(spec, seed=0):
    rng = np.random.default_rng(seed)
    return [(src, rng.integers(5, 1000, n).astype(np.int32)) for src, n in spec]


@settings(max_examples=200, deadline=None)
@given(spec=docs_strategy, seq_len=st.sampled_from([16, 64, 100, 256]), tail=st.sampled_from(["pad", "drop"]))
def test_document_packing_conserves_tokens_and_restarts_positions(spec, seq_len, tail):
    docs = make_docs(spec)
    packer = DocumentPacker(seq_len, pad_id=0, tail_policy=tail)
    seqs = [s for src, d in docs for s in packer.add(d, src)] + list(packer.finish())
    stats = packer.stats
    stats.check()
    for seq in seqs:
        assert len(seq.input_ids) == len(seq.position_ids) == len(seq.labels) == seq_len
    # concatenating the non-padding tokens of all sequences gives back the input stream (minus a dropped tail)
    stream = np.concatenate([d for _, d in docs]) if docs else np.zeros(0, np.int32)
    packed = np.concatenate([s.input_ids for s in seqs]) if seqs else np.zeros(0, np.int32)
    n_packed = stats.tokens_packed
    assert np.array_equal(packed[:n_packed], stream[:n_packed])
    assert stats.tokens_in == len(stream) == stats.tokens_packed + stats.tokens_dropped
    # positions restart exactly where a document (or a piece of one in a new sequence) starts
    expected_starts = set()
    offset = 0
    for _, d in docs:
        expected_starts.add(offset)
        expected_starts.update(range(offset + (seq_len - offset % seq_len) % seq_len, offset + len(d), seq_len))
        offset += len(d)
    for i, seq in enumerate(seqs):
        real = min(seq_len, max(0, n_packed - i * seq_len))
        for j in range(real):
            g = i * seq_len + j
            assert (seq.position_ids[j] == 0) == (g in expected_starts or j == 0), (i, j)
            assert seq.labels[j] == (IGNORE if seq.position_ids[j] == 0 else seq.input_ids[j])
        assert (seq.labels[real:] == IGNORE).all()


@settings(max_examples=200, deadline=None)
@given(
    convs=st.lists(st.tuples(st.integers(1, 200), st.integers(0, 100)), min_size=0, max_size=30),
    seq_len=st.sampled_from([32, 128, 256]),
    overlong=st.sampled_from(["truncate", "drop"]),
)
def test_conversation_packing_never_splits_and_counts_everything(convs, seq_len, overlong):
    rng = np.random.default_rng(1)
    packer = ConversationPacker(seq_len, pad_id=0, overlong=overlong)
    items = []
    for n, answer in convs:
        ids = rng.integers(5, 1000, n).astype(np.int32)
        labels = np.full(n, IGNORE, np.int32)
        a = min(answer, n - 1)
        labels[n - a :] = ids[n - a :]  # assistant tokens at the end
        items.append((ids, labels))
    seqs = [s for ids, lab in items for s in packer.add(ids, lab)] + list(packer.finish())
    packer.stats.check()
    kept = [(i, l) for i, l in items if len(i) <= seq_len or overlong == "truncate"]
    # every kept conversation appears whole (or truncated to seq_len) inside exactly one sequence
    spans = []
    for seq in seqs:
        assert len(seq.input_ids) == seq_len
        starts = [j for j in range(seq_len) if seq.position_ids[j] == 0]
        spans += [(seq, s, e) for s, e in zip(starts, starts[1:] + [seq_len])]
    real = [(seq, s, e) for seq, s, e in spans if not (seq.input_ids[s:e] == 0).all() or e - s == 0]
    assert len(real) >= len(kept)
    for (ids, lab), (seq, s, e) in zip(kept, real):
        n = min(len(ids), seq_len)
        assert np.array_equal(seq.input_ids[s : s + n], ids[:n])
        expected = lab[:n].copy()
        expected[0] = IGNORE
        assert np.array_equal(seq.labels[s : s + n], expected)
    dropped = sum(len(i) for i, _ in items if len(i) > seq_len and overlong == "drop")
    truncated = sum(len(i) - seq_len for i, _ in items if len(i) > seq_len and overlong == "truncate")
    assert packer.stats.tokens_dropped == dropped + truncated


def test_tail_policies_differ_only_in_the_last_sequence():
    docs = [np.arange(1, 51, dtype=np.int32)]
    pad = DocumentPacker(32, 0, "pad")
    drop = DocumentPacker(32, 0, "drop")
    a = [s for d in docs for s in pad.add(d)] + list(pad.finish())
    b = [s for d in docs for s in drop.add(d)] + list(drop.finish())
    assert len(a) == 2 and len(b) == 1
    assert pad.stats.tokens_padded == 14 and pad.stats.tokens_dropped == 0
    assert drop.stats.tokens_dropped == 18 and drop.stats.tokens_padded == 0


def test_length_sampling_rates_and_determinism():
    from raylong.data.packing import length_copies

    args = dict(short_below=4096, short_keep=0.25, long_above=8192, long_repeat=2.5, seed=7)
    short = [length_copies(100, f"f:{i}", **args) for i in range(4000)]
    long_ = [length_copies(9000, f"f:{i}", **args) for i in range(4000)]
    mid = {length_copies(5000, f"f:{i}", **args) for i in range(100)}
    assert set(short) == {0, 1} and abs(sum(short) / 4000 - 0.25) < 0.03
    assert set(long_) == {2, 3} and abs(sum(long_) / 4000 - 2.5) < 0.05
    assert mid == {1}
    assert short == [length_copies(100, f"f:{i}", **args) for i in range(4000)]  # same origin, same answer


def test_arrow_list_column_to_numpy_views():
    import pyarrow as pa

    from raylong.data.prepare import numpy_lists

    a = pa.array([[1, 2], [3], [], [4, 5, 6]], type=pa.list_(pa.int32()))
    assert [x.tolist() for x in numpy_lists(a.slice(1, 3))] == [[3], [], [4, 5, 6]]
    chunked = pa.chunked_array([a.slice(0, 2), a.slice(3, 1)])
    assert [x.tolist() for x in numpy_lists(chunked)] == [[1, 2], [3], [4, 5, 6]]


def test_compressed_jsonl_and_text_parse_the_same(tmp_path):
    import gzip
    import json

    import zstandard

    from raylong.config import SourceConfig
    from raylong.data.sources import parse_file

    raw = ("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(5)) + "\n").encode()
    src = SourceConfig(name="s", path="x", format="jsonl", text_field="body")
    plain = parse_file("a.jsonl", raw, src, sft=False)
    gz = parse_file("a.jsonl.gz", gzip.compress(raw), src, sft=False)
    zst = parse_file("a.jsonl.zst", zstandard.ZstdCompressor().compress(raw), src, sft=False)
    assert [r.text for r in plain.records] == [r.text for r in gz.records] == [r.text for r in zst.records]
    assert [r.text for r in plain.records] == [f"doc {i}" for i in range(5)]
    broken = parse_file("b.jsonl.gz", b"not gzip", src, sft=False)
    assert broken.records == [] and broken.bad[0].reason.startswith("cannot decompress")
