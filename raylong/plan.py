"""Memory planner: will a stage fit its GPUs, what is the smallest SP degree that does, how long is a step.

Per-GPU memory = static + local tokens x bytes per local token, with local tokens = seq_len / sp_size
(Ulysses shards the sequence). Every term is a count of tensors of a Llama decoder, in bf16:

static
  weights        2P / N           (ZeRO-3 shards over all N GPUs; 0 with offload_params)
  gradients      4P / N           fp32 accumulation (0 with offload_optimizer: ZeRO-Offload keeps them on the CPU)
  optimizer     12P / N           (fp32 master + Adam m, v; 0 with offload_optimizer)
  working set   2 layers gathered by ZeRO-3 prefetch + the embedding/lm_head (2 B/param)
  runtime       CUDA context and allocator slack (3 GB); 1 GB more for the tiled loss chunk
per local token
  checkpoints   layers x hidden x 2 B (2 layers in flight when offloaded to CPU)
  recompute     one layer's saved tensors (9h + 3 kv + 4 intermediate) x 2 B x 1.5 for backward
                transients; TiledMLP removes the 4 x intermediate (MLP) part
  all-to-all    Ulysses q/k/v before and after the exchange: 2 x (h + 2 kv) x 2 B (SP > 1 only)
  logits+loss   vocab x 10 B (bf16 logits, fp32 upcast, fp32 grad); 0 with tiled logits+loss
  no checkpointing: every layer keeps its saved tensors (layers x recompute)

Checked against ALST's published maxima (tests/test_plan.py; docs/plan.md), within 25%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raylong.config import MemoryConfig, PipelineConfig, StageConfig

GB = 1e9
GPU_MEMORY_GB = {"H100-80GB": 80.0, "H200-141GB": 141.0, "A100-80GB": 80.0, "A100-40GB": 40.0, "L40S-48GB": 48.0}
GPU_PEAK_BF16_TFLOPS = {"H100-80GB": 989.0, "H200-141GB": 989.0, "A100-80GB": 312.0, "A100-40GB": 312.0, "L40S-48GB": 362.0}
RUNTIME_GB = 3.0
TILED_LOSS_CHUNK_GB = 1.0


@dataclass(frozen=True)
class ModelShape:
    params: float
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> float:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i

    @classmethod
    def from_hf_config(cls, c) -> ModelShape:
        h, layers, vocab, inter = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
        heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
        kv_dim = h // heads * kv
        per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter
        embeds = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
        return cls(layers * per_layer + embeds, h, inter, layers, heads, kv, vocab)


LLAMA_31_8B = ModelShape(params=8.03e9, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
KNOWN_MODELS = {"meta-llama/Llama-3.1-8B": LLAMA_31_8B, "meta-llama/Llama-3.1-8B-Instruct": LLAMA_31_8B}


@dataclass
class Plan:
    stage: str
    gpu: str
    num_gpus: int
    sp_size: int
    seq_len: int
    breakdown_gb: dict[str, float] = field(default_factory=dict)
    capacity_gb: float = 0.0
    min_sp_that_fits: int | None = None
    step_time_s: float = 0.0
    mfu: float = 0.4

    @property
    def total_gb(self) -> float:
        return sum(self.breakdown_gb.values())

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.capacity_gb


def static_bytes(m: ModelShape, num_gpus: int, mem: MemoryConfig) -> dict[str, float]:
    p = m.params
    return {
        "weights": 0.0 if mem.offload_params else 2 * p / num_gpus,
        "gradients": 0.0 if mem.offload_optimizer else 4 * p / num_gpus,  # accumulated in fp32
        "optimizer": 0.0 if mem.offload_optimizer else 12 * p / num_gpus,
        "zero3_working_set": 2 * (2 * m.layer_params + m.vocab * m.hidden),
        "runtime": (RUNTIME_GB + (TILED_LOSS_CHUNK_GB if mem.tiled_loss else 0.0)) * GB,
    }


def bytes_per_local_token(m: ModelShape, sp_size: int, mem: MemoryConfig, dtype_bytes: int = 2) -> dict[str, float]:
    """Per local token, by component; activations in `dtype_bytes` (2: bf16 on GPU; 4: the fp32 CPU runs
    that bench/plan_vs_measured.py compares with), the loss's upcast and gradient in fp32."""
    h, kv, i, b = m.hidden, m.kv_dim, m.intermediate, dtype_bytes
    attn_part, mlp_part = 9 * h + 3 * kv, 4 * i
    layer_saved = b * (attn_part + (0 if mem.tiled_mlp else mlp_part))
    out = {}
    if mem.activation_checkpointing:
        out["checkpoints"] = (2 if mem.offload_checkpoints else m.layers) * h * b
        out["recompute"] = 1.5 * layer_saved
    else:
        out["activations"] = m.layers * layer_saved
    out["all_to_all"] = 2 * (h + 2 * kv) * b if sp_size > 1 else 0.0
    out["logits_loss"] = 0.0 if mem.tiled_loss else (b + 8) * m.vocab
    return out


