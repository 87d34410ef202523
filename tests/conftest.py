"""Shared fixtures: a tokenizer trained here, a tiny random Llama, a local Ray cluster on loopback."""

from __future__ import annotations

import os
import socket
import sysconfig

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process binds 127.0.0.1
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/raylong/torch_extensions"))

STDLIB = sysconfig.get_paths()["stdlib"]
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from raylong.data.tokenize import train_bpe_tokenizer

    out = str(tmp_path_factory.mktemp("tokenizer"))
    return train_bpe_tokenizer(f"{STDLIB}/*.py", 1024, out, max_files=40)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    from raylong.config import ModelConfig
    from raylong.train.model import init_random_model

    out = str(tmp_path_factory.mktemp("tiny_model"))
    return init_random_model(ModelConfig(init=TINY_LLAMA, seed=0), tokenizer_dir, out)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the session (2 CPUs, loopback), shut down at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), log_to_driver=True)  # dashboard: State API for Ray Train's PG cleaner
    yield ray
    ray.shutdown()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def gloo_init(rank: int, world: int, port: int) -> None:
    """In a spawned test process: join a `world`-process gloo group on loopback, one thread per process."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def gloo_exit() -> None:
    """Leave the group and end the process once results are written, skipping interpreter teardown, where a
    library's C++ thread left running has aborted the process ("terminate called without an active
    exception") after all the work was done."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
