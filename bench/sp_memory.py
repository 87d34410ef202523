"""Per-rank peak memory (RSS) against sequence length for SP=1 plain, SP=2 plain, and SP=2 with the ALST
switches (checkpointing + CPU offload of checkpoints + TiledMLP + tiled logits/loss); the slope of each
in MiB per 1K tokens, over `--repeats` runs of every point.

The ranks run with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor of
64 KiB or more is its own mapping, returned to the system when freed: peak RSS then follows the live tensors.
With glibc's default (a threshold that rises to 32 MiB after the first large free) freed tensors stay in
the heap and the peak depends on how they fragmented it (`--glibc-default` measures that way).

Last line: JSON with each slope and slope_ratio (sp2_alst / sp1; goal <= 0.35) as medians over the
repeats, their spread ((max - min) / median) and the per-point peaks."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _engine_runs import ALST, MMAP_EVERY_TENSOR, make_model_dir, run, slope  # noqa: E402


def spread(values: list[float]) -> float:
    return round((max(values) - min(values)) / statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's allocator tunables as they are")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    env = {} if args.glibc_default else MMAP_EVERY_TENSOR
    model = make_model_dir()
    configs = {"sp1": (1, {}), "sp2": (2, {}), "sp2_alst": (2, ALST)}
    peaks = {name: [[] for _ in lengths] for name in configs}  # [length][repeat]
    for rep in range(args.repeats):
        for name, (world, memory) in configs.items():
            for i, n in enumerate(lengths):
                r = run(model, world=world, seq_len=n, steps=1, memory=memory, env=env)
                peaks[name][i].append(r["peak_rss_mib"])
                print(f"run {rep + 1}/{args.repeats} {name:9s} {n:6d} tokens: peak RSS per rank "
                      f"{r['peak_rss_mib']:7.0f} MiB, {r['step_s']:.1f} s/step", flush=True)
    k = [n / 1024 for n in lengths]
    slopes = {name: [slope(k, [p[rep] for p in peaks[name]]) for rep in range(args.repeats)] for name in configs}
    ratios = [a / b for a, b in zip(slopes["sp2_alst"], slopes["sp1"])]
    print(json.dumps({
        **{f"slope_{name}": round(statistics.median(s), 2) for name, s in slopes.items()},
        "slope_ratio": round(statistics.median(ratios), 3), "slope_ratio_runs": [round(r, 3) for r in ratios],
        "slope_ratio_spread": spread(ratios), "slope_spread": {name: spread(s) for name, s in slopes.items()},
        "repeats": args.repeats, "allocator": "glibc default" if args.glibc_default else "mmap threshold 64 KiB",
        "lengths": lengths,
        "peak_rss_mib_median": {name: [round(statistics.median(p)) for p in ps] for name, ps in peaks.items()},
        "peak_rss_point_spread_max": {name: max(spread(p) for p in ps) for name, ps in peaks.items()},
    }))


if __name__ == "__main__":
    main()
