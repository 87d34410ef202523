"""Training checkpoints that are either complete and intact, or never loaded.

A checkpoint is the directory `step_XXXXXXXX` Ray Train uploads from every rank's DeepSpeed shards.
Its MANIFEST.json is written by rank 0 only after every rank's upload returned and all ranks passed a
barrier, and it lists each file with its size and SHA-256 (hashed by the rank that wrote it, before
upload). On resume the newest checkpoint whose manifest exists, whose files have the listed sizes
(a metadata listing: cheap) and whose bytes hash to the listed digests is used; every checkpoint
passed over is named in a warning with the reason.

Resume takes the newest checkpoint in storage, not only the one Ray Train's controller registered:
a worker killed right after reporting can take the newest registration down with it.

The final optimizer state a later stage carries (`carry_optimizer_state`) is saved the same way: every
rank's shards first, then a manifest from rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from raylong.log import get_logger

log = get_logger(__name__)

MANIFEST = "MANIFEST.json"
CHECKPOINT_TAG = "state"
_CHUNK = 1 << 22


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(local_dir: str, rank: int) -> dict[str, dict]:
    """{relative path: {size, sha256, rank}} of every file under a local directory."""
    out = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            out[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full), "rank": rank}
    return out


def merge_file_lists(per_rank: list[dict[str, dict]]) -> dict[str, dict]:
    """One file list from every rank's (a file two ranks both wrote keeps the lower rank's entry)."""
    merged: dict[str, dict] = {}
    for files in per_rank:
        for rel, info in files.items():
            merged.setdefault(rel, info)
    return merged


def write_manifest(fs: pafs.FileSystem, path: str, step: int, world_size: int, files: dict[str, dict]) -> None:
    body = {"step": step, "tag": CHECKPOINT_TAG, "world_size": world_size, "files": files}
    with fs.open_output_stream(f"{path}/{MANIFEST}") as f:
        f.write(json.dumps(body, indent=1).encode())


def delete_manifest(fs: pafs.FileSystem, path: str) -> None:
    """Before a checkpoint directory is (re)written: it stops counting as complete until rewritten."""
    if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{MANIFEST}")


@dataclass
class Candidate:
    step: int
    path: str
    manifest: dict


@dataclass
class Scan:
    """Checkpoints in a run directory: usable ones newest first, and each rejected one with its reason."""

    usable: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def metadata_problem(fs: pafs.FileSystem, path: str) -> tuple[dict | None, str | None]:
    """(manifest, None) when the manifest reads and every listed file has its listed size; else a reason."""
    info = fs.get_file_info(f"{path}/{MANIFEST}")
    if info.type != pafs.FileType.File:
        return None, f"no {MANIFEST} (interrupted before every rank finished writing)"
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
        files, step = manifest["files"], int(manifest["step"])
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable {MANIFEST}: {exc}"
    if not files:
        return None, f"{MANIFEST} lists no files"
    listed = fs.get_file_info([f"{path}/{rel}" for rel in files])
    for (rel, want), got in zip(files.items(), listed):
        if got.type != pafs.FileType.File:
            return None, f"{rel} is missing"
        if got.size != want["size"]:
            return None, f"{rel} has {got.size} bytes, the manifest says {want['size']} (truncated or rewritten)"
    manifest["step"] = step
    return manifest, None


def scan_checkpoints(fs: pafs.FileSystem, root: str) -> Scan:
    """Every `step_*` directory under `root`, checked by manifest and file sizes."""
    scan = Scan()
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dirs = sorted((i.path for i in entries if i.type == pafs.FileType.Directory
                   and i.path.rsplit("/", 1)[-1].startswith("step_")), reverse=True)
    for path in dirs:
        manifest, problem = metadata_problem(fs, path)
        if problem:
            scan.rejected.append((path, problem))
        else:
            scan.usable.append(Candidate(manifest["step"], path, manifest))
    scan.usable.sort(key=lambda c: c.step, reverse=True)
    return scan


def content_problem(local_dir: str, manifest: dict, rank: int | None = None) -> str | None:
    """First file (of `rank`, or all) whose SHA-256 differs from the manifest's; None when all match."""
    for rel, want in manifest["files"].items():
        if rank is not None and want.get("rank", 0) != rank:
            continue
        path = os.path.join(local_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if sha256_file(path) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (corrupted)"
    return None


# ------------------------------------------------------------------------- inside Ray Train workers
def save_checkpoint(engine, step: int, metrics: dict, rank: int) -> None:
    """Every rank: DeepSpeed shards -> Ray Train storage; rank 0 then writes the manifest. Collective."""
    import ray.train

    from raylong.train import collectives

    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, storage.build_checkpoint_path_from_name(checkpoint_name(step))
    if rank == 0:
        delete_manifest(fs, path)  # a directory being rewritten (a redone step) is not complete meanwhile
    collectives.barrier()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state={"step": step})
        files = describe_files(d, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_name(step))
    gathered = collectives.all_gather_objects(files)  # also the barrier: every rank's shards are in storage
    if rank == 0:
        write_manifest(fs, path, step, collectives.world_size(), merge_file_lists(gathered))
    collectives.barrier()


