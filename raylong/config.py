"""Typed pipeline configuration: a recipe (YAML) is loaded into a `PipelineConfig`.

A recipe names the model to start from, the tokenizer, where results go, and an ordered list of
stages. Defaults live here, not in the code that consumes them. Errors name the field, the value and
what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylong.credentials import redact, reject_credentials


class RecipeError(ValueError):
    """A recipe that cannot run: each line names the field, the value and the rule."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ----------------------------------------------------------------------------------------- model
class RopeConfig(_Strict):
    """Rotary embedding of a stage. `type` picks the Hugging Face rope_type."""

    type: Literal["default", "yarn", "llama3"] = "default"
    theta: float = Field(500_000.0, gt=0)
    factor: float | None = Field(None, gt=0, description="yarn / llama3 scaling factor")
    original_max_position_embeddings: int | None = Field(None, gt=0)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only

    @model_validator(mode="after")
    def _needs_factor(self) -> RopeConfig:
        if self.type in ("yarn", "llama3"):
            if self.factor is None or self.original_max_position_embeddings is None:
                raise ValueError(
                    f"rope.type={self.type!r} needs rope.factor and rope.original_max_position_embeddings "
                    f"(got factor={self.factor}, original_max_position_embeddings={self.original_max_position_embeddings})"
                )
        return self

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` dict transformers (v5) reads from a model config."""
        params: dict[str, Any] = {"rope_type": self.type, "rope_theta": float(self.theta)}
        if self.type in ("yarn", "llama3"):
            params["factor"] = float(self.factor)
            params["original_max_position_embeddings"] = int(self.original_max_position_embeddings)
        if self.type == "llama3":
            params["low_freq_factor"] = self.low_freq_factor
            params["high_freq_factor"] = self.high_freq_factor
        return params


class ModelConfig(_Strict):
    """Where the chain starts: a Hugging Face directory / hub id, or a config to initialise randomly."""

    path: str | None = None
    init: dict[str, Any] | None = Field(None, description="LlamaConfig kwargs for a random initialisation")
    seed: int = 0

    @field_validator("path")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        return reject_credentials(v, "model.path")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.init is None):
            raise ValueError("model: set exactly one of model.path (pretrained) or model.init (random init config)")
        return self


class TokenizerTrainConfig(_Strict):
    """Train a byte-level BPE on local files (used when no tokenizer path exists, e.g. the tiny recipe)."""

    vocab_size: int = Field(4096, ge=300)
    files: str = Field(..., description="glob of text files to train on")
    max_files: int = Field(400, ge=1)


class TokenizerConfig(_Strict):
    path: str | None = None
    train: TokenizerTrainConfig | None = None

    @field_validator("path")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        return reject_credentials(v, "tokenizer.path")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if self.path is None and self.train is None:
            raise ValueError("tokenizer: set tokenizer.path, or tokenizer.train to build one locally")
        return self


# ------------------------------------------------------------------------------------------ data
class GenerateConfig(_Strict):
    """Synthetic long-context conversations built over real filler documents."""

    task: Literal["passkey", "kv_lookup"] = "passkey"
    num_examples: int = Field(64, ge=1)
    filler: str = Field(..., description="glob of real text files used as haystack")
    context_tokens: list[int] = Field(..., min_length=1, description="approximate filler lengths in tokens")
    seed: int = 0


class SourceConfig(_Strict):
    name: str
    path: str | None = Field(None, description="file, directory, glob or URI (file://, s3://, gs://)")
    format: Literal["text", "jsonl", "parquet"] = "jsonl"
    text_field: str = "text"
    messages_field: str = "messages"
    weight: float = Field(1.0, gt=0)
    generate: GenerateConfig | None = None

    @field_validator("path")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        return reject_credentials(v, "source path")

    @model_validator(mode="after")
    def _path_or_generate(self) -> SourceConfig:
        if (self.path is None) == (self.generate is None):
            raise ValueError(f"source {self.name!r}: set exactly one of path or generate")
        if self.generate is not None and self.format != "jsonl":
            raise ValueError(f"source {self.name!r}: generated sources are jsonl (got format={self.format!r})")
        return self


class LengthSampling(_Strict):
    """Re-sample documents by length (UltraLong: keep fewer < 4K tokens, repeat those > 8K)."""

    short_below: int = Field(4096, ge=1)
    short_keep: float = Field(1.0, ge=0, le=1, description="probability of keeping a short document")
    long_above: int = Field(8192, ge=1)
    long_repeat: float = Field(1.0, ge=1, description="expected copies of a long document (fractions: by chance)")


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(..., min_length=1)
    token_budget: int | None = Field(None, gt=0, description="tokens to pack for this stage (None: all)")
    length_sampling: LengthSampling | None = None
    separator: Literal["eos", "none"] = "eos"
    tail_policy: Literal["pad", "drop"] = "pad"
    sft_overlong: Literal["truncate", "drop"] = "drop"
    heldout_fraction: float = Field(0.05, ge=0, lt=0.5, description="packed sequences kept for evaluation")
    error_budget: float = Field(0.001, ge=0, le=1, description="fraction of bad records tolerated")
    seed: int = 0
    shuffle: bool = Field(True, description="train on the packed sequences in a permutation seeded by data.seed")
    tokenize_actors: int | None = Field(None, ge=1, description="tokenizing processes at most (None: the cluster's CPUs)")

    @model_validator(mode="after")
    def _unique_sources(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"data.sources: names must be unique (got {names})")
        return self


# ---------------------------------------------------------------------------------------- train
class OptimConfig(_Strict):
    lr: float = Field(2e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    steps: int = Field(..., ge=1)
    micro_batch_size: Literal[1] = 1
    grad_accum: int = Field(1, ge=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    carry_optimizer_state: bool = Field(False, description="start from the previous stage's optimizer state (ProLong)")

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> OptimConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"optim.warmup_steps must be smaller than optim.steps ({self.warmup_steps} >= {self.steps})")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must each be in [0, 1) (got {list(self.betas)})")
        return self


class MemoryConfig(_Strict):
    """ALST-style memory switches (each keeps the loss equal; see raylong/plan.py for what each saves)."""

    activation_checkpointing: bool = False
    offload_checkpoints: bool = Field(False, description="keep checkpointed hidden states in CPU memory")
    tiled_mlp: bool = Field(False, description="run each MLP over sequence tiles (DeepSpeed TiledMLP)")
    mlp_tile_tokens: int | None = Field(None, ge=1, description="tokens per MLP tile (default max(hidden, 1024))")
    tiled_loss: bool = Field(False, description="logits + loss in sequence chunks; never the full [seq, vocab]")
    loss_tile_tokens: int | None = Field(None, ge=1, description="tokens per loss tile (default: 256 MiB of fp32 logits)")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer states (and fp32 grads) on the CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameters on the CPU")
    cpu_adam: bool | None = Field(None, description="the offloaded optimizer steps with DeepSpeedCPUAdam (SIMD C++, "
                                  "built on first use) instead of torch AdamW; default: on GPU stages")

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> MemoryConfig:
        if self.offload_checkpoints and not self.activation_checkpointing:
            raise ValueError("memory.offload_checkpoints needs memory.activation_checkpointing: true")
        if self.cpu_adam and not self.offload_optimizer:
            raise ValueError("memory.cpu_adam steps an offloaded optimizer: it needs memory.offload_optimizer: true")
        return self


class ParallelConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    gpu: Literal["H100-80GB", "H200-141GB", "A100-80GB", "A100-40GB", "L40S-48GB"] = Field(
        "H100-80GB", description="GPU model the planner sizes for (see raylong/plan.py)")
    sp_size: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1, description="GPUs on one node of the stage's node type: an SP group larger "
                               "than that crosses the network every layer (the planner warns)")
    zero_stage: Literal[1, 2, 3] = 3
    cpus_per_worker: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _sp_divides_workers(self) -> ParallelConfig:
        if self.sp_size > self.num_workers:
            raise ValueError(
                f"parallel.sp_size={self.sp_size} needs at least that many ranks, but parallel.num_workers="
                f"{self.num_workers}: one sequence is split over sp_size workers"
            )
        if self.num_workers % self.sp_size != 0:
            raise ValueError(
                f"parallel.num_workers must be a multiple of parallel.sp_size "
                f"({self.num_workers} % {self.sp_size} != 0)"
            )
        return self


NEEDLE_TASKS = ("passkey", "multikey", "multivalue", "vartrack")  # retrieval tasks after RULER (Hsieh et al., 2024)


class EvalConfig(_Strict):
    """Evaluation run after the stage trains, by the same workers at the same SP degree."""

    @field_validator("depths")
    @classmethod
    def _depths_are_fractions(cls, v: list[float]) -> list[float]:
        if not v or not all(0.0 <= d <= 1.0 for d in v):
            raise ValueError(f"eval.depths must be fractions in [0, 1] (got {v})")
        return v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v) or not set(v) <= set(NEEDLE_TASKS):
            raise ValueError(f"eval.tasks must be distinct names from {', '.join(NEEDLE_TASKS)} (got {v})")
        return v

    enabled: bool = True
    filler: str | None = Field(None, description="glob of real text for the needle tasks' haystacks (None: no "
                                                 "retrieval tasks)")
    passkey_haystack: Literal["noise", "filler"] = Field(
        "noise", description="the single-needle passkey's haystack: the standard test's repeated sentences "
                             "(Mohtashami & Jaggi 2023; RULER niah_single_1) or the real filler")
    tasks: list[str] = Field(["passkey"], description="retrieval tasks (RULER-style): passkey, multikey, "
                                                      "multivalue, vartrack")
    lengths: list[int] | None = Field(None, description="passkey context lengths (default: 3 log-spaced <= seq_len)")
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="needle depths, fractions in [0, 1]")
    per_cell: int = Field(2, ge=1, description="passkey prompts per (length, depth)")
    heldout_sequences: int = Field(4, ge=0, description="held-out packed sequences for loss by position")
    short_len: int | None = Field(None, ge=16, description="short-context loss window (default min(256, seq_len))")
    seed: int = 0


class SweepConfig(_Strict):
    """A Ray Tune search run before the stage (`raylong sweep`): short trials from the stage's start weights,
    each judged by the stage's long-context evaluation; ASHA stops the worse half at every evaluation."""

    space: dict[str, list[float]] = Field(..., description="stage fields (dotted: rope.theta, rope.factor, "
                                                           "optim.lr, ...) -> candidate values; trials = the grid")
    steps: int = Field(4, ge=1, description="training steps per trial")
    eval_every: int = Field(2, ge=1, description="steps between evaluations (the scheduler's rungs)")
    metric: str = Field("eval/heldout_loss", pattern=r"^eval/", description="an eval metric of the stage")
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _space_and_rungs(self) -> SweepConfig:
        if not self.space or any(not v for v in self.space.values()):
            raise ValueError(f"sweep.space needs at least one field with at least one value (got {self.space})")
        if self.eval_every > self.steps:
            raise ValueError(f"sweep.eval_every must be <= sweep.steps ({self.eval_every} > {self.steps})")
        return self

    @property
    def num_trials(self) -> int:
        return math.prod(len(v) for v in self.space.values())

    @property
    def evaluations(self) -> int:
        """Evaluations a trial that runs every step reports (every eval_every steps and at the last one)."""
        return -(-self.steps // self.eval_every)


def set_dotted(d: dict, dotted: str, value: Any, create: bool = False) -> None:
    """d["a"]["b"] = value for dotted "a.b". A part that does not exist is a KeyError naming the path, or,
    with create, a new mapping (a recipe file may leave a section to its defaults)."""
    *parents, last = dotted.split(".")
    for part in parents:
        if create and part not in d:
            d[part] = {}
        if not isinstance(d.get(part), dict):
            raise KeyError(dotted)
        d = d[part]
    if last not in d and not create:
        raise KeyError(dotted)
    d[last] = value


class StageConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["pretrain", "sft"]
    seq_len: int = Field(..., ge=16)
    init_from: str | None = Field(None, description="stage to start from; default: the previous stage")
    rope: RopeConfig = RopeConfig()
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig = ParallelConfig()
    memory: MemoryConfig = MemoryConfig()
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    per_document_attention: bool = True
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig | None = None

    @model_validator(mode="after")
    def _seq_len_divisible(self) -> StageConfig:
        sp = self.parallel.sp_size
        if self.seq_len % sp != 0:
            raise ValueError(
                f"stage {self.name!r}: seq_len must be divisible by parallel.sp_size "
                f"({self.seq_len} % {sp} != 0); pick seq_len a multiple of {sp}"
            )
        if self.memory.offload_params and self.parallel.zero_stage != 3:
            raise ValueError(f"stage {self.name!r}: memory.offload_params needs parallel.zero_stage: 3")
        ev = self.eval
        if ev.enabled:
            if ev.short_len is not None and (ev.short_len > self.seq_len or ev.short_len % sp):
                raise ValueError(
                    f"stage {self.name!r}: eval.short_len must be <= seq_len and divisible by sp_size "
                    f"(short_len={ev.short_len}, seq_len={self.seq_len}, sp_size={sp})"
                )
            too_long = [n for n in ev.lengths or [] if n > self.seq_len]
            if too_long:
                raise ValueError(f"stage {self.name!r}: eval.lengths {too_long} exceed seq_len {self.seq_len}")
        if self.sweep is not None:
            self._check_sweep_candidates()
        return self

    def _check_sweep_candidates(self) -> None:
        """Every candidate of the sweep must make a valid stage: found now, not in trial 3."""
        if not self.eval.enabled:
            raise ValueError(f"stage {self.name!r}: sweep needs eval.enabled (trials are judged by the evaluation)")
        for key, values in self.sweep.space.items():
            for value in values:
                try:
                    self.trial({key: value})
                except KeyError:
                    raise ValueError(f"stage {self.name!r}: sweep.space key {key!r} is not a stage field") from None
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    raise ValueError(f"stage {self.name!r}: sweep.space {key}={value} makes an invalid stage: "
                                     f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None

    def trial(self, values: dict[str, Any]) -> StageConfig:
        """This stage with each dotted field of `values` set, as a sweep trial runs it: sweep.steps steps,
        no checkpoints, no sweep."""
        raw = self.model_dump(mode="json")
        for k, v in values.items():
            set_dotted(raw, k, v)
        raw["sweep"] = None
        if self.sweep is not None:
            raw["optim"]["steps"] = self.sweep.steps
            raw["optim"]["warmup_steps"] = min(raw["optim"]["warmup_steps"], self.sweep.steps - 1)
            raw["checkpoint_every"] = 0
        return StageConfig.model_validate(raw)

    @property
    def eval_short_len(self) -> int:
        """The short-context window: as configured, else min(256, seq_len) rounded down to the SP degree."""
        if self.eval.short_len is not None:
            return self.eval.short_len
        n = min(256, self.seq_len)
        return n - n % self.parallel.sp_size

    @property
    def data_parallel_size(self) -> int:
        return self.parallel.num_workers // self.parallel.sp_size

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.optim.micro_batch_size * self.optim.grad_accum * self.data_parallel_size


BASE_RUN = "base"  # the MLflow child run that scores the model the chain starts from


class PipelineConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = Field("./runs", description="local dir or URI for data, checkpoints, exports")
    model: ModelConfig
    tokenizer: TokenizerConfig
    stages: list[StageConfig] = Field(..., min_length=1)
    registered_model: str | None = Field(None, description="MLflow registered model for the last export "
                                                           "(default: '<name>-final')")
    evaluate_base: bool = Field(True, description="score the model the chain starts from, before the first stage, "
                                                  "with the longest stage's retrieval tasks (the 'base' run)")

    @field_validator("storage_path")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return reject_credentials(v, "storage_path")

    @field_validator("stages")
    @classmethod
    def _stages_chain(cls, stages: list[StageConfig]) -> list[StageConfig]:
        seen: list[str] = []
        for i, stage in enumerate(stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name {stage.name!r} is used twice; stage names must be unique")
            if stage.name == BASE_RUN:
                raise ValueError(f"stages[{i}].name {BASE_RUN!r} is the base model's evaluation run; name the stage "
                                 "otherwise")
            if stage.init_from is not None and stage.init_from not in seen:
                raise ValueError(
                    f"stages[{i}].init_from={stage.init_from!r} must name an earlier stage (one of {seen or 'none'})"
                )
            if stage.optim.carry_optimizer_state:
                source = stage.init_from or (stages[i - 1].name if i else None)
                if source is None:
                    raise ValueError(f"stages[{i}].optim.carry_optimizer_state: the first stage has no previous optimizer state")
                prev = next(s for s in stages if s.name == source)
                if (prev.parallel.num_workers, prev.parallel.zero_stage) != (stage.parallel.num_workers, stage.parallel.zero_stage):
                    raise ValueError(
                        f"stages[{i}].optim.carry_optimizer_state needs the same parallel.num_workers and zero_stage as "
                        f"stage {source!r} (ZeRO partitions optimizer state by rank): "
                        f"{(stage.parallel.num_workers, stage.parallel.zero_stage)} != {(prev.parallel.num_workers, prev.parallel.zero_stage)}"
                    )
            seen.append(stage.name)
        return stages

    @model_validator(mode="after")
    def _evaluation_held_out(self) -> PipelineConfig:
        """No stage trains on a retrieval task the chain evaluates: the score would measure the format
        learned, not the context extended (SFT generates kv_lookup; evaluation scores RULER-style needles)."""
        scored = {t for s in self.stages if s.eval.enabled and s.eval.filler for t in s.eval.tasks}
        for i, stage in enumerate(self.stages):
            for j, source in enumerate(stage.data.sources):
                if source.generate is not None and source.generate.task in scored:
                    raise ValueError(
                        f"stages[{i}].data.sources[{j}].generate.task {source.generate.task!r} is a task the chain "
                        f"evaluates (eval.tasks); the evaluation would score the format trained on: generate "
                        f"another task (kv_lookup) or evaluate others")
        return self

    @model_validator(mode="after")
    def _heads_divisible(self) -> PipelineConfig:
        if self.model.init is not None:
            check_heads_divisible(self, self.model.init.get("num_attention_heads", 32))
        return self

    def init_stage_of(self, index: int) -> str | None:
        """Name of the stage whose export stage `index` starts from (None: the base model)."""
        stage = self.stages[index]
        if stage.init_from is not None:
            return stage.init_from
        return self.stages[index - 1].name if index > 0 else None

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r} (stages: {[s.name for s in self.stages]})")


def check_heads_divisible(cfg: PipelineConfig, num_attention_heads: int) -> None:
    """Ulysses splits attention heads across the SP group: heads % sp_size must be 0."""
    for i, stage in enumerate(cfg.stages):
        sp = stage.parallel.sp_size
        if num_attention_heads % sp != 0:
            raise ValueError(
                f"stages[{i}] ({stage.name}): the model's num_attention_heads must be divisible by "
                f"parallel.sp_size ({num_attention_heads} % {sp} != 0); use an sp_size dividing {num_attention_heads}"
            )


# --------------------------------------------------------------------------------------- loading
def expand_path(path: str) -> str:
    """Expand ${PYTHON_STDLIB}, other ${ENV} variables and ~ in a recipe path."""
    env = dict(os.environ)
    env.setdefault("PYTHON_STDLIB", sysconfig.get_paths()["stdlib"])
    out = path
    for key, value in env.items():
        out = out.replace("${" + key + "}", value)
    return os.path.expanduser(out)


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: `field.path: message (got value)`."""
    lines = [f"recipe {source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if isinstance(got, str):
            got = redact(got)  # a credential put in a URI is not echoed back
        shown = "" if isinstance(got, (dict, list)) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {loc or '<top level>'}: {msg}{shown}")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML recipe into a validated PipelineConfig (top-level `overrides` applied first).
    Raises RecipeError naming every bad field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.update(overrides or {})
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(str(path), err)) from None


def config_hash(obj: BaseModel | dict) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict into dotted keys (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out
