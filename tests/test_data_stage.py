"""The data stage through real Ray Data: SFT label masks from a real chat template, bad input reported
with file and line, the error budget, the cache and its commit marker."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylong.config import StageConfig
from raylong.data.prepare import COMPLETE, DataError, prepare_stage_data
from tests.conftest import STDLIB

pytestmark = pytest.mark.slow


def sft_stage(path: str, seq_len: int = 256, **data) -> StageConfig:
    return StageConfig.model_validate({
        "name": "sft", "kind": "sft", "seq_len": seq_len,
        "data": {"sources": [{"name": "chat", "path": path, "format": "jsonl"}], "heldout_fraction": 0.0, **data},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })


def pretrain_stage(path: str, fmt: str = "jsonl", **data) -> StageConfig:
    return StageConfig.model_validate({
        "name": "cp", "kind": "pretrain", "seq_len": 128,
        "data": {"sources": [{"name": "docs", "path": path, "format": fmt}], "heldout_fraction": 0.0, **data},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })


CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}],
]


def test_sft_labels_only_on_assistant_tokens(ray_cluster, tokenizer_dir, tmp_path):
    from raylong.data.tokenize import load_tokenizer

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 3))
    data = prepare_stage_data(sft_stage(str(path)), tokenizer_dir, str(tmp_path / "out"))
    tok = load_tokenizer(tokenizer_dir)
    table = pq.read_table(data.train_uri).to_pylist()
    learned = []
    for row in table:
        ids, labels, pos = map(np.asarray, (row["input_ids"], row["labels"], row["position_ids"]))
        starts = list(np.flatnonzero(pos == 0))
        for s, e in zip(starts, starts[1:] + [len(ids)]):
            mask = labels[s:e] != -100
            if mask.any():
                learned.append(tok.decode(ids[s:e][mask]))
    assert learned == ["Paris.<|eot_id|>Rome.<|eot_id|>", "hi there<|eot_id|>"] * 3
    r = data.report
    assert r["tokens_in"] == r["tokens_packed"] + r["tokens_dropped"]
    assert r["sequences_train"] * 256 == r["tokens_packed"] + r["tokens_padded"]


def test_bad_records_are_reported_with_file_and_line(ray_cluster, tokenizer_dir, tmp_path):
    good = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(2000)]
    bad = ["{not json", json.dumps({"body": "no text field"}), json.dumps({"text": 42}), json.dumps({"text": "   "})]
    lines = good[:500] + [bad[0]] + good[500:1000] + [bad[1]] + good[1000:] + [bad[2], bad[3]]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe broken"}\n')
    with pytest.raises(DataError) as info:  # 5 bad of 2005 = 0.25% > default budget 0.1%
        prepare_stage_data(pretrain_stage(str(path)), tokenizer_dir, str(tmp_path / "out1"))
    assert "5 of 2005 records are bad" in str(info.value) and "docs.jsonl" in str(info.value)

    data = prepare_stage_data(pretrain_stage(str(path), error_budget=0.01), tokenizer_dir, str(tmp_path / "out2"))
    with open(os.path.join(data.directory, "bad_records.jsonl")) as f:
        reported = {json.loads(l)["origin"].rsplit(":", 1)[1]: json.loads(l)["reason"] for l in f}
    assert reported == {
        "501": "malformed JSON: Expecting property name enclosed in double quotes",
        "1002": "missing field 'text'",
        "2003": "field 'text' is int, not a string",
        "2004": "empty document",
        "2005": "invalid UTF-8 at byte 10",
    }
    assert data.report["documents_in"] == 2000 and data.report["bad_records"] == 5


def test_missing_and_empty_sources_fail_clearly(ray_cluster, tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="data source 'docs': data source path does not exist"):
        prepare_stage_data(pretrain_stage(str(tmp_path / "nope.jsonl")), tokenizer_dir, str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files match"):
        prepare_stage_data(pretrain_stage(str(tmp_path / "empty" / "*.jsonl")), tokenizer_dir, str(tmp_path / "o"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no training sequences"):
        prepare_stage_data(pretrain_stage(str(tmp_path / "blank.jsonl")), tokenizer_dir, str(tmp_path / "o"))


def test_cache_reused_and_incomplete_output_never_reused(ray_cluster, tokenizer_dir, tmp_path):
    stage = pretrain_stage(f"{STDLIB}/json/*.py", fmt="text", token_budget=5000)
    first = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "out"))
    assert not first.cached
    again = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "out"))
    assert again.cached and again.directory == first.directory
    assert pq.read_table(again.train_uri).num_rows == first.train_sequences
    os.remove(os.path.join(first.directory, COMPLETE))  # as if the first run had crashed before its marker
    redo = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "out"))
    assert not redo.cached and redo.report["tokens_in"] == first.report["tokens_in"]
    assert os.path.exists(os.path.join(first.directory, COMPLETE))


def test_parquet_source_and_mixture_shares(ray_cluster, tokenizer_dir, tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"content": [f"def a{i}():\n    return {i}\n" * 20 for i in range(200)]}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"class B{i}:\n    pass\n" * 20}) + "\n"
                                              for i in range(200)))
    stage = StageConfig.model_validate({
        "name": "mix", "kind": "pretrain", "seq_len": 128,
        "data": {"sources": [{"name": "pq", "path": str(tmp_path / "a.parquet"), "format": "parquet",
                              "text_field": "content", "weight": 3},
                             {"name": "js", "path": f"file://{tmp_path}/b.jsonl", "format": "jsonl", "weight": 1}],
                 "token_budget": 8000, "heldout_fraction": 0.2},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })
    data = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "out"))
    per = data.report["per_source"]
    assert per["pq"]["share_requested"] == 0.75 and abs(per["pq"]["share_achieved"] - 0.75) < 0.05
    assert all(per[n]["documents_over_budget"] + per[n]["pieces_skipped"] > 0 for n in per)  # the budget applied
    train = {tuple(r["input_ids"]) for r in pq.read_table(data.train_uri).to_pylist()}
    held = {tuple(r["input_ids"]) for r in pq.read_table(data.heldout_uri).to_pylist()}
    assert held and train and not (train & held)  # evaluation never sees a training sequence
    assert len(train) + len(held) == data.report["sequences_train"] + data.report["sequences_heldout"]


def test_compressed_sources_through_ray_data_keep_every_token(ray_cluster, tokenizer_dir, tmp_path):
    """The same corpus as .jsonl, .jsonl.gz and .jsonl.zst (and a text source as .gz files) packs into the
    same sequences: nothing decompressed twice, nothing lost."""
    import gzip

    import pyarrow as pa
    import zstandard

    from tests.test_pieces import stdlib_jsonl

    raw = stdlib_jsonl(str(tmp_path / "plain.jsonl"))
    (tmp_path / "gz.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    packed = {}
    for name in ("plain.jsonl", "gz.jsonl.gz", "zst.jsonl.zst"):
        data = prepare_stage_data(pretrain_stage(str(tmp_path / name), error_budget=0.05), tokenizer_dir,
                                  str(tmp_path / f"out-{name}"))
        assert data.report["bad_records"] == 1 and data.report["documents_in"] >= 20, (name, data.report)
        packed[name] = (data.report["tokens_in"], pq.read_table(data.train_uri).column("input_ids").to_pylist())
    assert packed["gz.jsonl.gz"] == packed["plain.jsonl"] == packed["zst.jsonl.zst"]

    # the same documents as a Parquet file of many row groups, read in row-group pieces by parallel tasks
    texts = [json.loads(line)["text"] for line in raw.decode().splitlines() if line.strip().startswith('{"')]
    pq.write_table(pa.table({"text": texts}), tmp_path / "rows.parquet", row_group_size=2)
    assert pq.ParquetFile(tmp_path / "rows.parquet").metadata.num_row_groups >= 10
    data = prepare_stage_data(pretrain_stage(str(tmp_path / "rows.parquet"), fmt="parquet"), tokenizer_dir,
                              str(tmp_path / "out-parquet"))
    assert data.report["bad_records"] == 0 and data.report["documents_in"] == len(texts)
    assert (data.report["tokens_in"], pq.read_table(data.train_uri).column("input_ids").to_pylist()) == packed[
        "plain.jsonl"]

    (tmp_path / "texts").mkdir()
    names = sorted(n for n in os.listdir(f"{STDLIB}/json") if n.endswith(".py"))
    for n in names:
        (tmp_path / "texts" / f"{n}.gz").write_bytes(gzip.compress(open(f"{STDLIB}/json/{n}", "rb").read()))
    plain = prepare_stage_data(pretrain_stage(f"{STDLIB}/json/*.py", fmt="text"), tokenizer_dir, str(tmp_path / "t1"))
    gz = prepare_stage_data(pretrain_stage(f"{tmp_path}/texts/*.gz", fmt="text"), tokenizer_dir, str(tmp_path / "t2"))
    assert gz.report["bad_records"] == 0 and gz.report["documents_in"] == len(names)
    assert gz.report["tokens_in"] == plain.report["tokens_in"] > 0


def test_sources_are_mixed_by_weight_in_every_quarter_of_the_training_order(ray_cluster, tokenizer_dir, tmp_path):
    """Two one-file sources, weights 3:1: every quarter of the packed file, and of the order a worker trains
    on it (seeded permutation), carries each source close to its share (was: all of one source first)."""
    import random

    from raylong.data.tokenize import load_tokenizer
    from raylong.train.batches import SequenceLoader

    # "code": standard-library modules without digits, cut into 2 KB documents (a document much longer than a
    # quarter of the stage could not be mixed); "digits": documents of digit groups only
    modules = [re.sub(r"[0-9]", "", open(os.path.join(d, n)).read())
               for d in (f"{STDLIB}/email", f"{STDLIB}/logging") for n in sorted(os.listdir(d)) if n.endswith(".py")]
    code = [m[i : i + 2000] for m in modules for i in range(0, len(m), 2000) if m[i : i + 2000].strip()]
    rng = random.Random(0)
    digits = [" ".join(str(rng.randrange(10**6)) for _ in range(rng.randrange(20, 200))) for _ in range(600)]
    for name, docs in (("code", code), ("digits", digits)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stage = StageConfig.model_validate({
        "name": "mix", "kind": "pretrain", "seq_len": 128,
        "data": {"sources": [{"name": "code", "path": str(tmp_path / "code.jsonl"), "format": "jsonl", "weight": 3},
                             {"name": "digits", "path": str(tmp_path / "digits.jsonl"), "format": "jsonl",
                              "weight": 1}],
                 "token_budget": 60000, "heldout_fraction": 0.0, "seed": 3},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })
    data = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "out"))
    assert abs(data.report["per_source"]["code"]["share_achieved"] - 0.75) < 0.05, data.report["per_source"]

    tok = load_tokenizer(tokenizer_dir)
    has_digit = np.array([any(c.isdigit() for c in tok.decode([i])) for i in range(len(tok))])
    has_letter = np.array([any(c.isalpha() for c in tok.decode([i])) for i in range(len(tok))])

    def digit_share(rows) -> float:
        ids = np.concatenate([np.asarray(r) for r in rows])
        return has_digit[ids].sum() / max(1, (has_digit[ids] | has_letter[ids]).sum())

    file_order = pq.read_table(data.train_uri).column("input_ids").to_pylist()
    loader = SequenceLoader(data.train_uri, 0, 1, seed=stage.data.seed)
    train_order = [b["input_ids"][0].tolist() for b in loader]
    overall = digit_share(file_order)
    assert 0.05 < overall < 0.5, overall
    for order in (file_order, train_order):
        q = len(order) // 4
        shares = [digit_share(order[i * q : (i + 1) * q]) for i in range(4)]
        assert all(abs(s - overall) < 0.35 * overall for s in shares), (overall, shares)


def test_a_source_short_of_its_share_does_not_keep_the_others_reading(ray_cluster, tokenizer_dir, tmp_path):
    """Weights 1:1 and a budget the small source cannot fill: once the large source has its share and the
    small one is read to its end, the stream stops (it used to read the large source to its end, turning
    every further record away); the packed tokens are the same either way."""
    big = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) for i in range(3000)]
    small = [json.dumps({"text": f"class C{i}:\n    value = {i}\n"}) for i in range(20)]
    (tmp_path / "big.jsonl").write_text("\n".join(big) + "\n")
    (tmp_path / "small.jsonl").write_text("\n".join(small) + "\n")
    stage = StageConfig.model_validate({
        "name": "short", "kind": "pretrain", "seq_len": 128,
        "data": {"sources": [{"name": "big", "path": str(tmp_path / "big.jsonl"), "format": "jsonl"},
                             {"name": "small", "path": str(tmp_path / "small.jsonl"), "format": "jsonl"}],
                 "token_budget": 4000, "heldout_fraction": 0.0},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })
    report = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "out")).report
    per = report["per_source"]
    assert per["small"]["documents"] == 20 and per["small"]["documents_over_budget"] == 0  # all of it, short
    assert 2000 <= per["big"]["tokens_in"] < 2000 + 40  # its share, to within one document
    assert report["records"] < 600, report["records"]  # of 3020: reading stopped once nothing was left to gain
    assert report["tokens_in"] == report["tokens_packed"] + report["tokens_dropped"]


def test_documents_encoded_in_read_tasks_equal_the_tokenizer_actor_path(ray_cluster, tokenizer_dir, tmp_path):
    """Documents are read and encoded in the same task with the tokenizer's backend alone; a tokenizer without
    one goes through the actor pool and transformers. Both give the same rows, in the same order."""
    from raylong.data.pieces import plan_pieces
    from raylong.data.prepare import resolve_sources, tokenized_dataset
    from raylong.data.tokenize import DocumentEncoder, load_tokenizer

    stage = pretrain_stage(f"{STDLIB}/email/*.py", fmt="text")
    tok = load_tokenizer(tokenizer_dir)
    pieces = plan_pieces(stage.data.sources, resolve_sources(stage.data, {}), tok, sft=False)
    rows = {}
    for path, encoder in (("tasks", DocumentEncoder.of(tok)), ("actors", None)):
        ds = tokenized_dataset(pieces, stage.data, tokenizer_dir, False, encoder)
        rows[path] = [(r["origin"], r["piece"], r["tokens"]) for r in ds.take_all()]
    assert len(rows["tasks"]) == len(pieces) >= 20  # one document per file
    assert [(o, p, list(t)) for o, p, t in rows["tasks"]] == [(o, p, list(t)) for o, p, t in rows["actors"]]
    assert [p for _, p, _ in rows["tasks"]] == sorted(p for _, p, _ in rows["tasks"])  # the plan's order


def test_read_tasks_skip_the_pieces_of_a_source_whose_share_is_filled(ray_cluster, tokenizer_dir, tmp_path):
    """The driver closes a source on the SourceGate actor once its share is filled; a read task then skips that
    source's pieces (counted) and reads the others'. Which pieces get skipped depends on timing, the packed
    data does not: two runs of a budgeted two-source stage write the same sequences."""
    import ray

    from raylong.config import SourceConfig
    from raylong.data.pieces import cut_pieces, interleave
    from raylong.data.prepare import SourceGate, _read_pieces

    paths = {"a": str(tmp_path / "a.jsonl"), "b": str(tmp_path / "b.jsonl")}
    docs = {"a": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(1500)],
            "b": [f"class C{i}:\n    value = {i}\n" for i in range(1500)]}
    for n, p in paths.items():
        with open(p, "w") as f:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[n]))
    sources = {n: SourceConfig(name=n, path=p, format="jsonl") for n, p in paths.items()}
    pieces = interleave({n: cut_pieces(sources[n], [p], {p: os.path.getsize(p)}, 8192) for n, p in paths.items()},
                        {"a": 1.0, "b": 1.0})
    task = np.array([json.dumps([{"index": i, **p.as_row()} for i, p in enumerate(pieces)])])
    gate = ray.remote(num_cpus=0)(SourceGate).remote()
    ray.get(gate.close.remote("a"))
    rows = list(_read_pieces({"pieces": task}, sources, False, gate))
    assert {s for r in rows for s in r["source"]} == {"b"}
    assert [t for r in rows for t in r["text"]] == docs["b"]  # all of b, in order
    assert ray.get(gate.skipped_pieces.remote()) == {"a": sum(p.source == "a" for p in pieces)} and len(pieces) > 10

    stage = StageConfig.model_validate({
        "name": "gated", "kind": "pretrain", "seq_len": 128,
        "data": {"sources": [{"name": n, "path": p, "format": "jsonl"} for n, p in paths.items()],
                 "token_budget": 20000, "heldout_fraction": 0.0},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })
    runs = [prepare_stage_data(stage, tokenizer_dir, str(tmp_path / f"out{i}")) for i in range(2)]
    assert all(abs(r.report["per_source"]["a"]["share_achieved"] - 0.5) < 0.1 for r in runs), [r.report["per_source"] for r in runs]
    seqs = [pq.read_table(r.train_uri).column("input_ids").to_pylist() for r in runs]
    assert seqs[0] == seqs[1] and len(seqs[0]) > 100
    assert runs[0].report["records"] == runs[1].report["records"]  # records of a filled source are not counted
