"""Step time of one 64K-token sequence: SP=1 (one process, both cores) vs Ulysses SP=2 (two processes,
one core each), tiny Llama, ZeRO-3, fp32 on CPU. Last line: JSON with "speedup" (goal >= 1.7)."""

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
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    model = make_model_dir()
    sp1 = run(model, world=1, seq_len=args.seq_len, steps=args.steps)
    print(f"SP=1: {sp1['step_s']:.1f} s/step, peak RSS {sp1['peak_rss_mib']:.0f} MiB", flush=True)
    sp2 = run(model, world=2, seq_len=args.seq_len, steps=args.steps)
    print(f"SP=2: {sp2['step_s']:.1f} s/step, peak RSS per rank {sp2['peak_rss_mib']:.0f} MiB", flush=True)
    print(json.dumps({"seq_len": args.seq_len, "sp1_step_s": round(sp1["step_s"], 2), "sp2_step_s": round(sp2["step_s"], 2),
                      "speedup": round(sp1["step_s"] / sp2["step_s"], 3), "sp1_peak_rss_mib": round(sp1["peak_rss_mib"]),
                      "sp2_peak_rss_mib": round(sp2["peak_rss_mib"])}))


if __name__ == "__main__":
    main()
