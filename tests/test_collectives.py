"""Every collective goes through raylong/train/collectives.py, which makes its tensors on the engine's
device (NCCL reduces nothing else: a CPU tensor passes every gloo test and fails on the GPU cluster)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_exit, gloo_init

PACKAGE = Path(__file__).resolve().parent.parent / "raylong"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "gather", "scatter", "send", "recv"}


def direct_collectives(package: Path) -> list[str]:
    """`<torch.distributed alias>.<collective>(...)` calls outside collectives.py."""
    found = []
    for path in package.rglob("*.py"):
        if path.name == "collectives.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name == "torch.distributed"}
        names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 and n.module == "torch.distributed" for a in n.names if a.name in COLLECTIVES}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and isinstance(f.value, ast.Name)
                    and f.value.id in aliases) or (isinstance(f, ast.Name) and f.id in names):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


def test_no_collective_outside_the_helper_module(tmp_path):
    assert not direct_collectives(PACKAGE), direct_collectives(PACKAGE)
    # the check sees both spellings
    bad = tmp_path / "raylong"
    bad.mkdir()
    (bad / "a.py").write_text("import torch.distributed as dist\ndef f(t):\n    dist.all_reduce(t)\n")
    (bad / "b.py").write_text("from torch.distributed import barrier\ndef g():\n    barrier()\n")
    assert sorted(direct_collectives(bad)) == ["raylong/a.py:3", "raylong/b.py:3"]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    gloo_init(rank, world, port)
    from raylong.train import collectives

    cpu = torch.device("cpu")
    results = {
        "sum": collectives.reduce_number(rank + 1.5, cpu),
        "max": collectives.reduce_number(float(rank * 10), cpu, op="max"),
        "gathered": collectives.all_gather_cat(torch.full((2,), rank)).tolist(),
        "objects": collectives.all_gather_objects({"rank": rank}),
        "world": collectives.world_size(),
    }
    collectives.barrier()
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    gloo_exit()


def test_the_helpers_reduce_gather_and_stand_alone(tmp_path):
    from raylong.train import collectives

    mp.start_processes(_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True, start_method="spawn")
    for rank in range(3):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["sum"] == 1.5 + 2.5 + 3.5 and got["max"] == 20.0 and got["world"] == 3
        assert got["gathered"] == [0, 0, 1, 1, 2, 2]
        assert got["objects"] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    # one process, no process group: the identity
    assert collectives.reduce_number(4.0, torch.device("cpu")) == 4.0 and collectives.world_size() == 1
    assert collectives.all_gather_objects("x") == ["x"]
