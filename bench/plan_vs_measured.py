"""The planner's per-token memory against what the tiny Llama measures, per switch set.

For each memory switch set, per-rank peak RSS of one ZeRO-3 fp32 training step at several lengths (SP=2
unless the set says SP=1), glibc's mmap threshold fixed at 64 KiB so RSS follows the live tensors (see
bench/sp_memory.py); the measured slope (MiB per 1K tokens of the sequence) against the planner's
bytes_per_local_token for the same model shape in fp32 (raylong/plan.py), as measured / planned; and the
evaluation's forward (tiled scores from the final hidden state) with one set, against that set's training step.
The fixed parts (weights, runtime) are not compared: on CPU they are the Python process, not a GPU's.

Last line: JSON with, per switch set, the measured and planned slopes and their ratio."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _engine_runs import ALST, MMAP_EVERY_TENSOR, MODEL, make_model_dir, run, slope  # noqa: E402

SWITCH_SETS = {  # name: (sp, memory switches)
    "plain_sp1": (1, {}),
    "plain": (2, {}),
    "tiled_loss": (2, {"tiled_loss": True, "loss_tile_tokens": 512}),
    "checkpointing": (2, {"activation_checkpointing": True}),
    "checkpointing_tiled_mlp": (2, {"activation_checkpointing": True, "tiled_mlp": True}),
    "alst": (2, ALST),
}


def planned_mib_per_1k(sp: int, memory: dict) -> float:
    """The planner's per-local-token bytes for this model in fp32, as MiB per 1K tokens of the sequence."""
    from transformers import LlamaConfig

    from raylong.config import MemoryConfig
    from raylong.plan import ModelShape, bytes_per_local_token

    shape = ModelShape.from_hf_config(LlamaConfig(**MODEL))
    per_token = sum(bytes_per_local_token(shape, sp, MemoryConfig(**memory), dtype_bytes=4).values())
    return per_token * 1024 / sp / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--sets", default=",".join(SWITCH_SETS))
    ap.add_argument("--eval-set", default="alst", help="also measure the evaluation's forward with this set ('' : no)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    model = make_model_dir()
    out = {}
    for name in args.sets.split(","):
        sp, memory = SWITCH_SETS[name]
        peaks = []
        for n in lengths:
            peaks.append(run(model, world=sp, seq_len=n, steps=1, memory=memory, env=MMAP_EVERY_TENSOR)["peak_rss_mib"])
            print(f"{name:24s} SP {sp} {n:6d} tokens: peak RSS per rank {peaks[-1]:7.0f} MiB", flush=True)
        measured = slope([n / 1024 for n in lengths], peaks)
        planned = planned_mib_per_1k(sp, memory)
        out[name] = {"sp": sp, "measured_mib_per_1k": round(measured, 2), "planned_mib_per_1k": round(planned, 2),
                     "measured_over_planned": round(measured / planned, 2), "peak_rss_mib": [round(p) for p in peaks]}
        print(f"{name:24s} measured {measured:.1f} MiB per 1K tokens, planned {planned:.1f} "
              f"({measured / planned:.2f}x)", flush=True)
    if args.eval_set:  # evaluation is not planned apart: its peak must stay under training's
        sp, memory = SWITCH_SETS[args.eval_set]
        peaks = [run(model, world=sp, seq_len=n, steps=1, memory=memory, env=MMAP_EVERY_TENSOR,
                     evaluate=True)["peak_rss_mib"] for n in lengths]
        train = out.get(args.eval_set, {}).get("peak_rss_mib")
        print(f"evaluation with {args.eval_set}: peak RSS per rank {[round(p) for p in peaks]} MiB "
              f"(training {train})", flush=True)
        out[f"{args.eval_set}_evaluation"] = {
            "sp": sp, "measured_mib_per_1k": round(slope([n / 1024 for n in lengths], peaks), 2),
            "peak_rss_mib": [round(p) for p in peaks],
            "eval_over_train_at_longest": round(peaks[-1] / train[-1], 3) if train else None}
    print(json.dumps({"lengths": lengths, "dtype": "fp32", "allocator": "mmap threshold 64 KiB", "sets": out}))


if __name__ == "__main__":
    main()