def plan_memory(m: ModelShape, seq_len: int, num_gpus: int, sp_size: int, mem: MemoryConfig, gpu: str) -> dict[str, float]:
    """Per-GPU bytes by component (GB)."""
    local = seq_len / sp_size
    out = {k: v / GB for k, v in static_bytes(m, num_gpus, mem).items()}
    out.update({k: local * v / GB for k, v in bytes_per_local_token(m, sp_size, mem).items()})
    return out


def max_tokens(m: ModelShape, num_gpus: int, sp_size: int, mem: MemoryConfig, gpu: str,
               capacity_gb: float | None = None) -> int:
    """Longest sequence (all SP ranks together) that fits, by the same model."""
    capacity = (capacity_gb or GPU_MEMORY_GB[gpu]) * GB
    static = sum(static_bytes(m, num_gpus, mem).values())
    per_token = sum(bytes_per_local_token(m, sp_size, mem).values())
    return max(0, int((capacity - static) / per_token * sp_size))


def flops_per_token(m: ModelShape, seq_len: int, recompute: bool) -> float:
    """Training FLOPs per token: 6P dense (+2P recompute) and causal attention 6 * layers * hidden * seq."""
    dense = (8 if recompute else 6) * m.params
    attention = (4 if recompute else 3) * 2 * m.layers * m.hidden * seq_len
    return dense + attention


def stage_model_shape(cfg: PipelineConfig) -> ModelShape:
    if cfg.model.path in KNOWN_MODELS:
        return KNOWN_MODELS[cfg.model.path]
    if cfg.model.init is not None:
        from transformers import LlamaConfig

        return ModelShape.from_hf_config(LlamaConfig(**cfg.model.init))
    from transformers import AutoConfig

    if "://" in cfg.model.path:  # an object-store directory: transformers would take the URI for a hub id
        import json

        from raylong.storage import read_text

        text = read_text(f"{cfg.model.path.rstrip('/')}/config.json")
        if text is None:
            raise FileNotFoundError(f"model.path: no config.json at {cfg.model.path}")
        fields = json.loads(text)
        return ModelShape.from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(cfg.model.path))


def plan_stage(m: ModelShape, stage: StageConfig, mfu: float = 0.4) -> Plan:
    p, mem = stage.parallel, stage.memory
    capacity = GPU_MEMORY_GB[p.gpu]
    plan = Plan(stage.name, p.gpu, p.num_workers, p.sp_size, stage.seq_len,
                plan_memory(m, stage.seq_len, p.num_workers, p.sp_size, mem, p.gpu), capacity, mfu=mfu)
    for sp in _sp_candidates(m, p.num_workers, stage.seq_len):
        if sum(plan_memory(m, stage.seq_len, p.num_workers, sp, mem, p.gpu).values()) <= capacity:
            plan.min_sp_that_fits = sp
            break
    flops = stage.tokens_per_step * flops_per_token(m, stage.seq_len, mem.activation_checkpointing)
    plan.step_time_s = flops / (p.num_workers * GPU_PEAK_BF16_TFLOPS[p.gpu] * 1e12 * mfu)
    return plan


def _sp_candidates(m: ModelShape, num_gpus: int, seq_len: int) -> list[int]:
    return [sp for sp in range(1, num_gpus + 1)
            if num_gpus % sp == 0 and m.heads % sp == 0 and seq_len % sp == 0]


