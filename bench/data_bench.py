"""Tokenize-and-pack throughput: raylong's Ray Data stage vs a plain single-process loop doing the same
work (read, parse, tokenize, pack, write Parquet) on the same corpus and tokenizer, plus the pipeline's
peak memory (RSS of the driver and every Ray process it started) at 1x and 4x the corpus. The plain loop
and the 1x Ray run alternate `--repeats` times (medians; the machine's state moves both). Corpus: the
Python standard library's sources. Last line: one JSON object."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build_corpus(copies: int, root: str) -> tuple[str, int]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [f for f in glob.glob(f"{stdlib}/**/*.py", recursive=True) if "site-packages" not in f]
    out = os.path.join(root, f"corpus_x{copies}")
    size = 0
    for c in range(copies):
        d = os.path.join(out, f"copy{c}")
        os.makedirs(d, exist_ok=True)
        for i, f in enumerate(files):
            shutil.copyfile(f, os.path.join(d, f"{i:05d}.py"))
            size += os.path.getsize(f)
    return out, size


class PeakRSS:
    """Samples the RSS of this process and (`descendants`) all its children: Ray's GCS, raylet, workers."""

    def __init__(self, interval: float = 0.2, descendants: bool = True):
        self.interval, self.peak, self._stop, self.descendants = interval, 0, threading.Event(), descendants

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *(me.children(recursive=True) if self.descendants else ())]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = 0
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def stage(corpus: str, seq_len: int):
    from raylong.config import StageConfig

    return StageConfig.model_validate({
        "name": "bench", "kind": "pretrain", "seq_len": seq_len,
        "data": {"sources": [{"name": "stdlib", "path": f"{corpus}/**/*.py", "format": "text"}],
                 "heldout_fraction": 0.0, "error_budget": 0.05},
        "optim": {"steps": 1}, "parallel": {"num_workers": 2, "sp_size": 2},
    })


