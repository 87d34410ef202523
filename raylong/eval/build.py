"""Build a stage's EvalSuite on the driver (tokenizer and filler text only; no model)."""

from __future__ import annotations

from raylong.config import StageConfig
from raylong.eval.suite import EvalSuite, build_passkey_items, passkey_lengths


def build_eval_suite(stage: StageConfig, tokenizer_dir: str) -> EvalSuite:
    from raylong.data.synth import Haystack
    from raylong.data.tokenize import load_tokenizer

    ev = stage.eval
    suite = EvalSuite(stage=stage.name, seq_len=stage.seq_len, short_len=stage.eval_short_len)
    if ev.filler:
        tok = load_tokenizer(tokenizer_dir)
        hay = Haystack.from_glob(ev.filler, tok, seed=ev.seed)
        passkey_hay = Haystack.noise(tok) if ev.passkey_haystack == "noise" else hay
        lengths = ev.lengths or passkey_lengths(stage.seq_len)
        suite.passkey = build_passkey_items(tok, hay, lengths, ev.depths, ev.per_cell, chat=stage.kind == "sft",
                                            seed=ev.seed, tasks=tuple(ev.tasks), passkey_hay=passkey_hay)
    return suite
