"""The driver's side of a stage, shared by `raylong run` (runner.py) and `raylong sweep` (sweep.py):

    PipelineContext.open    preflight -> paths -> MLflow tracker          (no Ray yet: bad input fails here)
    ctx.start               Ray -> tokenizer (trained once) -> base model (written once)
    ctx.prepare_stage       packed data (Ray Data) -> evaluation suite -> StageInputs
    ctx.worker_spec         StageInputs + start weights -> the WorkerSpec the Ray Train workers run
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from raylong.config import PipelineConfig, StageConfig, expand_path
from raylong.credentials import redact
from raylong.log import get_logger
from raylong.storage import absolute, copy_dir, download_dir, exists, is_local, read_text, upload_dir, write_text
from raylong.tracking import Tracker, default_tracking_uri
from raylong.train.spec import WorkerMode, WorkerSpec

log = get_logger(__name__)


class PipelinePaths:
    """Where one pipeline keeps its things under the storage path (URIs keep their scheme)."""

    def __init__(self, storage_path: str, pipeline_id: str):
        self.storage = absolute(storage_path)
        self.root = f"{self.storage}/{pipeline_id}"
        self.tokenizer = f"{self.root}/assets/tokenizer"
        self.base_model = f"{self.root}/assets/base_model"
        self.data = f"{self.root}/data"
        self.train = f"{self.root}/train"
        self.mlflow_artifacts = f"{self.storage}/mlartifacts"

    def export(self, stage: str) -> str:
        return f"{self.root}/stages/{stage}/export"

    def optimizer_state(self, stage: str) -> str:
        return f"{self.root}/stages/{stage}/optimizer"

    def eval_suite(self, stage: str) -> str:
        return f"{self.root}/eval/{stage}.json"


@dataclass
class StageInputs:
    """What the driver prepared for a stage before any training worker starts."""

    train_uri: str
    heldout_uri: str
    train_sequences: int
    eval_suite_uri: str | None  # None: the stage is not evaluated
    data_report: dict
    data_directory: str
    data_cached: bool
    prefetched: bool = False  # prepared in the background while the previous stage trained


def ensure_ray() -> None:
    """Join the cluster of a `ray job submit` (RAY_ADDRESS), else start a local one bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # GCS, raylet, workers on 127.0.0.1
    # the dashboard serves the State API, which Ray Train's placement-group cleaner needs to free the
    # resources of a run whose controller was killed (a sweep trial stopped early)
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