def plain_loop(corpus: str, tokenizer_dir: str, seq_len: int, out_dir: str) -> tuple[int, float, dict]:
    """The same work in one process: read + parse + tokenize (batched) + pack + write Parquet; also the
    seconds spent tokenizing and packing (packing + writing is what raylong's driver does alone)."""
    import pyarrow.fs as pafs

    from raylong.data.packing import DocumentPacker
    from raylong.data.prepare import _SequenceWriter
    from raylong.data.sources import parse_file, resolve_files
    from raylong.data.tokenize import encode_documents, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    src = stage(corpus, seq_len).data.sources[0]
    packer = DocumentPacker(seq_len, tok.pad_token_id)
    writer = _SequenceWriter(pafs.LocalFileSystem(), os.path.join(out_dir, "plain.parquet"), seq_len)
    files = resolve_files(src.path, src.format)
    spent = {"tokenize_s": 0.0, "pack_s": 0.0}
    for i in range(0, len(files), 64):
        texts = []
        for f in files[i : i + 64]:
            with open(f, "rb") as fh:
                texts += [r.text for r in parse_file(f, fh.read(), src, sft=False).records]
        t = time.perf_counter()
        encoded = encode_documents(tok, texts)
        spent["tokenize_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for ids in encoded:
            for seq in packer.add(ids):
                writer.write(seq)
        spent["pack_s"] += time.perf_counter() - t
    for seq in packer.finish():
        writer.write(seq)
    writer.close()
    return packer.stats.tokens_in, time.perf_counter() - t0, spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3, help="plain loop and 1x Ray run pairs (medians reported)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from raylong.data.tokenize import train_bpe_tokenizer

    root = tempfile.mkdtemp(prefix="raylong-databench-")
    corpus1, bytes1 = build_corpus(1, root)
    corpus4, bytes4 = build_corpus(4, root)
    tok_dir = train_bpe_tokenizer(f"{corpus1}/copy0/*.py", args.vocab, os.path.join(root, "tok"), max_files=300)
    print(f"corpus: {bytes1 / 1e6:.1f} MB (1x), {bytes4 / 1e6:.1f} MB (4x); BPE vocab {args.vocab}", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    plain, ray1 = [], []  # (tokens, seconds, peak MiB) per repeat, the two alternating so drift hits both
    for r in range(args.repeats):
        with PeakRSS(descendants=False) as mem:  # the driver alone: the idle Ray instance is not the loop's
            tokens, seconds, spent = plain_loop(corpus1, tok_dir, args.seq_len, root)
        plain.append((tokens, seconds, mem.peak / 2**20))
        print(f"plain loop {r}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:,.0f} tokens/s, "
              f"peak RSS {mem.peak / 2**20:.0f} MiB", flush=True)
        ray1.append(ray_run(f"1x_{r}", corpus1, tok_dir, args.seq_len, root))
    pack_rate, tokenize_rate = plain[0][0] / spent["pack_s"], plain[0][0] / spent["tokenize_s"]
    print(f"driver-side packing + writing: {pack_rate:,.0f} tokens/s; tokenizing in one process: "
          f"{tokenize_rate:,.0f} tokens/s ({os.cpu_count()} cores)", flush=True)
    ray4 = ray_run("4x", corpus4, tok_dir, args.seq_len, root)
    ray.shutdown()

    tokens = plain[0][0]
    assert all(p[0] == tokens for p in plain) and all(r[0] == tokens for r in ray1), (plain, ray1)
    ratios = [(tokens / r[1]) / (tokens / p[1]) for p, r in zip(plain, ray1)]
    ray_s, plain_s = statistics.median(r[1] for r in ray1), statistics.median(p[1] for p in plain)
    peak1 = max(r[2] for r in ray1)
    rate = (ray4[0] - tokens) / (ray4[1] - ray_s)  # steady rate and fixed cost: seconds = fixed + tokens / rate
    print(json.dumps({
        "corpus_mb": round(bytes1 / 1e6, 1), "tokens": tokens, "seq_len": args.seq_len, "repeats": args.repeats,
        "ray_tokens_per_s": round(tokens / ray_s), "plain_tokens_per_s": round(tokens / plain_s),
        "ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
        "ray_seconds": [round(r[1], 1) for r in ray1], "plain_seconds": [round(p[1], 1) for p in plain],
        "peak_rss_mib_plain": round(max(p[2] for p in plain)), "peak_rss_mib_1x": round(peak1),
        "peak_rss_mib_4x": round(ray4[2]), "peak_ratio_4x_1x": round(ray4[2] / peak1, 3),
        "ray_4x_tokens_per_s": round(ray4[0] / ray4[1]),
        "ray_seconds_to_first_batch": [r[3] for r in ray1], "ray_steady_tokens_per_s": round(rate),
        "ray_fixed_cost_s": round(ray_s - tokens / rate, 1), "steady_ratio": round(rate / (tokens / plain_s), 3),
        "pack_tokens_per_s": round(pack_rate), "tokenize_tokens_per_s": round(tokenize_rate),
        "pack_over_tokenize": round(pack_rate / tokenize_rate, 2),
    }))


def ray_run(name: str, corpus: str, tok_dir: str, seq_len: int, root: str) -> tuple[int, float, float, float]:
    """raylong's data stage on `corpus`, in a fresh output directory: (tokens, seconds, peak MiB, first batch s)."""
    from raylong.data.prepare import prepare_stage_data

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        data = prepare_stage_data(stage(corpus, seq_len), tok_dir, os.path.join(root, f"ray_{name}"))
        elapsed = time.perf_counter() - t0
    tokens, first = data.report["tokens_in"], data.report["seconds_to_first_batch"]
    print(f"ray data {name}: {tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:,.0f} tokens/s, first batch after "
          f"{first}s, peak RSS (driver + Ray) {mem.peak / 2**20:.0f} MiB", flush=True)
    return tokens, elapsed, mem.peak / 2**20, first


if __name__ == "__main__":
    main()
