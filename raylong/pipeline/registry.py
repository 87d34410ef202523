"""The pipeline's final model as an MLflow model (transformers flavour, task text-generation), logged on the
last stage's run and registered under the recipe's model name, so MLflow's own loaders open it:
`mlflow.transformers.load_model("models:/<name>/<version>")` (a generation pipeline) and
`mlflow.pyfunc.load_model(...)` (prompts in, text out). A tracking server accepts it too: the source is
the run's artifact location, not a local directory.

Loading the export takes the model's full weights in memory (16 GB for an 8B model in bf16), so it runs as
a Ray task on a worker node, not in the driver on the head node.
"""

from __future__ import annotations

import os
import tempfile

from raylong.credentials import credential_values
from raylong.log import get_logger
from raylong.storage import download_dir
from raylong.tracking import Tracker

log = get_logger(__name__)

MODEL_ARTIFACT = "model"


def pip_requirements() -> list[str]:
    """What serving the model needs, pinned to what trained it (MLflow's own inference of this list imports
    torchvision, which a training environment need not have)."""
    import tokenizers
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"tokenizers=={tokenizers.__version__}", "safetensors"]


def log_mlflow_model(export_uri: str, tracking_uri: str, run_id: str, credentials: dict[str, str]) -> str:
    """The Hugging Face export, loaded and logged as the run's `model` artifact in MLflow's transformers
    format. Returns the artifact's location (what a model version points at)."""
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.update(credentials)  # object store / MLflow credentials of the driver
    with tempfile.TemporaryDirectory() as tmp:
        local = download_dir(export_uri, f"{tmp}/export")
        model = AutoModelForCausalLM.from_pretrained(local, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(local)
        mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, path=f"{tmp}/{MODEL_ARTIFACT}",
                                       task="text-generation", pip_requirements=pip_requirements())
        tracker = Tracker(tracking_uri)
        tracker.log_artifacts(run_id, f"{tmp}/{MODEL_ARTIFACT}", MODEL_ARTIFACT)
    return f"{tracker.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"


def register_final_model(tracker: Tracker, name: str, export_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """A version of registered model `name` for the export of stage run `run_id` (once: a resumed pipeline
    finds its version). Returns the version."""
    import ray

    existing = tracker.model_version_of_run(name, run_id)
    if existing is not None:
        return existing
    task = ray.remote(num_cpus=0.5)(log_mlflow_model)
    source = ray.get(task.remote(export_uri, tracker.tracking_uri, run_id, credential_values()))
    version = tracker.create_model_version(name, source, run_id, {**tags, "export_uri": export_uri})
    log.info("registered MLflow model %s version %s (transformers flavour, from %s)", name, version, export_uri)
    return version
