"""Run an EvalSuite: with a plain forward function (tests, single process) or inside the Ray Train
workers right after training, through the stage's SP-sharded DeepSpeed engine (so a 1M-token eval runs
wherever training ran)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from raylong.data.packing import IGNORE
from raylong.eval.suite import EvalSuite, loss_by_position, pad_to_multiple, passkey_hit, summarize
from raylong.storage import fs_path
from raylong.tracking import Tracker
from raylong.train.collectives import all_gather_cat, all_gather_objects
from raylong.train.loss import shift_labels

# forward(input_ids [L], position_ids [L], labels [L]) -> (next-token loss [L], greedy next token [L])
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def model_forward(model, multiple: int = 1) -> Forward:
    """A Forward over a plain (unsharded) causal LM."""

    def forward(ids, pos, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids)[None], position_ids=torch.as_tensor(pos)[None],
                           use_cache=False).logits[0].float()
        targets = shift_labels(torch.as_tensor(labels)[None])[0]
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
        return loss.numpy(), logits.argmax(-1).numpy()

    return forward


def read_heldout(path: str, limit: int, per_document_positions: bool = True) -> list[dict[str, np.ndarray]]:
    """The first `limit` held-out sequences; positions 0..L-1 when documents attend across boundaries."""
    fs, local = fs_path(path)
    if not os.path.exists(local) and "://" not in path:
        return []
    rows = pq.read_table(fs.open_input_file(local)).slice(0, limit).to_pylist()
    rows = [{k: np.asarray(v, dtype=np.int64) for k, v in r.items()} for r in rows]
    if not per_document_positions:
        for r in rows:
            r["position_ids"] = np.arange(len(r["position_ids"]), dtype=np.int64)
    return rows


def score(forward: Forward, suite: EvalSuite, heldout: list[dict[str, np.ndarray]], pad_id: int, multiple: int = 1,
          items: list[int] | None = None, heldout_ids: list[int] | None = None, extra_items: int = 0,
          extra_heldout: int = 0) -> dict:
    """Raw results for a subset of the suite: per-item passkey hits, per-sequence losses. `extra_*` more
    forwards are run on the first item / row and discarded, so that every DP group runs as many forwards as
    the others (inside the workers each forward is a collective over all ranks)."""
    items = list(range(len(suite.passkey)) if items is None else items)
    heldout_ids = list(range(len(heldout)) if heldout_ids is None else heldout_ids)
    hits = {}
    for k, i in enumerate(items + [0] * extra_items):
        item = suite.passkey[i]
        ids, pos = pad_to_multiple(item.input_ids, multiple, pad_id)
        _, argmax = forward(ids, pos, np.full(len(ids), IGNORE))
        if k < len(items):
            hits[i] = passkey_hit(argmax, item)
    losses, shorts = {}, {}
    for k, j in enumerate(heldout_ids + [0] * extra_heldout):
        row = heldout[j]
        loss, _ = forward(row["input_ids"], row["position_ids"], row["labels"])
        n = suite.short_len
        short, _ = forward(row["input_ids"][:n], np.arange(n), row["labels"][:n])
        if k < len(heldout_ids):
            losses[j] = loss
            mask = shift_labels(torch.as_tensor(row["labels"][:n])[None])[0].numpy() != IGNORE
            shorts[j] = (float(short[mask].sum()), int(mask.sum()))
    return {"hits": hits, "losses": losses, "shorts": shorts}


def dp_share(n: int, dp_rank: int, dp: int) -> tuple[list[int], int]:
    """The indices DP group `dp_rank` of `dp` scores out of n (round robin), and how many forwards it must add
    to match the busiest group."""
    mine = list(range(dp_rank, n, dp))
    return mine, -(-n // dp) - len(mine)


def combine(suite: EvalSuite, heldout: list[dict[str, np.ndarray]], parts: list[dict]) -> dict:
    hits, losses, shorts = {}, {}, {}
    for part in parts:
        hits.update(part["hits"]), losses.update(part["losses"]), shorts.update(part["shorts"])
    order = sorted(losses)
    targets = [shift_labels(torch.as_tensor(heldout[j]["labels"])[None])[0].numpy() for j in order]
    by_pos = loss_by_position([losses[j] for j in order], targets, suite.seq_len)
    total = sum(float(losses[j][t != IGNORE].sum()) for j, t in zip(order, targets))
    count = sum(int((t != IGNORE).sum()) for t in targets)
    s_sum, s_n = sum(v[0] for v in shorts.values()), sum(v[1] for v in shorts.values())
    return summarize(suite.stage, suite.seq_len, by_pos, total / count if count else None,
                     s_sum / s_n if s_n else None, [(suite.passkey[i], h) for i, h in sorted(hits.items())])


def evaluate(forward: Forward, suite: EvalSuite, heldout: list[dict[str, np.ndarray]], pad_id: int) -> dict:
    """Single-process evaluation."""
    return combine(suite, heldout, [score(forward, suite, heldout, pad_id)])


# ------------------------------------------------------------------------------ inside Ray Train
def sharded_forward(se) -> Forward:
    """Forward through the stage's engine: every SP rank runs its slice and scores it from the final hidden
    states in tiles (no [L, vocab] logits, as in training's tiled loss); results are all-gathered."""
    from raylong.train.memory import tiled_scores
    from raylong.train.step import last_hidden_state

    sp = se.stage.parallel.sp_size

    def forward(ids, pos, labels):
        chunk = len(ids) // sp
        part = slice(se.sp_rank * chunk, (se.sp_rank + 1) * chunk)
        targets = shift_labels(torch.as_tensor(labels)[None])[0][part].to(se.device)
        with torch.no_grad(), last_hidden_state(se.engine.module) as captured:
            se.engine(input_ids=torch.as_tensor(ids[part])[None].to(se.device),
                      position_ids=torch.as_tensor(pos[part])[None].to(se.device), use_cache=False,
                      logits_to_keep=torch.zeros(0, dtype=torch.long))  # the head runs below, in tiles
        loss, argmax = tiled_scores(se.engine.module.lm_head, captured[0][0], targets, se.stage.memory.loss_tile_tokens)
        if sp > 1:
            loss, argmax = all_gather_cat(loss, se.sp_group), all_gather_cat(argmax, se.sp_group)
        return loss.cpu().numpy(), argmax.cpu().numpy()

    return forward


def evaluate_in_workers(se, suite_json: str, heldout_path: str | None, max_heldout: int, pad_id: int) -> dict | None:
    """Collective over the worker group; each DP group scores its share; rank 0 returns the summary.
    `heldout_path` None: retrieval tasks only (the base model's evaluation)."""
    import torch.distributed as dist

    suite = EvalSuite.from_json(suite_json)
    heldout = read_heldout(heldout_path, max_heldout, se.stage.per_document_attention) if heldout_path else []
    sp = se.stage.parallel.sp_size
    if suite.short_len % sp:
        raise ValueError(f"eval short_len {suite.short_len} must be divisible by sp_size {sp}")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp = rank // sp, world // sp
    items, extra_items = dp_share(len(suite.passkey), dp_rank, dp)
    rows, extra_rows = dp_share(len(heldout), dp_rank, dp)
    se.engine.eval()
    part = score(sharded_forward(se), suite, heldout, pad_id, multiple=sp, items=items, heldout_ids=rows,
                 extra_items=extra_items, extra_heldout=extra_rows)
    parts = all_gather_objects(part if se.sp_rank == 0 else None)
    se.engine.train()
    if rank != 0:
        return None
    return combine(suite, heldout, [p for p in parts if p is not None])


def record(summary: dict, tracker: Tracker | None, run_id: str | None, out_dir: str | None = None) -> str:
    """Write eval.json + PNGs; with a tracker, log metrics and artifacts to the stage's MLflow run."""
    from raylong.eval.plots import passkey_heatmap, position_curve, task_curves

    out_dir = out_dir or tempfile.mkdtemp(prefix="raylong-eval-")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    passkey_heatmap({summary["stage"]: summary["passkey"]}, os.path.join(out_dir, "passkey_heatmap.png"))
    position_curve({summary["stage"]: summary["loss_by_position"]}, os.path.join(out_dir, "loss_by_position.png"))
    if summary.get("tasks"):
        task_curves(summary["tasks"], os.path.join(out_dir, "retrieval_by_length.png"), summary["stage"])
    if tracker is not None and run_id:
        tracker.log_metrics(run_id, summary["metrics"])
        tracker.log_artifacts(run_id, out_dir, "eval")
    return out_dir
