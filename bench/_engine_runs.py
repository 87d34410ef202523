"""Shared by the SP benchmarks: run a few training steps of a synthetic tiny Llama through raylong's own
engine code (build_stage_engine + micro_step) in `world` gloo processes; report step times and the
peak RSS of every rank. One fresh process group per measurement, so ru_maxrss is that run's peak."""

from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

MODEL = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 1024, "tie_word_embeddings": False}
# Loss tiles of 512 tokens: what the default tile (256 MiB of fp32 logits) gives for Llama-3.1's 128K
# vocabulary; with this model's 4K vocabulary the default tile would span the whole sequence.
ALST = {"activation_checkpointing": True, "offload_checkpoints": True, "tiled_mlp": True, "tiled_loss": True,
        "loss_tile_tokens": 512}
# glibc's mmap threshold fixed at 64 KiB in the ranks: every tensor of 64 KiB or more is its own mapping, returned
# when freed, so peak RSS follows the live tensors instead of the heap glibc keeps (bench/sp_memory.py)
MMAP_EVERY_TENSOR = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def make_model_dir() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tempfile.mkdtemp(prefix="raylong-bench-model-")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, threads, model_dir, seq_len, steps, memory, out, evaluate=False):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raylong.config import StageConfig
    from raylong.train.step import build_stage_engine, micro_step

    stage = StageConfig.model_validate({
        "name": "bench", "kind": "pretrain", "seq_len": seq_len,
        "data": {"sources": [{"name": "x", "path": "/dev/null", "format": "text"}]},
        "optim": {"steps": steps, "lr": 1e-4}, "parallel": {"num_workers": world, "sp_size": world, "zero_stage": 3},
        "memory": memory,
    })
    se = build_stage_engine(stage, model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MODEL["vocab_size"], (1, seq_len), generator=g)
    batch = {"input_ids": ids, "position_ids": torch.arange(seq_len)[None], "labels": ids.clone()}
    if evaluate:  # the evaluation's forward (raylong/eval/run.py) over the same sequence instead of a step
        from raylong.eval.run import sharded_forward

        se.engine.eval()
        forward = sharded_forward(se)
        arrays = [t[0].numpy() for t in (batch["input_ids"], batch["position_ids"], batch["labels"])]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        shard = None if evaluate else next(iter(se.shard([dict(batch)])))
        dist.barrier()
        t0 = time.perf_counter()
        forward(*arrays) if evaluate else micro_step(se, shard)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"step_times": times[1:], "peak_rss_mib": peak}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(model_dir: str, world: int, seq_len: int, steps: int = 1, memory: dict | None = None, cores: int = 2,
        env: dict[str, str] | None = None, evaluate: bool = False) -> dict:
    """Mean step time and per-rank peak RSS. `cores` threads are split evenly over the ranks; `env` is set
    for the rank processes only (read when they start: e.g. glibc's MALLOC_* tunables); `evaluate`: the
    evaluation's forward instead of a training step."""
    out = tempfile.mkdtemp(prefix="raylong-bench-")
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        mp.start_processes(_rank, args=(world, _free_port(), max(1, cores // world), model_dir, seq_len, steps,
                                        memory or {}, out, evaluate), nprocs=world, join=True, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    times = ranks[0]["step_times"]
    return {"step_s": sum(times) / len(times), "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks)}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
