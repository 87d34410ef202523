"""One stage's DeepSpeed engine on a worker and its micro-step.

Setup: model with the stage's RoPE and attention -> memory switches -> Ulysses SP registration ->
DeepSpeed engine. Optimizer step: the step's learnable tokens counted over all its micro-batches and
ranks, then per micro-batch: (SP-sharded) batch -> forward -> loss summed over the SP group, weighted by
the step's token count -> backward -> step (DeepSpeed applies the optimizer at the accumulation boundary).
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass

import torch

from raylong.config import StageConfig
from raylong.train import collectives
from raylong.train.attention import attention_for, reset_sequence_parallel
from raylong.train.batches import shard_loader
from raylong.train.engine import build_engine
from raylong.train.loss import IGNORE, group_sum, loss_sum_and_count, shift_labels, sp_gradient_scale, token_weighted_loss
from raylong.train.memory import enable_tiled_mlp, tiled_loss_objective
from raylong.train.model import load_model


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

    @property
    def sp_size(self) -> int:
        return self.stage.parallel.sp_size

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: the world's ranks over the SP degree."""
        return collectives.world_size() // self.sp_size

    def shard(self, loader):
        """The loader's sequences as this rank's SP shards (the loader itself at SP=1)."""
        return shard_loader(loader, self.sp_rank, self.sp_group, self.sp_size, self.device)


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
    engine.train()  # from_pretrained returns eval mode, in which transformers skips activation checkpointing
    sp_group = mpu.get_sequence_parallel_group() if mpu else None
    sp_rank = mpu.get_sequence_parallel_rank() if mpu else 0
    return StageEngine(stage, engine, scheduler, attn, device, sp_group, sp_rank,
                       sp_gradient_scale(p.sp_size, p.zero_stage))


def targets_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets of a (sharded) batch: Ulysses' shift_labels when SP sharded it, else shifted here."""
    return batch["shift_labels"] if "shift_labels" in batch else shift_labels(batch["labels"])


def step_tokens(se: StageEngine, batches: list[dict[str, torch.Tensor]]) -> int:
    """Learnable tokens of one optimizer step: every micro-batch on every rank (collective). A sequence's
    tokens are split over its SP shards, so the world sum counts each once."""
    return int(collectives.reduce_number(sum(int((targets_of(b) != IGNORE).sum()) for b in batches), se.device))


def optimizer_step(se: StageEngine, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """grad_accum micro-batches -> one optimizer step whose gradient is the mean over all of the step's
    learnable tokens (every micro-batch, every DP group), whatever each sequence holds. Returns (that
    mean loss, the step's learnable tokens)."""
    total = step_tokens(se, batches)
    group_sums = sum(loss * tokens for loss, tokens in (micro_step(se, b, total) for b in batches))
    sp = se.sp_size if collectives.active() else 1  # each SP rank holds its group's sum
    return collectives.reduce_number(group_sums / sp, se.device) / max(total, 1), total


def token_weight(se: StageEngine, tokens: int, step_total: int | None) -> float:
    """Weight of a micro-batch's summed token loss: dp * grad_accum / step_total, which DeepSpeed's
    1/grad_accum and DP averaging turn into 1/step_total; None: 1/its own tokens (a per-sequence mean)."""
    if step_total is None:
        return 1 / max(tokens, 1)
    return se.dp_size * se.stage.optim.grad_accum / max(step_total, 1)


def micro_step(se: StageEngine, batch: dict[str, torch.Tensor], step_total: int | None = None) -> tuple[float, int]:
    """forward -> loss over the SP group -> backward -> step. The micro-batch's summed token loss is
    weighted by `token_weight` (`step_total`: the step's learnable tokens, `step_tokens`). Returns (this sequence's mean loss, its learnable tokens)."""
    mem = se.stage.memory
    targets = targets_of(batch).to(se.device)
    inputs = {"input_ids": batch["input_ids"].to(se.device), "position_ids": batch["position_ids"].to(se.device),
              "use_cache": False}
    offload = torch.autograd.graph.save_on_cpu(pin_memory=se.device.type == "cuda") if mem.offload_checkpoints \
        else contextlib.nullcontext()
    gas = se.stage.optim.grad_accum
    if not mem.tiled_loss:
        with offload:
            logits = se.engine(**inputs).logits
        loss_sum, count = loss_sum_and_count(logits, targets)
        group_loss_sum, tokens = token_weighted_loss(loss_sum, count, se.sp_group, per_token=False)
        se.engine.backward(group_loss_sum * token_weight(se, tokens, step_total) * se.grad_scale)
        se.engine.step()
        return group_loss_sum.item() / max(tokens, 1), tokens
    with offload, last_hidden_state(se.engine.module) as captured:
        se.engine(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long))  # through the engine: ZeRO-3 hooks
    hidden = captured[0]
    tokens = group_sum((targets != IGNORE).sum(), se.sp_group)
    # the gradient the SP-summed loss formulation gives each SP rank (sp x), without DeepSpeed's 1/gas
    factor = se.sp_size * se.grad_scale * token_weight(se, tokens, step_total) / gas
    objective = tiled_loss_objective(se.engine.module.lm_head, hidden, targets, factor, mem.loss_tile_tokens)
    se.engine.backward(objective, scale_wrt_gas=False)
    se.engine.step()
    group_loss_sum = group_sum(objective.detach(), se.sp_group, as_float=True) / factor
    return group_loss_sum / max(tokens, 1), tokens


@contextlib.contextmanager
def last_hidden_state(model):
    """Capture the decoder's final hidden state (the output of its last norm) during a forward. Asking the
    model for output_hidden_states instead would keep every layer's output alive until the forward ends,
    on the GPU even when activation checkpoints are offloaded."""
    captured: list[torch.Tensor] = []
    handle = model.get_decoder().norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