def fix_advice(m: ModelShape, stage: StageConfig, plan: Plan) -> str:
    """What to change so the stage fits: a larger SP degree, a memory switch, more GPUs."""
    mem = stage.memory
    tips = []
    if plan.min_sp_that_fits is not None and plan.min_sp_that_fits != plan.sp_size:
        tips.append(f"set parallel.sp_size: {plan.min_sp_that_fits}")
    for switch in ("tiled_loss", "tiled_mlp", "offload_checkpoints", "offload_optimizer", "activation_checkpointing"):
        if not getattr(mem, switch):
            trial = mem.model_copy(update={switch: True})
            if sum(plan_memory(m, stage.seq_len, plan.num_gpus, plan.sp_size, trial, plan.gpu).values()) <= plan.capacity_gb:
                tips.append(f"turn on memory.{switch}")
    if not tips:
        per_gpu_tokens = max_tokens(m, plan.num_gpus, plan.sp_size, mem, plan.gpu) / max(1, plan.sp_size)
        need = math.ceil(stage.seq_len / max(1.0, per_gpu_tokens))
        tips.append(f"use more GPUs: about {need} per sequence (parallel.num_workers and sp_size)")
    return "; or ".join(tips)


class PlanError(ValueError):
    pass


def check_pipeline_fits(cfg: PipelineConfig) -> list[Plan]:
    """Raise PlanError for the first GPU stage that does not fit, naming the fix."""
    m = stage_model_shape(cfg)
    plans = []
    for i, stage in enumerate(cfg.stages):
        if not stage.parallel.use_gpu:
            continue
        plan = plan_stage(m, stage)
        plans.append(plan)
        if not plan.fits:
            raise PlanError(
                f"stages[{i}].parallel: stage {stage.name!r} does not fit: {plan.total_gb:.1f} GB per GPU needed, {plan.capacity_gb:.0f} GB "
                f"on {plan.gpu} ({stage.seq_len} tokens, SP={plan.sp_size}, {plan.num_gpus} GPUs). "
                f"Fix: {fix_advice(m, stage, plan)}. Run `raylong plan` for the breakdown, or pass --ignore-plan."
            )
    return plans


def sp_span_warnings(cfg: PipelineConfig) -> list[str]:
    """GPU stages whose SP group is larger than a node: Ulysses' all-to-all (every layer, forward and
    backward) then crosses the network instead of NVLink. Allowed, but worth knowing."""
    out = []
    for stage in cfg.stages:
        p = stage.parallel
        if p.use_gpu and p.sp_size > p.gpus_per_node:
            out.append(f"stage {stage.name!r}: an SP group of {p.sp_size} GPUs spans {math.ceil(p.sp_size / p.gpus_per_node)} "
                       f"nodes of {p.gpus_per_node} (parallel.gpus_per_node): every layer's all-to-all crosses the "
                       f"network; SP {p.gpus_per_node} with more DP keeps it inside a node if memory allows "
                       f"(`raylong plan` gives the smallest SP that fits)")
    return out


def format_plans(cfg: PipelineConfig, mfu: float = 0.4) -> str:
    m = stage_model_shape(cfg)
    lines = [f"model: {m.params / 1e9:.2f}B params, {m.layers} layers, hidden {m.hidden}, vocab {m.vocab}; "
             f"step time at MFU {mfu:.0%} of bf16 peak"]
    for stage in cfg.stages:
        p = stage.parallel
        if not p.use_gpu:
            lines.append(f"{stage.name}: CPU stage (not planned)")
            continue
        plan = plan_stage(m, stage, mfu)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in plan.breakdown_gb.items() if v >= 0.05)
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(
            f"{stage.name}: {stage.seq_len} tokens on {p.num_workers}x{p.gpu} (SP {p.sp_size} x DP "
            f"{stage.data_parallel_size}): {plan.total_gb:.1f} / {plan.capacity_gb:.0f} GB per GPU -> {verdict}; "
            f"smallest SP that fits: {plan.min_sp_that_fits or 'none'}; step ~{plan.step_time_s:.0f}s "
            f"({stage.tokens_per_step / 1e6:.1f}M tokens), stage ~{plan.step_time_s * stage.optim.steps / 3600:.1f}h\n"
            f"    [{parts}]"
        )
        if not plan.fits:
            lines.append(f"    fix: {fix_advice(m, stage, plan)}")
    lines += [f"warning: {w}" for w in sp_span_warnings(cfg)]
    return "\n".join(lines)