def restore_checkpoint(engine, rank: int) -> tuple[int, list[str]]:
    """Load the newest intact checkpoint, if any. Returns (step to continue from, warnings about the
    checkpoints passed over). Collective: every rank agrees on the checkpoint it loads."""
    import ray.train

    from raylong.train import collectives

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    scan = scan_checkpoints(fs, storage.experiment_fs_path)
    skipped = [f"{path}: {why}" for path, why in scan.rejected]
    for cand in scan.usable:
        ckpt = ray.train.Checkpoint(path=cand.path, filesystem=fs)
        with ckpt.as_directory() as local:
            problem = content_problem(local, cand.manifest, rank)  # each rank hashes the files it wrote
            if collectives.reduce_number(1 if problem else 0, engine.device, op="max"):
                problems = collectives.all_gather_objects(problem)
                skipped.append(f"{cand.path}: " + "; ".join(p for p in problems if p))
                continue
            _, client_state = engine.load_checkpoint(local, tag=CHECKPOINT_TAG)
        if int(client_state["step"]) != cand.step:
            raise RuntimeError(f"checkpoint {cand.path}: manifest says step {cand.step}, "
                               f"DeepSpeed state says {client_state['step']}")
        _warn(skipped, rank)
        return cand.step, skipped
    _warn(skipped, rank)
    return 0, skipped


def _warn(skipped: list[str], rank: int) -> None:
    if rank == 0:
        for line in skipped:
            log.warning("WARNING: checkpoint not used: %s", line)


# ------------------------------------------------------------------------- optimizer state carry
OPTIMIZER_TAG = "final"


def save_optimizer_state(engine, uri: str, rank: int) -> None:
    """The final DeepSpeed state (optimizer included) for a later stage to carry; collective."""
    from raylong.train import collectives

    from raylong.storage import upload_dir, write_text

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=OPTIMIZER_TAG)
        upload_dir(d, uri)  # every rank adds its own shard files
    collectives.barrier()
    if rank == 0:
        write_text(f"{uri}/{MANIFEST}", json.dumps({"tag": OPTIMIZER_TAG, "world_size": collectives.world_size()}))
    collectives.barrier()


def load_optimizer_state(engine, uri: str) -> None:
    """Optimizer moments from the previous stage; a fresh LR schedule for this one."""
    from raylong.storage import download_dir, read_text

    if read_text(f"{uri}/{MANIFEST}") is None:
        raise RuntimeError(f"no complete optimizer state at {uri} to carry over")
    local = download_dir(uri, tempfile.mkdtemp(prefix="raylong-optim-"))
    engine.load_checkpoint(local, tag=OPTIMIZER_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
