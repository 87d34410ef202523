"""Step time of one 64K-token sequence, tiny Llama, ZeRO-3, fp32 on CPU: SP=1 vs Ulysses SP=2.

Each rank stands for one accelerator and gets one CPU core, so SP=2 spreads the sequence over twice the
devices ("speedup", goal >= 1.7). For the record, SP=1 is also run on both cores in one process
("speedup_equal_cores"): with the same two cores, SP cannot be faster, only lighter per rank."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _engine_runs import make_model_dir, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    model = make_model_dir()
    sp1 = run(model, world=1, seq_len=args.seq_len, steps=args.steps, cores=1)
    print(f"SP=1, 1 core: {sp1['step_s']:.1f} s/step, peak RSS {sp1['peak_rss_mib']:.0f} MiB", flush=True)
    sp2 = run(model, world=2, seq_len=args.seq_len, steps=args.steps, cores=2)
    print(f"SP=2, 1 core per rank: {sp2['step_s']:.1f} s/step, peak RSS per rank {sp2['peak_rss_mib']:.0f} MiB", flush=True)
    sp1b = run(model, world=1, seq_len=args.seq_len, steps=args.steps, cores=2)
    print(f"SP=1, 2 cores: {sp1b['step_s']:.1f} s/step", flush=True)
    print(json.dumps({"seq_len": args.seq_len, "sp1_step_s": round(sp1["step_s"], 2), "sp2_step_s": round(sp2["step_s"], 2),
                      "speedup": round(sp1["step_s"] / sp2["step_s"], 3),
                      "sp1_2cores_step_s": round(sp1b["step_s"], 2),
                      "speedup_equal_cores": round(sp1b["step_s"] / sp2["step_s"], 3),
                      "sp1_peak_rss_mib": round(sp1["peak_rss_mib"]), "sp2_peak_rss_mib": round(sp2["peak_rss_mib"])}))


if __name__ == "__main__":
    main()
