"""Read a pipeline back from MLflow: a table of stages x key metrics, and comparison figures."""

from __future__ import annotations

import json
import os
import tempfile

from raylong.log import get_logger
from raylong.tracking import Tracker

log = get_logger(__name__)

TABLE_COLUMNS = ["stage", "status", "seq_len", "steps", "first_loss", "last_loss", "heldout_loss", "short_loss",
                 "passkey", "other_tasks", "tokens_per_s", "wall_s", "export"]


def stage_rows(tracker: Tracker, pipeline_id: str) -> list[dict]:
    """The latest run of every stage of `pipeline_id`, in stage order."""
    parent = tracker.find_pipeline(pipeline_id)
    if parent is None:
        raise KeyError(f"no pipeline {pipeline_id!r} in MLflow at {tracker.tracking_uri}")
    latest: dict[str, object] = {}
    for rec in tracker.stage_runs(parent):
        latest[rec.stage] = rec  # runs come oldest first: keep the newest per stage
    rows = []
    for rec in sorted(latest.values(), key=lambda r: int(r.tags.get("stage_index", 0))):
        run = tracker.get_run(rec.run_id)
        m = run.data.metrics
        losses = tracker.metric_history(rec.run_id, "train/loss")
        passkey = {int(k.rsplit("/", 1)[1]): v for k, v in m.items() if k.startswith("eval/passkey_acc/")}
        others = sorted((k[len("eval/"):].replace("_acc/", "@"), v) for k, v in m.items()
                        if "_acc/" in k and not k.startswith("eval/passkey_acc/"))
        end = run.info.end_time or run.info.start_time
        rows.append({
            "stage": rec.stage,
            "status": rec.status,
            "seq_len": int(run.data.params.get("seq_len", 0)),
            "steps": len(losses),
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"),
            "heldout_loss": m.get("eval/heldout_loss", float("nan")),
            "short_loss": m.get("eval/short_loss", float("nan")),
            "passkey": " ".join(f"{k}:{v:.2f}" for k, v in sorted(passkey.items())) or "-",
            "passkey_by_length": passkey,
            "other_tasks": " ".join(f"{k}:{v:.2f}" for k, v in others) or "-",
            "tokens_per_s": m.get("train/tokens_per_s", float("nan")),
            "wall_s": round((end - run.info.start_time) / 1000, 1),
            "export": rec.export_uri or "",
            "run_id": rec.run_id,
            "losses": losses,
        })
    return rows


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or TABLE_COLUMNS

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [list(columns)] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_eval(tracker: Tracker, run_id: str) -> dict | None:
    """The stage's eval/eval.json artifact, if it has one."""
    path = tracker.download_artifact(run_id, "eval/eval.json", tempfile.mkdtemp())
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def compare_pipeline(tracker: Tracker, pipeline_id: str, out_dir: str | None = None) -> str:
    """Print the stage table; write it and the comparison PNGs as artifacts of the parent run."""
    from raylong.eval.plots import loss_curves, passkey_heatmap, position_curve, stage_task_curves

    rows = stage_rows(tracker, pipeline_id)
    table = format_table(rows)
    log.info("stages of pipeline %s:\n%s", pipeline_id, table)
    out_dir = out_dir or tempfile.mkdtemp(prefix="raylong-compare-")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stages.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "stages.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "losses"} for r in rows], f, indent=2)
    evals = {r["stage"]: stage_eval(tracker, r["run_id"]) for r in rows}
    loss_curves({r["stage"]: r["losses"] for r in rows}, os.path.join(out_dir, "loss_curves.png"))
    position_curve({s: e["loss_by_position"] for s, e in evals.items() if e}, os.path.join(out_dir, "loss_by_position.png"))
    passkey_heatmap({s: e["passkey"] for s, e in evals.items() if e}, os.path.join(out_dir, "passkey_heatmaps.png"))
    stage_task_curves({s: e.get("tasks", {}) for s, e in evals.items() if e}, os.path.join(out_dir, "retrieval_by_stage.png"))
    parent = tracker.find_pipeline(pipeline_id)
    tracker.log_artifacts(parent, out_dir, "compare")
    return table
