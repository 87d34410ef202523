"""DeepSpeed configuration and engine for one stage: ZeRO stage, precision, SP degree, optimizer, LR."""

from __future__ import annotations

import math
from typing import Any

import torch

from raylong.config import OptimConfig, StageConfig


def deepspeed_config(stage: StageConfig) -> dict[str, Any]:
    """The DeepSpeed config dict (pure): ZeRO, bf16 on GPU / fp32 on CPU, SP degree, clipping."""
    p, o = stage.parallel, stage.optim
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    mem = stage.memory
    if mem.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": p.use_gpu}
    if mem.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": p.use_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "sequence_parallel_size": p.sp_size,
        "zero_allow_untested_optimizer": True,  # a torch optimizer passed in (AdamW; SGD in tests)
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW under offload on CPU stages (see uses_cpu_adam)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.use_gpu:
        # bf16 weights and activations; gradients accumulated over micro-batches and reduced over ranks in
        # fp32 (DeepSpeed: BF16_Optimizer for ZeRO-1, the ZeRO-2/3 optimizers' gradient_accumulation_dtype;
        # with SP > 1 the gradient reductions use seq_parallel_communication_data_type)
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
        cfg["seq_parallel_communication_data_type"] = "fp32"
    return cfg


def lr_lambda(o: OptimConfig):
    """Linear warmup, then cosine to `min_lr_ratio` (or constant): a multiplier of o.lr per step."""

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        span = max(1, o.steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of the blocks and the output head only: not on norms and biases
    (1-D) nor on the input embeddings, whose rows only some tokens update."""
    decay, no_decay = [], []
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def uses_cpu_adam(stage: StageConfig) -> bool:
    """DeepSpeedCPUAdam steps the offloaded optimizer on GPU stages (an 8B model's AdamW step in torch on
    the CPU takes seconds); CPU stages keep torch AdamW (nothing to build) unless memory.cpu_adam says."""
    mem = stage.memory
    return mem.offload_optimizer and (mem.cpu_adam if mem.cpu_adam is not None else stage.parallel.use_gpu)


def build_engine(model: torch.nn.Module, stage: StageConfig, mpu=None, optimizer_cls=None):
    """deepspeed.initialize with AdamW (DeepSpeedCPUAdam when the optimizer is offloaded on GPU, else
    torch's) over param_groups, and the LR schedule."""
    import deepspeed

    o = stage.optim
    if optimizer_cls is None and uses_cpu_adam(stage):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, adamw_mode=True)
    elif optimizer_cls is None:
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    else:
        optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=o.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(stage), mpu=mpu
    )
    return engine, optimizer, scheduler


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (collective under ZeRO-3: every rank must call it)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()
