"""The driver -> worker contract: everything a Ray Train worker needs for one stage or sweep trial.

The driver builds a WorkerSpec, it is validated here (before any worker starts), and it reaches every
worker unchanged through Ray's object store. Locations are full URIs or absolute local paths: an
object-store path that lost its scheme ("bucket/key" instead of "s3://bucket/key") is refused here
instead of being opened as a relative local file on every worker.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from raylong.config import StageConfig


class WorkerMode(enum.Enum):
    STAGE = "stage"  # train all steps, export, optionally save the optimizer state, evaluate the export
    TRIAL = "trial"  # sweep trial: train, evaluate every `eval_every` steps, report to Tune; no export
    EVAL = "eval"  # evaluate the start weights (the base model) and record; no training, no export


class SpecError(ValueError):
    """A WorkerSpec that cannot run: names the field and the rule."""


# locations raylong writes under the storage path (init_uri / tokenizer_uri may also be hub ids)
STORAGE_FIELDS = ("train_uri", "heldout_uri", "export_uri", "eval_suite_uri", "save_optimizer_to", "optimizer_from")


def _is_location(value: str) -> bool:
    return "://" in value or os.path.isabs(value)


@dataclass(frozen=True)
class WorkerSpec:
    stage: StageConfig
    mode: WorkerMode
    init_uri: str  # Hugging Face export the stage starts from
    tokenizer_uri: str
    train_uri: str | None  # packed training sequences (Parquet); None only when evaluating (EVAL)
    export_uri: str | None = None  # where the stage's Hugging Face export goes (STAGE)
    tracking_uri: str | None = None  # MLflow; None: nothing recorded
    mlflow_run_id: str | None = None  # the stage's (or trial's) run, created by the driver
    eval_suite_uri: str | None = None  # the EvalSuite JSON the driver built; None: no evaluation
    heldout_uri: str | None = None
    eval_every: int | None = None  # TRIAL: evaluate and report every N steps
    save_optimizer_to: str | None = None  # a later stage carries this stage's optimizer state
    optimizer_from: str | None = None  # this stage starts from that saved optimizer state
    credentials: dict[str, str] = field(default_factory=dict, repr=False)  # never logged

    def __post_init__(self) -> None:
        for name in STORAGE_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_location(value):
                raise SpecError(f"WorkerSpec.{name}: {value!r} is neither a URI with a scheme nor an absolute "
                                f"path (an object-store location that lost its scheme?)")
        if self.mode is WorkerMode.STAGE and self.export_uri is None:
            raise SpecError("WorkerSpec.export_uri: a stage run needs the location of its export")
        if self.mode is WorkerMode.TRIAL:
            if not self.eval_every or self.eval_suite_uri is None:
                raise SpecError("WorkerSpec: a sweep trial needs eval_every >= 1 and an eval_suite_uri "
                                f"(got eval_every={self.eval_every}, eval_suite_uri={self.eval_suite_uri})")
            if self.export_uri or self.save_optimizer_to:
                raise SpecError("WorkerSpec: a sweep trial writes no export and no optimizer state")
        if self.mode is WorkerMode.EVAL:
            if self.eval_suite_uri is None:
                raise SpecError("WorkerSpec: an evaluation run needs an eval_suite_uri")
            if self.export_uri or self.save_optimizer_to:
                raise SpecError("WorkerSpec: an evaluation run writes no export and no optimizer state")
        elif self.train_uri is None:
            raise SpecError(f"WorkerSpec.train_uri: a {self.mode.value} run trains and needs its packed sequences")
        if self.eval_suite_uri is not None and self.heldout_uri is None and self.mode is not WorkerMode.EVAL:
            raise SpecError("WorkerSpec.heldout_uri: evaluation needs the held-out sequences")
