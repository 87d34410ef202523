"""What each Ray Train worker runs for one stage or one sweep trial, in named phases:

    setup         credentials -> start weights + tokenizer -> StageEngine -> resume -> data order
    train_step    grad_accum micro-steps (batch -> SP shard -> forward -> loss -> backward -> step) -> metrics
    after_step    checkpoint every N steps; a sweep trial evaluates every `eval_every` steps
    finish_stage  consolidated Hugging Face export -> optimizer state (if carried) -> evaluation -> report
    finish_trial  barrier (a trial is judged by its evaluations; nothing is exported)
    finish_eval   evaluation of the start weights (the base model) -> report (EVAL: no step is trained)

`before_step` does nothing here: it is the seam tests use to inject faults (a subclass that SIGKILLs a
rank), passed to `launch.run_training(worker_cls=...)`.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch.distributed as dist

from raylong.config import StageConfig
from raylong.credentials import credential_names
from raylong.log import get_logger
from raylong.storage import download_dir, read_text
from raylong.tracking import Tracker
from raylong.train import collectives
from raylong.train.batches import resumed_batches
from raylong.train.checkpoints import load_optimizer_state, restore_checkpoint, save_checkpoint, save_optimizer_state
from raylong.train.engine import consolidated_state_dict
from raylong.train.model import save_export
from raylong.train.spec import WorkerMode, WorkerSpec
from raylong.train.step import StageEngine, build_stage_engine, optimizer_step, peak_memory_mib

log = get_logger(__name__)


class StageWorker:
    spec: WorkerSpec
    stage: StageConfig
    rank: int
    world: int
    se: StageEngine
    tracker: Tracker | None  # rank 0 records to the stage's MLflow run; other ranks record nothing
    tokenizer_dir: str  # local copy
    loader: object  # this rank's (SP-sharded) loader; len() = micro-batches per epoch
    batches: Iterator[dict]  # endless, resumed where the finished steps left off
    start_step: int
    resume_info: dict[str, object]
    metrics: dict[str, float]  # the last step's
    flops_per_step: float  # model FLOPs of one step (GPU only, for MFU); 0 on CPU
    peak_flops: float

    def __init__(self, spec: WorkerSpec):
        self.spec, self.stage = spec, spec.stage
        self.metrics = {}

    # --------------------------------------------------------------------------------- phases
    def run(self) -> None:
        self.setup()
        if self.spec.mode is WorkerMode.EVAL:
            self.finish_eval()
            return
        for step in range(self.start_step, self.stage.optim.steps):
            self.before_step(step)
            self.metrics = self.train_step(step)
            self.after_step(step + 1)
        if self.spec.mode is WorkerMode.TRIAL:
            self.finish_trial()
        else:
            self.finish_stage()

    def setup(self) -> None:
        spec, stage, p = self.spec, self.stage, self.stage.parallel
        scratch = tempfile.mkdtemp(prefix="raylong-")
        init_dir = download_dir(spec.init_uri, f"{scratch}/init")  # no-op for local storage
        self.tokenizer_dir = download_dir(spec.tokenizer_uri, f"{scratch}/tokenizer")
        self.se = build_stage_engine(stage, init_dir)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        recording = self.rank == 0 and spec.tracking_uri and spec.mlflow_run_id
        self.tracker = Tracker(spec.tracking_uri) if recording else None
        if spec.mode is WorkerMode.EVAL:
            return
        self.start_step, skipped = restore_checkpoint(self.se.engine, self.rank)
        self.resume_info = {"resumed_from_step": self.start_step, "skipped_checkpoints": "\n".join(skipped)}
        self.loader, self.batches = resumed_batches(spec.train_uri, self.rank, self.world,
                                                    self.start_step * stage.optim.grad_accum, self.se.sp_rank,
                                                    self.se.sp_group, p.sp_size, self.se.device,
                                                    seed=stage.data.seed if stage.data.shuffle else None,
                                                    per_document_positions=stage.per_document_attention)
        if self.start_step == 0 and spec.optimizer_from:
            load_optimizer_state(self.se.engine, spec.optimizer_from)
        self.flops_per_step = self.peak_flops = 0.0
        if p.use_gpu:  # MFU against the bf16 peak of the GPU model the stage names
            from raylong.plan import GPU_PEAK_BF16_TFLOPS, ModelShape, flops_per_token

            shape = ModelShape.from_hf_config(self.se.engine.module.config)
            self.flops_per_step = stage.tokens_per_step * flops_per_token(shape, stage.seq_len,
                                                                          stage.memory.activation_checkpointing)
            self.peak_flops = GPU_PEAK_BF16_TFLOPS[p.gpu] * 1e12 * self.world
        if self.rank == 0:
            log.info("worker credentials present (names only): %s", ", ".join(credential_names()) or "none")
            log.info("stage %s: %s seq_len=%d SP=%d x DP=%d ZeRO-%d attn=%s rope=%s tokens/step=%d steps=%d (from %d) "
                     "micro-batches/epoch=%d", stage.name, stage.kind, stage.seq_len, p.sp_size,
                     stage.data_parallel_size, p.zero_stage, self.se.attn, stage.rope.to_hf(), stage.tokens_per_step,
                     stage.optim.steps, self.start_step, len(self.loader))

    def before_step(self, step: int) -> None:
        """Called before every step; nothing in production (tests inject faults here)."""

    def train_step(self, step: int) -> dict[str, float]:
        stage, o = self.stage, self.stage.optim
        t0 = time.perf_counter()
        step_loss, learn_tokens = optimizer_step(self.se, [next(self.batches) for _ in range(o.grad_accum)])
        step_time = time.perf_counter() - t0
        metrics = {
            "train/loss": step_loss,
            "train/lr": self.se.scheduler.get_last_lr()[0],
            "train/grad_norm": float(self.se.engine.get_global_grad_norm() or 0.0),
            "train/tokens_per_s": stage.tokens_per_step / step_time,
            "train/learnable_tokens": learn_tokens,
            "train/step_time_s": step_time,
            "train/peak_mem_mib": peak_memory_mib(self.se.device),
        }
        if self.flops_per_step:
            metrics["train/mfu"] = self.flops_per_step / step_time / self.peak_flops
        if self.tracker:
            self.tracker.log_metrics(self.spec.mlflow_run_id, metrics, step)
        if self.rank == 0:
            log.info("%s step %d/%d loss %.4f %.0f tok/s %.2fs", stage.name, step + 1, o.steps, step_loss,
                     metrics["train/tokens_per_s"], step_time)
        return metrics

    def after_step(self, done: int) -> None:
        """`done` steps are finished: checkpoint, and (sweep trial) evaluate and report."""
        every, steps = self.stage.checkpoint_every, self.stage.optim.steps
        if every and done % every == 0 and done < steps:
            save_checkpoint(self.se.engine, done, {**self.metrics, **self.resume_info, "step": done}, self.rank)
        if self.spec.mode is WorkerMode.TRIAL and (done % self.spec.eval_every == 0 or done == steps):
            self.report_trial_eval(done)

    def finish_stage(self) -> None:
        import ray.train

        spec, stage = self.spec, self.stage
        state_dict = consolidated_state_dict(self.se.engine, stage.parallel.zero_stage)
        if self.rank == 0:
            save_export(self.se.engine.module, state_dict, self.tokenizer_dir, spec.export_uri)
        del state_dict
        if spec.save_optimizer_to:
            save_optimizer_state(self.se.engine, spec.save_optimizer_to, self.rank)
        if spec.eval_suite_uri is not None:  # the exported weights, evaluated by the same SP-sharded workers
            self.evaluate_and_record()
        collectives.barrier()
        ray.train.report({**self.metrics, **self.resume_info, "step": stage.optim.steps})

    def finish_trial(self) -> None:
        collectives.barrier()

    def finish_eval(self) -> None:
        import ray.train

        self.evaluate_and_record()
        collectives.barrier()
        ray.train.report({})

    # -------------------------------------------------------------------------------- helpers
    def evaluate(self) -> dict | None:
        """The stage's evaluation of the current weights by every worker (collective); the summary on rank 0."""
        from raylong.data.tokenize import load_tokenizer
        from raylong.eval.run import evaluate_in_workers

        return evaluate_in_workers(self.se, read_text(self.spec.eval_suite_uri), self.spec.heldout_uri,
                                   self.stage.eval.heldout_sequences, load_tokenizer(self.tokenizer_dir).pad_token_id)

    def evaluate_and_record(self) -> None:
        """The stage's (or the base run's) evaluation, recorded on its MLflow run and logged by rank 0."""
        from raylong.eval.run import record

        summary = self.evaluate()
        if self.rank == 0:
            record(summary, self.tracker, self.spec.mlflow_run_id)
            log.info("%s eval: %s", self.stage.name, ", ".join(
                f"{k}={v:.3f}" for k, v in summary["metrics"].items() if "_acc/" in k or "short" in k or "heldout" in k))

    def report_trial_eval(self, step: int) -> None:
        """Sweep trials: evaluate now, log to the trial's MLflow run, report to Ray Train (and so to Tune)."""
        import ray.train

        summary = self.evaluate()
        report: dict[str, object] = {"step": step}
        if self.rank == 0:
            if self.tracker:
                self.tracker.log_metrics(self.spec.mlflow_run_id, summary["metrics"], step)
            report.update(summary["metrics"], mlflow_run_id=self.spec.mlflow_run_id)
            log.info("trial eval at step %d: %s", step, ", ".join(
                f"{k}={v:.4f}" for k, v in summary["metrics"].items() if "heldout" in k or "passkey" in k))
        ray.train.report(report)


def run_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: {"spec": WorkerSpec, "worker_cls": a StageWorker class or None}."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*|raylong.*")
    spec: WorkerSpec = config["spec"]
    os.environ.update(spec.credentials)  # object store / MLflow credentials of the driver, before any client
    (config.get("worker_cls") or StageWorker)(spec).run()
