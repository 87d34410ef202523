"""Per-rank peak memory (RSS) against sequence length for SP=1 plain, SP=2 plain, and SP=2 with the ALST
switches (checkpointing + CPU offload of checkpoints + TiledMLP + tiled logits/loss); the slope of each
in MiB per 1K tokens. Last line: JSON with slope_sp1, slope_sp2, slope_sp2_alst, slope_ratio (goal <= 0.35)."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _engine_runs import ALST, make_model_dir, run, slope  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    model = make_model_dir()
    configs = {"sp1": (1, {}), "sp2": (2, {}), "sp2_alst": (2, ALST)}
    peaks: dict[str, list[float]] = {}
    for name, (world, memory) in configs.items():
        peaks[name] = []
        for n in lengths:
            r = run(model, world=world, seq_len=n, steps=1, memory=memory)
            peaks[name].append(r["peak_rss_mib"])
            print(f"{name:9s} {n:6d} tokens: peak RSS per rank {r['peak_rss_mib']:7.0f} MiB, {r['step_s']:.1f} s/step",
                  flush=True)
    k = [n / 1024 for n in lengths]
    slopes = {f"slope_{name}": round(slope(k, p), 2) for name, p in peaks.items()}
    print(json.dumps({**slopes, "slope_ratio": round(slopes["slope_sp2_alst"] / slopes["slope_sp1"], 3),
                      "lengths": lengths, "peak_rss_mib": {k_: [round(v) for v in p] for k_, p in peaks.items()}}))


if __name__ == "__main__":
    main()
