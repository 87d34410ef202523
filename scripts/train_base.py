"""Train the tiny recipe's pretrained base: a small Llama that reads 1K tokens and retrieves a passkey there,
playing Llama-3.1-8B's role (a short native context that already does retrieval) so the chain can show an 8x
extension (#16).

One process, plain PyTorch, on the Python standard library's sources (real local text) with passkey documents
mixed in, as pretraining corpora mix in synthetic retrieval data; sequence lengths grow along a curriculum.
Logs the passkey exact match at 256, 1x and 2x the native length every --eval-every steps and writes the
model, its tokenizer and TRAINING.json (arguments, curve, final accuracies at 256..8x) into --out.

assets/tiny_base is run o of docs/tiny_base.md (1.00 at 256 and 1K, 19 minutes on two threads); `make
tiny-base` rebuilds it with these arguments:

    python scripts/train_base.py --out assets/tiny_base --steps 2800 --hidden 128 --layers 3 --heads 4 \
        --kv-heads 4 --passkey-share 0.8 --noise-share 0.7 --answer-only-loss --answer-weight 1.0 \
        --curriculum 256,512,1024,1024 --tokens-per-step 4096 --lr 1e-3 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
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
              answer_only: bool = False, noise: Haystack | None = None,
              noise_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One training sequence of seq_len+1 tokens, its labels and its answer mask: stdlib text, after (with
    probability passkey_share) one passkey prompt and its answer tokenized as the evaluation does (prompt and
    lead, then " KEY") at position 0, as an evaluation item is: a second needle in the same context would
    make the question ambiguous. `answer_only`: a passkey document's loss is on its answer alone."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    answers: list[bool] = []  # the passkey answers' tokens
    if rng.random() < passkey_share:  # one passkey document, first: no other needle in its context
        key = str(rng.randrange(10_000, 100_000))
        filler = (noise if noise is not None and rng.random() < noise_share else hay).slice(
            rng, rng.randrange(min(32, seq_len // 4), max(33, seq_len - 64)))
        prompt = [bos] + tok(passkey_prompt(filler, key, rng.random()) + "\nThe pass key is",
                             add_special_tokens=False)["input_ids"]
        answer = tok(f" {key}", add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt + answer
        labels += ([-100] * len(prompt) if answer_only else prompt) + answer
        answers += [False] * len(prompt) + [True] * len(answer)
    while len(ids) < seq_len + 1:  # then corpus documents
        doc = [bos] + tok(hay.slice(rng, seq_len + 1 - len(ids)), add_special_tokens=False)["input_ids"] + [eos]
        ids += doc
        labels += doc
        answers += [False] * len(doc)
    n = seq_len + 1
    return (np.asarray(ids[:n], dtype=np.int64), np.asarray(labels[:n], dtype=np.int64),
            np.asarray(answers[:n], dtype=bool))


def copy_sequence(alphabet: list[int], rng: random.Random, seq_len: int) -> np.ndarray:
    """Random segments over a small alphabet (the digits and a few words), each written twice: only a copy
    (induction) head predicts the second copy. A warm-up on these seeds the head that passkey retrieval
    needs before the corpus takes over."""
    out: list[int] = []
    while len(out) < seq_len + 1:
        seg = [rng.choice(alphabet) for _ in range(rng.randrange(8, 48))]
        out += seg + seg
    seq = np.asarray(out[: seq_len + 1], dtype=np.int64)
    return seq, seq, np.zeros(len(seq), dtype=bool)


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
    ap.add_argument("--noise-share", type=float, default=0.0,
                    help="share of passkey documents whose filler is the standard test's repeated noise")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--copy-warmup", type=int, default=0,
                    help="first steps on repeated random segments (256 tokens), to seed a copy head")
    ap.add_argument("--answer-only-loss", action="store_true",
                    help="a passkey document's loss on its answer only (the corpus documents keep theirs)")
    ap.add_argument("--answer-weight", type=float, default=0.0,
                    help="loss = corpus tokens' mean + this x the passkey answers' mean (0: one mean over all)")
    ap.add_argument("--init", default=None, help="continue from this model (an earlier run's --out)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = args.init or os.path.join(args.out, "tokenizer")  # a continued model keeps its tokenizer
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        train_bpe_tokenizer(f"{STDLIB}/*.py", 4096, tok_dir, max_files=200)
    tok = load_tokenizer(tok_dir)
    hay = Haystack.from_glob(f"{STDLIB}/*.py", tok, seed=args.seed)
    noise = Haystack.noise(tok)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM.from_pretrained(args.init) if args.init else LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = random.Random(args.seed)
    evals = {n: build_passkey_items(tok, noise, [n], [0.1, 0.5, 0.9], 4, chat=False, seed=1000 + n)
             for n in (256, args.seq_len, 2 * args.seq_len, 4 * args.seq_len, 8 * args.seq_len)}
    evals.update({f"text{n}": build_passkey_items(tok, hay, [n], [0.1, 0.5, 0.9], 4, chat=False, seed=2000 + n)
                  for n in (256, args.seq_len)})
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    alphabet = digits + random.Random(args.seed).sample(range(8, len(tok)), 54)
    curve = []
    t0, tokens = time.time(), 0
    lengths = [int(n) for n in args.curriculum.split(",")]
    for step in range(1, args.steps + 1):
        warming = step <= args.copy_warmup
        seq_len = 256 if warming else lengths[min(len(lengths) - 1, (step - 1) * len(lengths) // args.steps)]
        draw = (lambda: copy_sequence(alphabet, rng, seq_len)) if warming else (
            lambda: documents(tok, hay, rng, seq_len, args.passkey_share, args.answer_only_loss, noise,
                              args.noise_share))
        rows = [draw() for _ in range(max(1, args.tokens_per_step // seq_len))]
        batch = torch.as_tensor(np.stack([r[0] for r in rows]))
        labels = torch.as_tensor(np.stack([r[1] for r in rows]))
        answers = torch.as_tensor(np.stack([r[2] for r in rows]))[:, 1:]
        logits = model(input_ids=batch[:, :-1]).logits
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                       ignore_index=-100, reduction="none").view_as(answers)
        learn = labels[:, 1:] != -100
        if args.answer_weight and answers.any():  # the answers' mean apart: a few dozen tokens would be lost
            corpus = learn & ~answers
            loss = token_loss[corpus].sum() / corpus.sum().clamp(min=1) + args.answer_weight * token_loss[answers].mean()
        else:
            loss = token_loss[learn].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        tokens += batch.numel()
        if step % args.eval_every == 0 or step == args.steps:
            accs = {n: passkey_accuracy(model, items) for n, items in evals.items()
                    if isinstance(n, str) or n <= 2 * args.seq_len}
            curve.append({"step": step, "seq_len": seq_len, "loss": round(loss.item(), 4),
                          **{f"passkey_{n}": a for n, a in accs.items()}})
            answer_loss = token_loss[answers].mean().item() if answers.any() else float("nan")
            curve[-1]["answer_loss"] = round(answer_loss, 4)
            log.info("step %d len %d loss %.3f answer loss %.3f passkey %s  %.0f tokens/s", step, seq_len,
                     loss.item(), answer_loss, accs, tokens / (time.time() - t0))
    final = {f"passkey_{n}": passkey_accuracy(model, items) for n, items in evals.items()}
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)  # beside the weights: the directory is a recipe's model.path and tokenizer.path
    shutil.rmtree(os.path.join(args.out, "tokenizer"), ignore_errors=True)
    with open(os.path.join(args.out, "TRAINING.json"), "w") as f:
        json.dump({"args": vars(args), "curve": curve, "final": final, "seconds": round(time.time() - t0)}, f, indent=1)
    log.info("final %s", final)


if __name__ == "__main__":
    main()
