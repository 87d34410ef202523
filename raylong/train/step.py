"""One stage's DeepSpeed engine on a worker and its micro-step.

Setup: model with the stage's RoPE and attention -> memory switches -> Ulysses SP registration ->
DeepSpeed engine. Micro-step: (SP-sharded) batch -> forward -> token-weighted loss over the SP group ->
backward -> step (DeepSpeed applies the optimizer at the accumulation boundary).
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass

import torch

from raylong.config import StageConfig
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
    sp_group = mpu.get_sequence_parallel_group() if mpu else None
    sp_rank = mpu.get_sequence_parallel_rank() if mpu else 0
    return StageEngine(stage, engine, scheduler, attn, device, sp_group, sp_rank,
                       sp_gradient_scale(p.sp_size, p.zero_stage))


def micro_step(se: StageEngine, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """forward -> token-weighted loss over the SP group -> backward -> step. Returns (loss, learnable
    tokens of the whole sequence)."""
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
    sp, gas = se.sp_size, se.stage.optim.grad_accum
    # the gradient the SP-summed loss formulation gives each SP rank: sp / tokens per token loss
    factor = sp * se.grad_scale / max(tokens, 1) / gas
    objective = tiled_loss_objective(se.engine.module.lm_head, hidden, targets, factor, mem.loss_tile_tokens)
    se.engine.backward(objective, scale_wrt_gas=False)
    se.engine.step()
    loss = group_sum(objective.detach(), se.sp_group, as_float=True) * gas / (sp * se.grad_scale)
    return loss, tokens


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
