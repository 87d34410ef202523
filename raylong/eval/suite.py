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
    """One retrieval prompt and its answer (passkey or another needle task), scored by exact match."""

    length: int  # requested context length in tokens (the prompt is at most this long)
    depth: float
    input_ids: list[int]
    answer_start: int  # index of the first answer token in input_ids
    answer_len: int
    task: str = "passkey"


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
                        seed: int = 0, tasks: tuple[str, ...] = ("passkey",), passkey_hay=None) -> list[PasskeyItem]:
    """Prompts of filler with the needle at each depth, per task; the model must continue with the answer.
    `hay` is real text; `passkey_hay` (default `hay`) the single-needle passkey's haystack. Each task draws
    from its own seeded stream, so adding a task leaves the others' items as they were."""
    items = []
    for task in tasks:
        rng = random.Random(seed if task == "passkey" else f"{seed}-{task}")
        task_hay = passkey_hay if task == "passkey" and passkey_hay is not None else hay
        for length in lengths:
            for depth in depths:
                for _ in range(per_cell):
                    items.append(_needle_item(tok, task_hay, rng, task, length, depth, chat))
    return items


def _needle_item(tok, hay, rng: random.Random, task: str, length: int, depth: float, chat: bool) -> PasskeyItem:
    from raylong.data.synth import needle_prompt

    draw = rng.random()  # the item's keys and names, the same however much filler is cut below
    answer = needle_prompt(task, random.Random(draw), "", depth)[2]
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    filler = hay.slice(rng, max(8, length - 64 - 2 * len(answer_ids)))  # room for needles, question, template
    while True:  # trim the filler until prompt + answer fit
        prompt, lead, _ = needle_prompt(task, random.Random(draw), filler, depth)
        ids = _encode_prompt(tok, prompt, lead, chat)
        if len(ids) + len(answer_ids) <= length:
            return PasskeyItem(length, depth, ids + answer_ids, len(ids), len(answer_ids), task)
        if not filler:
            raise ValueError(f"eval length {length} is too short for the {task} task: its needles, question and "
                             f"answer alone take {len(ids) + len(answer_ids)} tokens")
        filler = filler[: int(len(filler) * 0.9)]


def _encode_prompt(tok, prompt: str, lead: str, chat: bool) -> list[int]:
    """Prompt ending just before the answer: '... <lead>' (the reply's opening prefilled in chat format)."""
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        return list(ids) + tok(lead, add_special_tokens=False)["input_ids"]
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return head + tok(prompt + "\n" + lead, add_special_tokens=False)["input_ids"]


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
    """The stage's evaluation as one JSON-able dict, plus the flat metrics to log. `passkey` is the
    single-needle grid (length x depth); `tasks` every task's accuracy per length."""
    grids: dict[str, dict[int, dict[float, list[bool]]]] = {}
    for item, hit in hits:
        grids.setdefault(item.task, {}).setdefault(item.length, {}).setdefault(item.depth, []).append(hit)
    passkey = {
        str(length): {f"{d:.2f}": float(np.mean(v)) for d, v in sorted(depths.items())}
        for length, depths in sorted(grids.get("passkey", {}).items())
    }
    tasks = {task: {str(length): float(np.mean([h for v in depths.values() for h in v]))
                    for length, depths in sorted(grid.items())} for task, grid in grids.items()}
    metrics = {f"eval/{task}_acc/{length}": acc for task, by_length in tasks.items() for length, acc in by_length.items()}
    metrics.update({f"eval/loss_pos_{k}": v for k, v in heldout.items()})
    if heldout_loss is not None:
        metrics["eval/heldout_loss"] = heldout_loss
    if short_loss is not None:
        metrics["eval/short_loss"] = short_loss
    return {"stage": stage, "seq_len": seq_len, "passkey": passkey, "tasks": tasks, "loss_by_position": heldout,
            "heldout_loss": heldout_loss, "short_loss": short_loss, "metrics": metrics}
