"""Long-context evaluation of a stage: loss by position on held-out data, passkey retrieval by length
and depth, and a short-context loss.

The suite is built on the driver (token ids, no model) and scored by any `logits_fn(input_ids,
position_ids) -> per-token losses / argmax` so the same code runs a plain model, an SP-sharded
DeepSpeed engine inside Ray Train workers, or a hand-written reference model in tests.

Passkey exact match is computed in one forward pass: greedy decoding reproduces the key exactly iff
the argmax at every key position, given the prompt and the key's previous tokens, is the key's token.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from raylong.data.packing import IGNORE


@dataclass
class PasskeyItem:
    length: int  # requested context length in tokens (the prompt is at most this long)
    depth: float
    input_ids: list[int]
    answer_start: int  # index of the first key token in input_ids
    answer_len: int


@dataclass
class EvalSuite:
    stage: str
    seq_len: int
    passkey: list[PasskeyItem] = field(default_factory=list)
    short_len: int = 256

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EvalSuite:
        d = json.loads(text)
        d["passkey"] = [PasskeyItem(**p) for p in d["passkey"]]
        return cls(**d)


def passkey_lengths(seq_len: int, count: int = 3, smallest: int = 256) -> list[int]:
    """Log-spaced context lengths up to the stage's seq_len."""
    if seq_len <= smallest:
        return [seq_len]
    exps = np.linspace(math.log2(smallest), math.log2(seq_len), count)
    return sorted({int(2 ** e) for e in exps})


def build_passkey_items(tok, hay, lengths: list[int], depths: list[float], per_cell: int, chat: bool,
                        seed: int = 0) -> list[PasskeyItem]:
    """Prompts of real filler with the key at each depth; the model must continue with the key."""
    from raylong.data.synth import passkey_prompt

    rng = random.Random(seed)
    items = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                key = str(rng.randrange(10_000, 100_000))
                key_ids = tok(" " + key, add_special_tokens=False)["input_ids"]
                budget = length - 48 - len(key_ids)  # room for the question and the template
                filler = hay.slice(rng, max(8, budget))
                ids = _encode_prompt(tok, passkey_prompt(filler, key, depth), chat)
                while len(ids) + len(key_ids) > length and len(filler) > 16:  # trim to fit exactly
                    filler = filler[: int(len(filler) * 0.9)]
                    ids = _encode_prompt(tok, passkey_prompt(filler, key, depth), chat)
                items.append(PasskeyItem(length, depth, ids + key_ids, len(ids), len(key_ids)))
    return items


def _encode_prompt(tok, prompt: str, chat: bool) -> list[int]:
    """Prompt ending just before the key: '... The pass key is' (prefilled reply in chat format)."""
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        return list(ids) + tok("The pass key is", add_special_tokens=False)["input_ids"]
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return head + tok(prompt + "\nThe pass key is", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------- scoring
def pad_to_multiple(ids: list[int], multiple: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and position_ids padded at the end to a multiple of the SP degree."""
    n = len(ids)
    total = -(-n // multiple) * multiple
    out = np.full(total, pad_id, dtype=np.int64)
    out[:n] = ids
    return out, np.arange(total, dtype=np.int64)


def passkey_hit(argmax: np.ndarray, item: PasskeyItem) -> bool:
    """argmax[i] = the model's greedy prediction for token i+1."""
    s, n = item.answer_start, item.answer_len
    return bool((argmax[s - 1 : s - 1 + n] == np.asarray(item.input_ids[s : s + n])).all())


def position_buckets(seq_len: int, first: int = 64) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) token-position buckets covering the sequence."""
    edges = [0, first]
    while edges[-1] < seq_len:
        edges.append(min(seq_len, edges[-1] * 2))
    return list(zip(edges[:-1], edges[1:]))


def loss_by_position(token_losses: list[np.ndarray], labels: list[np.ndarray], seq_len: int) -> dict[str, float]:
    """Mean loss per position bucket over held-out sequences (only learnable targets count)."""
    out = {}
    for lo, hi in position_buckets(seq_len):
        vals = [l[lo:hi][lab[lo:hi] != IGNORE] for l, lab in zip(token_losses, labels)]
        vals = np.concatenate(vals) if vals else np.zeros(0)
        if len(vals):
            out[f"{lo}-{hi}"] = float(vals.mean())
    return out


def summarize(stage: str, seq_len: int, heldout: dict[str, float], heldout_loss: float | None, short_loss: float | None,
              hits: list[tuple[PasskeyItem, bool]]) -> dict:
    """The stage's evaluation as one JSON-able dict, plus the flat metrics to log."""
    grid: dict[int, dict[float, list[bool]]] = {}
    for item, hit in hits:
        grid.setdefault(item.length, {}).setdefault(item.depth, []).append(hit)
    passkey = {
        str(length): {f"{d:.2f}": float(np.mean(v)) for d, v in sorted(depths.items())}
        for length, depths in sorted(grid.items())
    }
    metrics = {f"eval/passkey_acc/{length}": float(np.mean([h for v in depths.values() for h in v]))
               for length, depths in grid.items()}
    metrics.update({f"eval/loss_pos_{k}": v for k, v in heldout.items()})
    if heldout_loss is not None:
        metrics["eval/heldout_loss"] = heldout_loss
    if short_loss is not None:
        metrics["eval/short_loss"] = short_loss
    return {"stage": stage, "seq_len": seq_len, "passkey": passkey, "loss_by_position": heldout,
            "heldout_loss": heldout_loss, "short_loss": short_loss, "metrics": metrics}
