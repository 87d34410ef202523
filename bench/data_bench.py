"""Tokenize-and-pack throughput: raylong's Ray Data stage vs a plain single-process loop doing the same
work (read, parse, tokenize, pack, write Parquet) on the same corpus and tokenizer, plus the pipeline's
peak memory (RSS of the driver and every Ray process it started) at 1x and 4x the corpus.
Corpus: the Python standard library's sources. Last line: one JSON object."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
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
    """Samples the RSS of this process and all its descendants (Ray's GCS, raylet, workers)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
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
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from raylong.data.prepare import prepare_stage_data
    from raylong.data.tokenize import train_bpe_tokenizer

    root = tempfile.mkdtemp(prefix="raylong-databench-")
    corpus1, bytes1 = build_corpus(1, root)
    corpus4, bytes4 = build_corpus(4, root)
    tok_dir = train_bpe_tokenizer(f"{corpus1}/copy0/*.py", args.vocab, os.path.join(root, "tok"), max_files=300)
    print(f"corpus: {bytes1 / 1e6:.1f} MB (1x), {bytes4 / 1e6:.1f} MB (4x); BPE vocab {args.vocab}", flush=True)

    with PeakRSS() as plain_mem:
        plain_tokens, plain_s, spent = plain_loop(corpus1, tok_dir, args.seq_len, root)
    pack_rate, tokenize_rate = plain_tokens / spent["pack_s"], plain_tokens / spent["tokenize_s"]
    print(f"driver-side packing + writing: {pack_rate:,.0f} tokens/s; tokenizing in one process: "
          f"{tokenize_rate:,.0f} tokens/s ({os.cpu_count()} cores)", flush=True)
    print(f"plain loop: {plain_tokens} tokens in {plain_s:.1f}s = {plain_tokens / plain_s:,.0f} tokens/s, "
          f"peak RSS {plain_mem.peak / 2**20:.0f} MiB", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    for name, corpus in (("1x", corpus1), ("4x", corpus4)):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            data = prepare_stage_data(stage(corpus, args.seq_len), tok_dir, os.path.join(root, f"ray_{name}"))
            elapsed = time.perf_counter() - t0
        results[name] = (data.report["tokens_in"], elapsed, mem.peak / 2**20, data.report["seconds_to_first_batch"])
        print(f"ray data {name}: {data.report['tokens_in']} tokens in {elapsed:.1f}s = "
              f"{data.report['tokens_in'] / elapsed:,.0f} tokens/s, first batch after {data.report['seconds_to_first_batch']}s, "
              f"peak RSS (driver + Ray) {mem.peak / 2**20:.0f} MiB",
              flush=True)
    ray.shutdown()
    ray_tokens, ray_s, peak1, first1 = results["1x"]
    # steady rate and fixed cost from the two corpus sizes: seconds = fixed + tokens / rate
    (t1, s1), (t4, s4) = results["1x"][:2], results["4x"][:2]
    rate = (t4 - t1) / (s4 - s1)
    assert ray_tokens == plain_tokens, (ray_tokens, plain_tokens)
    print(json.dumps({
        "corpus_mb": round(bytes1 / 1e6, 1), "tokens": plain_tokens, "seq_len": args.seq_len,
        "ray_tokens_per_s": round(ray_tokens / ray_s), "plain_tokens_per_s": round(plain_tokens / plain_s),
        "ratio": round((ray_tokens / ray_s) / (plain_tokens / plain_s), 3),
        "peak_rss_mib_plain": round(plain_mem.peak / 2**20), "peak_rss_mib_1x": round(peak1),
        "peak_rss_mib_4x": round(results["4x"][2]), "peak_ratio_4x_1x": round(results["4x"][2] / peak1, 3),
        "ray_4x_tokens_per_s": round(results["4x"][0] / results["4x"][1]),
        "ray_seconds_to_first_batch": first1, "ray_steady_tokens_per_s": round(rate),
        "ray_fixed_cost_s": round(s1 - t1 / rate, 1), "steady_ratio": round(rate / (plain_tokens / plain_s), 3),
        "pack_tokens_per_s": round(pack_rate), "tokenize_tokens_per_s": round(tokenize_rate),
        "pack_over_tokenize": round(pack_rate / tokenize_rate, 2),
    }))


if __name__ == "__main__":
    main()
