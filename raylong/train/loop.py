"""The training loop each Ray Train worker runs for one stage.

Setup: model with the stage's RoPE -> Ulysses SP registration -> DeepSpeed engine -> data -> resume.
Step:  batch -> (SP shard) -> forward -> token-weighted loss -> backward -> step -> report.
End:   consolidated Hugging Face export, evaluation of it by the same workers, barrier.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from raylong.config import StageConfig
from raylong.storage import download_dir, fs_path
from raylong.train.attention import attention_for, reset_sequence_parallel
from raylong.train.checkpoints import MANIFEST, restore_checkpoint, save_checkpoint
from raylong.train.engine import build_engine, consolidated_state_dict
from raylong.train.loss import IGNORE, group_sum, loss_sum_and_count, shift_labels, sp_gradient_scale, token_weighted_loss
from raylong.train.memory import enable_tiled_mlp, tiled_loss_objective
from raylong.train.model import load_model, save_export


@dataclass
class StageRun:
    """Everything a worker needs to train one stage (sent as train_loop_config)."""

    stage: dict
    init_dir: str
    tokenizer_dir: str
    train_path: str
    export_dir: str
    mlflow_run_id: str | None = None
    fail_at_step: int | None = None  # fault injection for resume tests: rank 1 is SIGKILLed once at this step
    eval_suite: str | None = None  # path of the EvalSuite JSON the driver built; None: no evaluation
    heldout_path: str | None = None
    save_optimizer_to: str | None = None  # a later stage carries this stage's optimizer state
    optimizer_from: str | None = None  # this stage starts from that saved optimizer state
    credentials: dict[str, str] = field(default_factory=dict, repr=False)  # set by launch; never logged
    eval_every: int | None = None  # sweep trials: evaluate and report every N steps; no export


# ------------------------------------------------------------------------------------------ data
class SequenceLoader:
    """The packed sequences of this rank: rows rank, rank+world, ... of the Parquet file, the same
    count on every rank (SP ranks must run the same number of micro-steps or they hang). The first
    pass starts at `start` (a resumed stage continues where the data order left off)."""

    def __init__(self, path: str, rank: int, world: int, start: int = 0):
        fs, local = fs_path(path)
        self.file = pq.ParquetFile(fs.open_input_file(local))
        total = self.file.metadata.num_rows
        self.per_rank = total // world
        if self.per_rank == 0:
            raise ValueError(f"{path} has {total} sequences, fewer than the {world} workers")
        self.rank, self.world = rank, world
        self.start = start % self.per_rank

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip, self.start = self.start, 0  # only the first pass is offset
        index, emitted = 0, 0
        for g in range(self.file.num_row_groups):
            table = self.file.read_row_group(g)
            for row in range(table.num_rows):
                if index % self.world == self.rank and emitted < self.per_rank:
                    emitted += 1
                    if emitted > skip:
                        yield {
                            k: torch.from_numpy(np.asarray(table[k][row].as_py(), dtype=np.int64)).unsqueeze(0)
                            for k in ("input_ids", "position_ids", "labels")
                        }
                index += 1


def resumed_batches(se: "StageEngine", path: str, rank: int, world: int, micro_steps_done: int):
    """Micro-batches in the same order an uninterrupted run sees them, after `micro_steps_done`.
    At SP > 1 each loader row feeds sp micro-steps (Ulysses' adapter gathers one row per SP rank)."""
    sp = se.stage.parallel.sp_size
    loader = shard_loader(se, SequenceLoader(path, rank, world, start=micro_steps_done // sp))
    batches = forever(loader)
    for _ in range(micro_steps_done % sp):
        next(batches)
    return loader, batches


def forever(loader) -> Iterator[dict]:
    """Cycle through the loader epoch after epoch (the Ulysses adapter raises StopIteration per epoch)."""
    while True:
        yield from loader


# ------------------------------------------------------------------------------------ reporting
class MetricsSink:
    """Rank 0 writes per-step metrics straight to the stage's MLflow run."""

    def __init__(self, run_id: str | None, rank: int):
        self.client = None
        if run_id and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------- optimizer carry
OPTIMIZER_TAG = "final"


def save_optimizer_state(engine, uri: str, rank: int) -> None:
    """The final DeepSpeed state (optimizer included) for a later stage to carry; collective."""
    from raylong.storage import upload_dir, write_text

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=OPTIMIZER_TAG)
        upload_dir(d, uri)  # every rank adds its own shard files
    dist.barrier()
    if rank == 0:
        write_text(f"{uri}/{MANIFEST}", json.dumps({"tag": OPTIMIZER_TAG, "world_size": dist.get_world_size()}))
    dist.barrier()


def load_optimizer_state(engine, uri: str) -> None:
    """Optimizer moments from the previous stage; a fresh LR schedule for this one."""
    from raylong.storage import download_dir, read_text

    if read_text(f"{uri}/{MANIFEST}") is None:
        raise RuntimeError(f"no complete optimizer state at {uri} to carry over")
    local = download_dir(uri, tempfile.mkdtemp(prefix="raylong-optim-"))
    engine.load_checkpoint(local, tag=OPTIMIZER_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)


# ------------------------------------------------------------------------------------------ setup
@dataclass
class StageEngine:
    """What a worker holds while training a stage."""

    stage: StageConfig
    engine: object  # deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LRScheduler
    attn: str
    device: torch.device
    sp_group: object | None  # torch ProcessGroup of this rank's SP peers (None at SP=1)
    sp_rank: int
    grad_scale: float


def build_stage_engine(stage: StageConfig, init_dir: str, optimizer_cls=None) -> StageEngine:
    """Model with the stage's RoPE and attention -> Ulysses registration -> DeepSpeed engine."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    p = stage.parallel
    deepspeed.init_distributed(dist_backend="nccl" if p.use_gpu else "gloo")  # reuses an existing group
    device = torch.device("cuda", torch.cuda.current_device()) if p.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if p.use_gpu else torch.float32
    attn = attention_for(stage.per_document_attention, p.use_gpu)
    model = load_model(init_dir, stage, attn, dtype)
    if stage.memory.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.memory.tiled_mlp:
        enable_tiled_mlp(model, stage.memory.mlp_tile_tokens)
    reset_sequence_parallel()
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=p.sp_size,
        micro_batch_size=stage.optim.micro_batch_size, seq_length=stage.seq_len, seq_length_is_variable=True,
    )
    engine, _, scheduler = build_engine(model, stage, mpu, optimizer_cls)
    sp_group = mpu.get_sequence_parallel_group() if mpu else None
    sp_rank = mpu.get_sequence_parallel_rank() if mpu else 0
    return StageEngine(stage, engine, scheduler, attn, device, sp_group, sp_rank,
                       sp_gradient_scale(p.sp_size, p.zero_stage))


def shard_loader(se: StageEngine, loader):
    """At SP > 1, Ulysses' adapter shards each sequence across the SP group (and adds shift_labels)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    if se.sp_group is None:
        return loader
    return UlyssesSPDataLoaderAdapter(loader, se.sp_rank, se.sp_group, se.stage.parallel.sp_size, se.device)


def micro_step(se: StageEngine, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """forward -> token-weighted loss over the SP group -> backward -> step (DeepSpeed applies the
    optimizer at the accumulation boundary). Returns (loss, learnable tokens of the whole sequence)."""
    mem = se.stage.memory
    targets = (batch["shift_labels"] if "shift_labels" in batch else shift_labels(batch["labels"])).to(se.device)
    inputs = {"input_ids": batch["input_ids"].to(se.device), "position_ids": batch["position_ids"].to(se.device),
              "use_cache": False}
    offload = torch.autograd.graph.save_on_cpu(pin_memory=se.device.type == "cuda") if mem.offload_checkpoints \
        else contextlib.nullcontext()
    if not mem.tiled_loss:
        with offload:
            logits = se.engine(**inputs).logits
        loss_sum, count = loss_sum_and_count(logits, targets)
        loss, tokens = token_weighted_loss(loss_sum, count, se.sp_group)
        se.engine.backward(loss * se.grad_scale)
        se.engine.step()
        return loss.item(), tokens
    with offload:
        out = se.engine(**inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
    hidden = out.hidden_states[-1]
    del out  # drop the per-layer hidden states (with offload their CPU copies are what backward uses)
    tokens = group_sum((targets != IGNORE).sum(), se.sp_group)
    sp, gas = se.stage.parallel.sp_size, se.stage.optim.grad_accum
    # the gradient the differentiable all_gather formulation gives each SP rank: sp / tokens per token loss
    factor = sp * se.grad_scale / max(tokens, 1) / gas
    objective = tiled_loss_objective(se.engine.module.lm_head, hidden, targets, factor, mem.loss_tile_tokens)
    se.engine.backward(objective, scale_wrt_gas=False)
    se.engine.step()
    loss = group_sum(objective.detach(), se.sp_group, as_float=True) * gas / (sp * se.grad_scale)
    return loss, tokens


# ------------------------------------------------------------------------------------------ main
def train_stage(config: dict) -> None:
    """Ray Train worker entry point."""
    import ray.train

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*|raylong.*")
    run = StageRun(**config)
    os.environ.update(run.credentials)  # object store / MLflow credentials of the driver, before any client
    stage = StageConfig.model_validate(run.stage)
    o, p = stage.optim, stage.parallel
    scratch = tempfile.mkdtemp(prefix="raylong-")
    init_dir = download_dir(run.init_dir, f"{scratch}/init")  # no-op for local storage
    tokenizer_dir = download_dir(run.tokenizer_dir, f"{scratch}/tokenizer")

    se = build_stage_engine(stage, init_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    sink = MetricsSink(run.mlflow_run_id, rank)
    start_step, skipped = restore_checkpoint(se.engine, rank)
    loader, batches = resumed_batches(se, run.train_path, rank, world, start_step * o.grad_accum)
    resume_info = {"resumed_from_step": start_step, "skipped_checkpoints": "\n".join(skipped)}
    if start_step == 0 and run.optimizer_from:
        load_optimizer_state(se.engine, run.optimizer_from)
    if rank == 0:
        from raylong.train.launch import credential_names

        print(f"[raylong] worker credentials present (names only): {', '.join(credential_names()) or 'none'}", flush=True)
        print(
            f"[raylong] stage {stage.name}: {stage.kind} seq_len={stage.seq_len} SP={p.sp_size} x DP={stage.data_parallel_size} "
            f"ZeRO-{p.zero_stage} attn={se.attn} rope={stage.rope.to_hf()} tokens/step={stage.tokens_per_step} "
            f"steps={o.steps} (from {start_step}) micro-batches/epoch={len(loader)}",
            flush=True,
        )

    flops_per_step = 0.0
    if p.use_gpu:  # MFU against the bf16 peak of the GPU model the stage names
        from raylong.plan import GPU_PEAK_BF16_TFLOPS, ModelShape, flops_per_token

        shape = ModelShape.from_hf_config(se.engine.module.config)
        flops_per_step = stage.tokens_per_step * flops_per_token(shape, stage.seq_len, stage.memory.activation_checkpointing)
        peak_flops = GPU_PEAK_BF16_TFLOPS[p.gpu] * 1e12 * world
    se.engine.train()
    metrics: dict[str, float] = {}
    for step in range(start_step, o.steps):
        if run.fail_at_step == step and rank == 1 and start_step == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # injected worker loss (tests): only in an attempt that did not resume
        t0 = time.perf_counter()
        step_loss, learn_tokens = 0.0, 0
        for _ in range(o.grad_accum):
            loss, tokens = micro_step(se, next(batches))
            step_loss += loss / o.grad_accum
            learn_tokens += tokens
        step_time = time.perf_counter() - t0
        metrics = {
            "train/loss": step_loss,
            "train/lr": se.scheduler.get_last_lr()[0],
            "train/grad_norm": float(se.engine.get_global_grad_norm() or 0.0),
            "train/tokens_per_s": stage.tokens_per_step / step_time,
            "train/learnable_tokens": learn_tokens,
            "train/step_time_s": step_time,
            "train/peak_mem_mib": peak_memory_mib(se.device),
        }
        if flops_per_step:
            metrics["train/mfu"] = flops_per_step / step_time / peak_flops
        sink.log(metrics, step)
        if rank == 0:
            print(f"[raylong] {stage.name} step {step + 1}/{o.steps} loss {step_loss:.4f} "
                  f"{metrics['train/tokens_per_s']:.0f} tok/s {step_time:.2f}s", flush=True)
        done = step + 1
        if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < o.steps:
            save_checkpoint(se.engine, done, {**metrics, **resume_info, "step": done}, rank)
        if run.eval_every and (done % run.eval_every == 0 or done == o.steps):
            report_trial_eval(se, run, tokenizer_dir, sink, done, rank)

    if run.eval_every:  # a sweep trial: judged by its evaluations, nothing to export
        dist.barrier()
        return
    state_dict = consolidated_state_dict(se.engine, p.zero_stage)
    if rank == 0:
        save_export(se.engine.module, state_dict, tokenizer_dir, run.export_dir)
    del state_dict
    if run.save_optimizer_to:
        save_optimizer_state(se.engine, run.save_optimizer_to, rank)
    if run.eval_suite is not None:  # the exported weights, evaluated by the same SP-sharded workers
        from raylong.eval.run import record

        summary = evaluate(se, run, tokenizer_dir)
        if rank == 0:
            record(summary, run.mlflow_run_id)
            print(f"[raylong] {stage.name} eval: " + ", ".join(f"{k}={v:.3f}" for k, v in summary["metrics"].items()
                                                               if "passkey" in k or "short" in k or "heldout" in k), flush=True)
    dist.barrier()
    ray.train.report({**metrics, **resume_info, "step": o.steps})


def evaluate(se: StageEngine, run: StageRun, tokenizer_dir: str) -> dict | None:
    """The stage's evaluation of the current weights by every worker (collective); the summary on rank 0."""
    from raylong.data.tokenize import load_tokenizer
    from raylong.eval.run import evaluate_in_workers
    from raylong.storage import read_text

    return evaluate_in_workers(se, read_text(run.eval_suite), run.heldout_path, se.stage.eval.heldout_sequences,
                               load_tokenizer(tokenizer_dir).pad_token_id)


def report_trial_eval(se: StageEngine, run: StageRun, tokenizer_dir: str, sink: MetricsSink, step: int, rank: int) -> None:
    """Sweep trials: evaluate now, log to the trial's MLflow run, report to Ray Train (and so to Tune)."""
    import ray.train

    summary = evaluate(se, run, tokenizer_dir)
    report = {"step": step}
    if rank == 0:
        sink.log(summary["metrics"], step)
        report.update(summary["metrics"], mlflow_run_id=run.mlflow_run_id)
        print(f"[raylong] trial eval at step {step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in summary["metrics"].items() if "heldout" in k or "passkey" in k), flush=True)
    ray.train.report(report)
