"""Ray Train adapter: run a WorkerSpec on a TorchTrainer worker group."""

from __future__ import annotations

import dataclasses
import os

from raylong.credentials import credential_values
from raylong.train.spec import WorkerSpec
from raylong.train.worker import StageWorker, run_worker

# Non-secret environment the workers need (Ray Train V2 passes only RAY_TRAIN_* variables by itself).
FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTORCH_CUDA_ALLOC_CONF",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Non-secret environment for the workers (sent as runtime_env, which Ray logs)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/raylong/torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if use_gpu:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_training(spec: WorkerSpec, run_name: str, storage_path: str, max_failures: int = 2,
                 callbacks: list | None = None, worker_cls: type[StageWorker] | None = None):
    """TorchTrainer.fit() for one stage or trial. A rerun with the same (run_name, storage_path) resumes
    from the latest complete checkpoint. The driver's credentials travel inside the spec."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = spec.stage.parallel
    resources = {"CPU": p.cpus_per_worker}
    if p.use_gpu:
        resources["GPU"] = 1
    spec = dataclasses.replace(spec, credentials=credential_values())
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"spec": spec, "worker_cls": worker_cls},
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