@dataclass
class PipelineContext:
    cfg: PipelineConfig
    pipeline_id: str
    paths: PipelinePaths
    tracker: Tracker
    tokenizer_uri: str | None = None  # set by start()
    tokenizer_local: str | None = None
    base_model_uri: str | None = None
    _prefetched: dict[str, Future] = field(default_factory=dict, repr=False)  # stage name -> its StageInputs
    _prefetcher: ThreadPoolExecutor | None = field(default=None, repr=False)

    @classmethod
    def open(cls, cfg: PipelineConfig, pipeline_id: str, tracking_uri: str | None = None,
             check_plan: bool = True) -> PipelineContext:
        """Every cluster-free check, then the storage layout and the MLflow store; nothing started."""
        from raylong.pipeline.preflight import preflight
        from raylong.plan import sp_span_warnings

        preflight(cfg, check_plan)
        for warning in sp_span_warnings(cfg):
            log.warning(warning)
        paths = PipelinePaths(cfg.storage_path, pipeline_id)
        tracking_uri = tracking_uri or default_tracking_uri(paths.storage)
        # a local SQLite store keeps artifacts beside it; a tracking server decides (and proxies) its own
        artifact_root = paths.mlflow_artifacts if tracking_uri.startswith("sqlite:") else None
        return cls(cfg, pipeline_id, paths, Tracker(tracking_uri, artifact_root=artifact_root))

    @property
    def tracking_uri(self) -> str:
        return self.tracker.tracking_uri

    def describe(self, what: str) -> None:
        log.info("%s %s: %d stages, storage %s, MLflow %s", what, self.pipeline_id, len(self.cfg.stages),
                 redact(self.paths.root), redact(self.tracking_uri))

    def start(self) -> None:
        """Ray, then the tokenizer and the base model the chain starts from (each created once)."""
        ensure_ray()
        self.tokenizer_uri = self._ensure_tokenizer()
        self.tokenizer_local = download_dir(self.tokenizer_uri, tempfile.mkdtemp(prefix="raylong-tok-"))
        self.base_model_uri = self._ensure_base_model()

    def _ensure_tokenizer(self) -> str:
        """`tokenizer.path` if given, else the configured BPE trained once into the pipeline's assets."""
        from raylong.data.tokenize import train_bpe_tokenizer

        cfg, target = self.cfg, self.paths.tokenizer
        if cfg.tokenizer.path is not None:
            return self.resolve_pretrained(cfg.tokenizer.path, target, "tokenizer.path")
        if not exists(f"{target}/tokenizer.json"):
            t = cfg.tokenizer.train
            with tempfile.TemporaryDirectory() as tmp:
                train_bpe_tokenizer(expand_path(t.files), t.vocab_size, tmp, t.max_files)
                upload_dir(tmp, target)
            log.info("trained a %d-token BPE tokenizer -> %s", t.vocab_size, redact(target))
        return target

    def _ensure_base_model(self) -> str:
        """`model.path`, or a random init written once as an HF export."""
        from raylong.train.model import export_complete, init_random_model

        if self.cfg.model.path is not None:
            return self.resolve_pretrained(self.cfg.model.path, self.paths.base_model, "model.path")
        if export_complete(self.paths.base_model) is None:
            init_random_model(self.cfg.model, self.tokenizer_local, self.paths.base_model)
        return self.paths.base_model

    def resolve_pretrained(self, path: str, target: str, field: str) -> str:
        """Where every worker reads a pretrained directory from, resolved once on the driver. A local
        directory with local storage: its absolute path. Otherwise (a hub id, an object-store directory, a
        local directory the other nodes cannot see) it is copied once into `target` in the pipeline's
        storage, SOURCE.json written last, so all workers read the same files and never the hub."""
        local = expand_path(path)
        is_dir = "://" not in path and os.path.isdir(local)
        if is_dir and is_local(self.paths.storage):
            return os.path.abspath(local)
        marker = f"{target}/SOURCE.json"
        copied = read_text(marker)
        if copied is not None:
            source = json.loads(copied)["source"]
            if source != path:
                raise ValueError(f"{field} is {path!r} but this pipeline's {redact(target)} was copied from "
                                 f"{source!r}; start a new pipeline id to change it")
            return target
        start = time.time()
        if is_dir:
            upload_dir(local, target)
        elif "://" in path:
            copy_dir(path, target)
        else:
            upload_dir(_hub_snapshot(path), target)
        write_text(marker, json.dumps({"source": path}))
        log.info("%s %s copied into %s in %.0fs", field, redact(path), redact(target), time.time() - start)
        return target

    def prefetch_stage(self, stage: StageConfig) -> None:
        """Start preparing a later stage's inputs in a background thread of the driver (while the current
        stage trains), so its data is ready when the workers are; `prepare_stage` collects the result."""
        if stage.name not in self._prefetched:
            self._prefetcher = self._prefetcher or ThreadPoolExecutor(1, thread_name_prefix="raylong-prefetch")
            self._prefetched[stage.name] = self._prefetcher.submit(self._prepare, stage, None)
            log.info("data %s: preparing in the background", stage.name)

    def close(self) -> None:
        """Stop background preparation (a running one finishes its current stage; queued ones are dropped)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None

    def prepare_stage(self, stage: StageConfig, eval_suite_uri: str | None = None) -> StageInputs:
        """Packed data through Ray Data, then the evaluation suite (written to `eval_suite_uri`, by default
        the pipeline's eval/<stage>.json) when the stage is evaluated. Raises DataError on bad input. A
        stage prefetched earlier is collected (waited for) instead of prepared again."""
        future = self._prefetched.pop(stage.name, None) if eval_suite_uri is None else None
        if future is not None:
            start = time.time()
            inputs = future.result()
            log.info("data %s: prepared in the background (waited %.1fs for it)", stage.name, time.time() - start)
            return replace(inputs, prefetched=True)
        return self._prepare(stage, eval_suite_uri)

    def _prepare(self, stage: StageConfig, eval_suite_uri: str | None) -> StageInputs:
        from raylong.data.prepare import DataError, prepare_stage_data
        from raylong.eval.build import build_eval_suite

        data = prepare_stage_data(stage, self.tokenizer_local, self.paths.data)
        if data.train_sequences < stage.parallel.num_workers:
            raise DataError(f"stage {stage.name!r}: {data.train_sequences} training sequences for "
                            f"{stage.parallel.num_workers} workers; every worker needs at least one")
        suite_uri = None
        if stage.eval.enabled:
            suite_uri = eval_suite_uri or self.paths.eval_suite(stage.name)
            write_text(suite_uri, build_eval_suite(stage, self.tokenizer_local).to_json())
        return StageInputs(data.train_uri, data.heldout_uri, data.train_sequences, suite_uri, data.report,
                           data.directory, data.cached)

    def worker_spec(self, stage: StageConfig, inputs: StageInputs, init_uri: str, run_id: str,
                    mode: WorkerMode = WorkerMode.STAGE, **fields) -> WorkerSpec:
        return WorkerSpec(stage=stage, mode=mode, init_uri=init_uri, tokenizer_uri=self.tokenizer_uri,
                          train_uri=inputs.train_uri, heldout_uri=inputs.heldout_uri,
                          eval_suite_uri=inputs.eval_suite_uri, tracking_uri=self.tracking_uri, mlflow_run_id=run_id,
                          **fields)


def _hub_snapshot(repo_id: str) -> str:
    """A Hugging Face hub repository's config, tokenizer and safetensors weights, through the local hub
    cache (with HF_HUB_OFFLINE=1, from that cache alone)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"])


def new_pipeline_id(cfg: PipelineConfig, kind: str = "") -> str:
    return f"{cfg.name}-{kind + '-' if kind else ''}{time.strftime('%Y%m%d-%H%M%S')}"
