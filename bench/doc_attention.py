"""Per-document attention's backward: documents cut from q/k/v by one split per tensor (raylong's
doc_causal_attention) against one slice per document (the earlier code, kept here as the baseline).
A slice's backward fills a sequence-long zero tensor per document; a split's backward concatenates once.
Forward + backward time and peak RSS growth at one length and several document counts.
Last line: JSON with the figures."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from raylong.train.attention import doc_causal_attention


def sliced(q, k, v, sizes):
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
                      for s, e in bounds], dim=2).transpose(1, 2)


def split(q, k, v, sizes):
    pos = torch.cat([torch.arange(n) for n in sizes])[None]
    return doc_causal_attention(None, q, k, v, None, position_ids=pos)[0]


def timed(fn, q, k, v, sizes, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        t0 = time.perf_counter()
        fn(*leaves, sizes).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--docs", default="1,16,128,1024")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, 64, generator=g) for _ in range(3))
    rows = []
    for n_docs in map(int, args.docs.split(",")):
        sizes = [args.seq_len // n_docs] * n_docs
        sizes[-1] += args.seq_len - sum(sizes)
        row = {"documents": n_docs}
        for name, fn in (("slice", sliced), ("split", split)):
            row[f"{name}_s"] = round(timed(fn, q, k, v, sizes, args.repeats), 3)
        row["speedup"] = round(row["slice_s"] / row["split_s"], 2)
        print(f"{n_docs:5d} documents of {args.seq_len}: slice {row['slice_s']:.3f} s, split {row['split_s']:.3f} s "
              f"(x{row['speedup']})", flush=True)
        rows.append(row)
    print(json.dumps({"seq_len": args.seq_len, "heads": args.heads, "head_dim": 64, "threads": torch.get_num_threads(),
                      "rows": rows, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
