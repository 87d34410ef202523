"""Long-context instruction data over real documents: a passkey or key-value pair hidden at a depth.

Used to make SFT conversations for the long SFT stages and passkey prompts for evaluation.
"""

from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass
from pathlib import Path

from raylong.config import NEEDLE_TASKS, GenerateConfig, expand_path


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


@dataclass
class Haystack:
    """Real filler text, concatenated from files, read once."""

    text: str
    chars_per_token: float

    @classmethod
    def from_glob(cls, pattern: str, tok=None, max_chars: int = 4_000_000, seed: int = 0) -> Haystack:
        files = sorted(glob.glob(expand_path(pattern), recursive=True))
        if not files:
            raise FileNotFoundError(f"filler glob matched no files: {pattern}")
        random.Random(seed).shuffle(files)
        parts, total = [], 0
        for f in files:
            try:
                t = Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            parts.append(t)
            total += len(t)
            if total >= max_chars:
                break
        text = "\n".join(parts)
        cpt = 4.0
        if tok is not None:
            sample = text[:200_000]
            cpt = len(sample) / max(1, len(tok(sample, add_special_tokens=False)["input_ids"]))
        return cls(text, cpt)

    @classmethod
    def noise(cls, tok=None, chars: int = 400_000) -> Haystack:
        """The standard passkey test's haystack (Mohtashami & Jaggi, 2023; RULER's niah_single_1): a few
        sentences repeated, so the needle is the only information in the context."""
        text = (NOISE * (chars // len(NOISE) + 1))[:chars]
        cpt = 4.0
        if tok is not None:
            cpt = len(text[:20_000]) / max(1, len(tok(text[:20_000], add_special_tokens=False)["input_ids"]))
        return cls(text, cpt)

    def slice(self, rng: random.Random, tokens: int) -> str:
        n = int(tokens * self.chars_per_token)
        if n >= len(self.text):
            return self.text
        start = rng.randrange(0, len(self.text) - n)
        return self.text[start : start + n]


def passkey_prompt(filler: str, key: str, depth: float) -> str:
    """Filler with 'The pass key is KEY.' inserted at `depth` (0 = start, 1 = end), cut at a line break."""
    cut = int(len(filler) * depth)
    nl = filler.rfind("\n", 0, cut)
    cut = nl + 1 if nl >= 0 else cut
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    return filler[:cut] + needle + filler[cut:] + "\nWhat is the pass key?"


def insert_lines(filler: str, lines: list[tuple[float, str]]) -> str:
    """Filler with each (depth, line) inserted at that fraction of it, cut at a line break; lines at the
    same depth keep their order."""
    cuts = []
    for depth, line in lines:
        cut = int(len(filler) * depth)
        nl = filler.rfind("\n", 0, cut)
        cuts.append((nl + 1 if nl >= 0 else cut, line))
    out, last = [], 0
    for cut, line in sorted(cuts, key=lambda c: c[0]):
        out += [filler[last:cut], f"\n{line}\n"]
        last = cut
    return "".join(out) + filler[last:]


def needle_prompt(task: str, rng: random.Random, filler: str, depth: float) -> tuple[str, str, str]:
    """(prompt, the reply's opening, the answer) of one retrieval task over `filler`, its needle at `depth`:
    passkey     one key, repeated in its sentence ("The pass key is K. Remember it. K is the pass key.")
    multikey    four named keys; the question names one (the others distract)
    multivalue  three values of one name at different depths; all of them, in the order they appear
    vartrack    VAR A = K, then B = A, C = B later on; the value of C (two hops)"""
    key = lambda: str(rng.randrange(10_000, 100_000))  # noqa: E731
    name = lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))  # noqa: E731
    if task == "passkey":
        k = key()
        return passkey_prompt(filler, k, depth), "The pass key is", k
    if task == "multikey":
        names, keys = [name() for _ in range(4)], [key() for _ in range(4)]
        at = [depth] + [rng.random() for _ in range(3)]
        text = insert_lines(filler, [(d, f"The pass key for {n} is {k}.") for d, n, k in zip(at, names, keys)])
        return text + f"\nWhat is the pass key for {names[0]}?", f"The pass key for {names[0]} is", keys[0]
    if task == "multivalue":
        n, at = name(), sorted([depth] + [rng.random() for _ in range(2)])
        values = [key() for _ in at]
        text = insert_lines(filler, [(d, f"One of the values of {n} is {v}.") for d, v in zip(at, values)])
        return text + f"\nWhat are all the values of {n}?", f"The values of {n} are", ", ".join(values)
    if task == "vartrack":
        a, b, c, k = name(), name(), name(), key()
        later = sorted(depth + (1 - depth) * rng.random() for _ in range(2))
        text = insert_lines(filler, [(depth, f"VAR {a} = {k}."), (later[0], f"VAR {b} = VAR {a}."),
                                     (later[1], f"VAR {c} = VAR {b}.")])
        return text + f"\nWhat is the value of VAR {c}?", f"The value of VAR {c} is", k
    raise ValueError(f"unknown retrieval task {task!r} (known: {', '.join(NEEDLE_TASKS)})")


def make_passkey(rng: random.Random, hay: Haystack, tokens: int, depth: float) -> tuple[str, str]:
    key = str(rng.randrange(10_000, 100_000))
    return passkey_prompt(hay.slice(rng, tokens), key, depth), key


def make_kv_lookup(rng: random.Random, hay: Haystack, tokens: int, depth: float) -> tuple[str, str]:
    pairs = {f"key-{rng.randrange(16**6):06x}": str(rng.randrange(10_000, 100_000)) for _ in range(8)}
    target = rng.choice(sorted(pairs))
    filler = hay.slice(rng, tokens)
    lines = filler.split("\n")
    for i, (k, v) in enumerate(pairs.items()):
        at = int(len(lines) * (depth if k == target else rng.random()))
        lines.insert(min(at + i, len(lines)), f"{k} = {v}")
    return "\n".join(lines) + f"\nWhat is the value of {target}?", pairs[target]


def generate_conversations(cfg: GenerateConfig, tok=None) -> list[dict]:
    """Conversations {messages: [...], meta: {...}} with the answer at a uniformly drawn depth."""
    rng = random.Random(cfg.seed)
    hay = Haystack.from_glob(cfg.filler, tok, seed=cfg.seed)
    out = []
    for i in range(cfg.num_examples):
        tokens = cfg.context_tokens[i % len(cfg.context_tokens)]
        depth = rng.random()
        if cfg.task == "passkey":
            prompt, answer = make_passkey(rng, hay, tokens, depth)
            reply = f"The pass key is {answer}."
        else:
            prompt, answer = make_kv_lookup(rng, hay, tokens, depth)
            reply = f"The value is {answer}."
        out.append(
            {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                "meta": {"task": cfg.task, "context_tokens": tokens, "depth": round(depth, 4), "answer": answer},
            }
        )
    return out


def write_jsonl(rows: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
