"""Checkpoint integrity without a cluster: a checkpoint cut short, one without its manifest and one whose
bytes were changed are each detected, named with the reason, and passed over for an older intact one."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from raylong.train.checkpoints import (
    content_problem, describe_files, merge_file_lists, scan_checkpoints, write_manifest,
)


def make_checkpoint(root, step: int, manifest: bool = True) -> str:
    path = os.path.join(root, f"step_{step:08d}")
    for rank in (0, 1):
        os.makedirs(os.path.join(path, "state"), exist_ok=True)
        with open(os.path.join(path, "state", f"rank{rank}_states.pt"), "wb") as f:
            f.write(os.urandom(4096 + rank))
    if manifest:
        described = describe_files(path, 0)
        per_rank = [{k: v for k, v in described.items() if "rank0" in k},
                    {k: {**v, "rank": 1} for k, v in described.items() if "rank1" in k}]
        write_manifest(pafs.LocalFileSystem(), path, step, 2, merge_file_lists(per_rank))
    return path


def test_truncated_missing_manifest_and_corrupted_checkpoints_are_passed_over(tmp_path):
    root = str(tmp_path)
    make_checkpoint(root, 2)
    truncated = make_checkpoint(root, 4)
    with open(os.path.join(truncated, "state", "rank1_states.pt"), "r+b") as f:
        f.truncate(100)
    make_checkpoint(root, 6, manifest=False)
    corrupted = make_checkpoint(root, 8)
    with open(os.path.join(corrupted, "state", "rank0_states.pt"), "r+b") as f:
        f.seek(10)
        f.write(b"\x00\xff\x00\xff")  # same size, other bytes

    scan = scan_checkpoints(pafs.LocalFileSystem(), root)
    rejected = dict(scan.rejected)
    assert set(rejected) == {truncated, os.path.join(root, "step_00000006")}
    assert "state/rank1_states.pt has 100 bytes, the manifest says 4097" in rejected[truncated]
    assert "no MANIFEST.json" in rejected[os.path.join(root, "step_00000006")]
    assert [c.step for c in scan.usable] == [8, 2]  # sizes of 8 are right: only the hashes can tell
    newest, older = scan.usable
    assert "state/rank0_states.pt does not match its SHA-256" in content_problem(newest.path, newest.manifest)
    assert "rank0_states.pt" in content_problem(newest.path, newest.manifest, rank=0)
    assert content_problem(newest.path, newest.manifest, rank=1) is None  # a rank hashes the files it wrote
    assert content_problem(older.path, older.manifest) is None


def test_unreadable_manifest_is_named(tmp_path):
    path = make_checkpoint(str(tmp_path), 3)
    with open(os.path.join(path, "MANIFEST.json"), "w") as f:
        f.write('{"step": 3, "files": ')  # cut short
    scan = scan_checkpoints(pafs.LocalFileSystem(), str(tmp_path))
    assert scan.usable == [] and "unreadable MANIFEST.json" in scan.rejected[0][1]
