"""Ray Train adapter: run one stage's training loop on a TorchTrainer worker group."""

from __future__ import annotations

import os
from dataclasses import asdict

from raylong.config import StageConfig
from raylong.train.loop import StageRun, train_stage

# Environment the workers need (Ray Train V2 passes only RAY_TRAIN_* variables by itself).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                 "PYTORCH_CUDA_ALLOC_CONF", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Credentials: read from the driver's environment (or the job's runtime_env) and handed to the training
# workers inside the train loop config (Ray's object store), not through worker_runtime_env: Ray's
# runtime-env agent writes every runtime_env it sets up, env_vars included, to its log.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS",
                  "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "MLFLOW_TRACKING_USERNAME",
                  "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "HF_TOKEN")


def credential_names() -> list[str]:
    return [k for k in CREDENTIAL_ENV if os.environ.get(k)]


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Non-secret environment for the workers (sent as runtime_env, which Ray logs)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/raylong/torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if use_gpu:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_training(stage: StageConfig, run: StageRun, run_name: str, storage_path: str, max_failures: int = 2,
                 callbacks: list | None = None):
    """TorchTrainer.fit() for one stage. A rerun with the same (run_name, storage_path) resumes from the
    latest complete checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = stage.parallel
    resources = {"CPU": p.cpus_per_worker}
    if p.use_gpu:
        resources["GPU"] = 1
    config = asdict(run)
    config["credentials"] = {k: os.environ[k] for k in credential_names()}
    trainer = TorchTrainer(
        train_stage,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(p.use_gpu)},
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
