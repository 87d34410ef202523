"""The data stage through real Ray Data: SFT label masks from a real chat template, bad input reported
with file and line, the error budget, the cache and its commit marker."""

from __future__ import annotations

import json
import os

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
    assert per["pq"]["documents_over_budget"] > 0 and per["js"]["documents_over_budget"] > 0
    train = {tuple(r["input_ids"]) for r in pq.read_table(data.train_uri).to_pylist()}
    held = {tuple(r["input_ids"]) for r in pq.read_table(data.heldout_uri).to_pylist()}
    assert held and train and not (train & held)  # evaluation never sees a training sequence
    assert len(train) + len(held) == data.report["sequences_train"] + data.report["sequences_heldout"]
