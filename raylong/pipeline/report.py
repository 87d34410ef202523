"""Read a pipeline back from MLflow: one row per stage, printable as a table."""

from __future__ import annotations

from raylong.pipeline.tracking import Tracker


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
        run = tracker.client.get_run(rec.run_id)
        losses = tracker.metric_history(rec.run_id, "train/loss")
        rows.append({
            "stage": rec.stage,
            "status": rec.status,
            "seq_len": int(run.data.params.get("seq_len", 0)),
            "steps": len(losses),
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"),
            "tokens_per_s": run.data.metrics.get("train/tokens_per_s", float("nan")),
            "checkpoint": rec.tags.get("checkpoint_uri", ""),
            "run_id": rec.run_id,
        })
    return rows


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or ["stage", "status", "seq_len", "steps", "first_loss", "last_loss", "tokens_per_s", "checkpoint"]

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [[c for c in columns]] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
