"""Train a candidate for the tiny recipe's pretrained base: a small Llama that should read 1K tokens and
retrieve a passkey there, playing Llama-3.1-8B's role (a short native context that already does retrieval)
so the chain can show an 8x extension (#16).

One process, plain PyTorch, on the Python standard library's sources (real local text) with passkey documents
mixed in, as pretraining corpora mix in synthetic retrieval data; sequence lengths grow along a curriculum.
Logs the passkey exact match at 256, 1x and 2x the native length every --eval-every steps and writes the
model, its tokenizer and TRAINING.json (arguments, curve, final accuracies at 256..8x).

Status (2026-11-29): the best run so far (docs/tiny_base.md, run g) retrieves 1 key in 3 at 256 tokens and
1 in 4 at 1K, far from reliable:

    python scripts/train_base.py --out /tmp/tiny_base --steps 3000 --hidden 128 --passkey-share 0.7 \
        --answer-only-loss --curriculum 128,256,512,1024 --tokens-per-step 4096 --lr 1e-3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sysconfig
import time

import numpy as np
import torch

from raylong.data.synth import Haystack, passkey_prompt
from raylong.data.tokenize import load_tokenizer, train_bpe_tokenizer
from raylong.eval.run import model_forward
from raylong.eval.suite import build_passkey_items, passkey_hit

log = logging.getLogger("raylong.base")
STDLIB = sysconfig.get_paths()["stdlib"]


def documents(tok, hay: Haystack, rng: random.Random, seq_len: int, passkey_share: float,
              answer_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One training sequence of seq_len+1 tokens and its labels: stdlib text, or a passkey prompt and its
    answer, tokenized as the evaluation does (prompt and lead, then " KEY"). `answer_only`: a passkey
    document's loss is on its answer alone (the whole signal goes to retrieval)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < seq_len + 1:
        room = seq_len + 1 - len(ids)
        if rng.random() < passkey_share and room > 96:
            key = str(rng.randrange(10_000, 100_000))
            filler = hay.slice(rng, rng.randrange(16, room - 64))
            prompt = [bos] + tok(passkey_prompt(filler, key, rng.random()) + "\nThe pass key is",
                                 add_special_tokens=False)["input_ids"]
            answer = tok(f" {key}", add_special_tokens=False)["input_ids"] + [eos]
            ids += prompt + answer
            labels += ([-100] * len(prompt) if answer_only else prompt) + answer
        else:
            doc = [bos] + tok(hay.slice(rng, room), add_special_tokens=False)["input_ids"] + [eos]
            ids += doc
            labels += doc
    return np.asarray(ids[: seq_len + 1], dtype=np.int64), np.asarray(labels[: seq_len + 1], dtype=np.int64)


def copy_sequence(alphabet: list[int], rng: random.Random, seq_len: int) -> np.ndarray:
    """Random segments over a small alphabet (the digits and a few words), each written twice: only a copy
    (induction) head predicts the second copy. A warm-up on these seeds the head that passkey retrieval
    needs before the corpus takes over."""
    out: list[int] = []
    while len(out) < seq_len + 1:
        seg = [rng.choice(alphabet) for _ in range(rng.randrange(8, 48))]
        out += seg + seg
    seq = np.asarray(out[: seq_len + 1], dtype=np.int64)
    return seq, seq


def passkey_accuracy(model, items) -> float:
    forward = model_forward(model)
    model.eval()
    hits = []
    for item in items:
        ids = np.asarray(item.input_ids)
        _, argmax = forward(ids, np.arange(len(ids)), np.full(len(ids), -100))
        hits.append(passkey_hit(argmax, item))
    model.train()
    return float(np.mean(hits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--curriculum", default="256,512,1024",
                    help="sequence lengths, each for an equal share of the steps (retrieval is learned short first)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--passkey-share", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--copy-warmup", type=int, default=0,
                    help="first steps on repeated random segments (256 tokens), to seed a copy head")
    ap.add_argument("--answer-only-loss", action="store_true",
                    help="a passkey document's loss on its answer only (the corpus documents keep theirs)")
    ap.add_argument("--init", default=None, help="continue from this model (an earlier run's --out)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = os.path.join(args.out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        train_bpe_tokenizer(f"{STDLIB}/*.py", 4096, tok_dir, max_files=200)
    tok = load_tokenizer(tok_dir)
    hay = Haystack.from_glob(f"{STDLIB}/*.py", tok, seed=args.seed)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM.from_pretrained(args.init) if args.init else LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = random.Random(args.seed)
    evals = {n: build_passkey_items(tok, hay, [n], [0.1, 0.5, 0.9], 4, chat=False, seed=1000 + n)
             for n in (256, args.seq_len, 2 * args.seq_len, 4 * args.seq_len, 8 * args.seq_len)}
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    alphabet = digits + random.Random(args.seed).sample(range(8, len(tok)), 54)
    curve = []
    t0, tokens = time.time(), 0
    lengths = [int(n) for n in args.curriculum.split(",")]
    for step in range(1, args.steps + 1):
        warming = step <= args.copy_warmup
        seq_len = 256 if warming else lengths[min(len(lengths) - 1, (step - 1) * len(lengths) // args.steps)]
        draw = (lambda: copy_sequence(alphabet, rng, seq_len)) if warming else (
            lambda: documents(tok, hay, rng, seq_len, args.passkey_share, args.answer_only_loss))
        rows = [draw() for _ in range(max(1, args.tokens_per_step // seq_len))]
        batch = torch.as_tensor(np.stack([r[0] for r in rows]))
        labels = torch.as_tensor(np.stack([r[1] for r in rows]))
        loss = model(input_ids=batch[:, :-1], labels=labels[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        tokens += batch.numel()
        if step % args.eval_every == 0 or step == args.steps:
            accs = {n: passkey_accuracy(model, items) for n, items in evals.items() if n <= 2 * args.seq_len}
            curve.append({"step": step, "seq_len": seq_len, "loss": round(loss.item(), 4),
                          **{f"passkey_{n}": a for n, a in accs.items()}})
            log.info("step %d len %d loss %.3f passkey %s  %.0f tokens/s", step, seq_len, loss.item(), accs,
                     tokens / (time.time() - t0))
    final = {f"passkey_{n}": passkey_accuracy(model, items) for n, items in evals.items()}
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    with open(os.path.join(args.out, "TRAINING.json"), "w") as f:
        json.dump({"args": vars(args), "curve": curve, "final": final, "seconds": round(time.time() - t0)}, f, indent=1)
    log.info("final %s", final)


if __name__ == "__main__":
    main()
