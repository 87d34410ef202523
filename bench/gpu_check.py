"""One-GPU check (H200): a Llama-3.1-8B-shaped model (random bf16 weights, --layers of its 32) trained
through raylong's own engine (ZeRO-3, ALST switches on) at doubling lengths until memory or the time
budget runs out. Prints per length tokens/s and peak memory; last line JSON with the max length reached."""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import tempfile
import time

import torch


def cpu_adam_available() -> bool:
    """Build (or load) DeepSpeed's cpu_adam op, which the offloaded optimizer uses on GPU stages; without a
    compiler on the machine, fall back to torch AdamW and say so in the figures rather than fail."""
    t0 = time.time()
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 - any build failure means: measure without it
        print(f"cpu_adam unavailable ({type(exc).__name__}: {exc}); torch AdamW steps the optimizer", flush=True)
        return False
    print(f"cpu_adam ready in {time.time() - t0:.0f} s", flush=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--start", type=int, default=65536)
    ap.add_argument("--max-len", type=int, default=4 * 1048576)
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    t_start = time.time()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylong.config import StageConfig
    from raylong.train.step import build_stage_engine, micro_step

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model_dir = tempfile.mkdtemp(prefix="gpu-check-")
    with torch.device("cuda"):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    torch.cuda.empty_cache()
    cpu_adam = cpu_adam_available()
    results, n, reached = [], args.start, 0

    def report() -> None:  # after every length, so a run cut short by its timeout still ends with a figure
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), "layers": args.layers, "cpu_adam": cpu_adam,
                          "max_len_reached": reached,
                          "runs": results, "seconds": round(time.time() - t_start)}), flush=True)

    last_cost = 0.0  # seconds the previous length took, engine build included
    while n <= args.max_len and time.time() - t_start + 2.5 * last_cost < args.budget_s:  # 2n costs >= 2x
        stage = StageConfig.model_validate({
            "name": "gpu", "kind": "pretrain", "seq_len": n,
            "data": {"sources": [{"name": "x", "path": "/dev/null", "format": "text"}]},
            "optim": {"steps": 2, "lr": 1e-5}, "parallel": {"num_workers": 1, "sp_size": 1, "zero_stage": 3, "use_gpu": True},
            "memory": {"activation_checkpointing": True, "offload_checkpoints": True, "tiled_mlp": True,
                       "tiled_loss": True, "offload_optimizer": True, "cpu_adam": cpu_adam},
        })
        t_len, se = time.time(), None
        try:
            torch.cuda.reset_peak_memory_stats()
            se = build_stage_engine(stage, model_dir)
            ids = torch.randint(3, 128256, (1, n))
            batch = {"input_ids": ids, "position_ids": torch.arange(n)[None], "labels": ids.clone()}
            micro_step(se, batch)  # warm-up
            torch.cuda.synchronize()
            t0 = time.time()
            micro_step(se, batch)
            torch.cuda.synchronize()
            dt = time.time() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30
            results.append({"seq_len": n, "step_s": round(dt, 2), "tokens_per_s": round(n / dt), "peak_gib": round(peak, 1)})
            print(f"{n:>8} tokens: {dt:6.1f} s/step, {n / dt:10,.0f} tokens/s, peak {peak:6.1f} GiB", flush=True)
            reached = n
            report()
        except torch.OutOfMemoryError:
            print(f"{n:>8} tokens: out of memory", flush=True)
            break
        finally:  # free this length's engine (ZeRO-3 hooks, partitions, offload buffers) before the next
            if se is not None:
                se.engine.destroy()
            del se
            gc.collect()
            torch.cuda.empty_cache()
        last_cost = time.time() - t_len
        n *= 2
    report()


if __name__ == "__main__":
    main()
