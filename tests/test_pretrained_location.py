"""model.path / tokenizer.path are resolved once on the driver into a location every worker can read:
a hub id (here served from the Hugging Face cache, offline), an object-store directory and, when the
storage is an object store, a local directory of the driver are copied into the pipeline's storage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from raylong.pipeline.context import PipelineContext, PipelinePaths
from tests.services import REPO, S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def context(storage: str) -> PipelineContext:
    return PipelineContext(cfg=None, pipeline_id="p", paths=PipelinePaths(storage, "p"), tracker=None)


def hub_cache(home: str, repo_id: str, model_dir: str) -> None:
    """The Hugging Face cache layout a past download leaves: refs/main -> snapshots/<commit>/files."""
    repo = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


def same_logits(a: str, b: str) -> bool:
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        return torch.equal(AutoModelForCausalLM.from_pretrained(a).eval()(ids).logits,
                           AutoModelForCausalLM.from_pretrained(b).eval()(ids).logits)


def test_a_local_directory_with_local_storage_is_used_in_place(tiny_model_dir, tmp_path):
    ctx = context(str(tmp_path / "runs"))
    assert ctx.resolve_pretrained(tiny_model_dir, ctx.paths.base_model, "model.path") == tiny_model_dir
    assert not os.path.exists(ctx.paths.base_model)


def resolve_in_a_driver(storage: str, path: str, env: dict) -> str:
    """ctx.resolve_pretrained in a fresh process (the hub library reads HF_HOME / HF_HUB_OFFLINE at import)."""
    code = ("import sys; from tests.test_pretrained_location import context; ctx = context(sys.argv[1]); "
            "print(ctx.resolve_pretrained(sys.argv[2], ctx.paths.base_model, 'model.path'))")
    done = subprocess.run([sys.executable, "-c", code, storage, path], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout.strip().splitlines()[-1]


def test_a_hub_id_is_copied_once_from_the_hub_cache(tiny_model_dir, tmp_path):
    home = str(tmp_path / "hf")
    hub_cache(home, "raylong-test/tiny-llama", tiny_model_dir)
    env, storage = {"HF_HOME": home, "HF_HUB_OFFLINE": "1"}, str(tmp_path / "runs")
    target = resolve_in_a_driver(storage, "raylong-test/tiny-llama", env)
    assert target == context(storage).paths.base_model
    assert same_logits(target, tiny_model_dir)
    shutil.rmtree(home)  # resolved once: a resumed pipeline does not go back to the hub
    assert resolve_in_a_driver(storage, "raylong-test/tiny-llama", env) == target
    with pytest.raises(RuntimeError, match="model.path is 'other/model' but this pipeline's .* was copied from "
                                           "'raylong-test/tiny-llama'"):
        resolve_in_a_driver(storage, "other/model", env)
    with pytest.raises(RuntimeError, match="LocalEntryNotFoundError"):  # not in the cache, hub off: said so
        resolve_in_a_driver(str(tmp_path / "other-runs"), "raylong-test/tiny-llama", env)


def test_object_store_and_driver_local_directories_are_copied_into_object_storage(s3_env, tiny_model_dir,
                                                                                  tokenizer_dir, tmp_path):
    from raylong.data.tokenize import load_tokenizer

    ctx = context(f"s3://{S3Server.BUCKET}/store")
    # a local directory of the driver: the other nodes cannot read it
    model = ctx.resolve_pretrained(tiny_model_dir, ctx.paths.base_model, "model.path")
    assert model == f"s3://{S3Server.BUCKET}/store/p/assets/base_model"
    assert same_logits(s3_env.download_dir(model, str(tmp_path / "m")), tiny_model_dir)
    # an object-store directory elsewhere: copied server-side into the pipeline's storage
    source = s3_env.upload_dir(tokenizer_dir, "shared/tokenizer")
    tok = ctx.resolve_pretrained(source, ctx.paths.tokenizer, "tokenizer.path")
    assert tok == f"s3://{S3Server.BUCKET}/store/p/assets/tokenizer"
    copied = load_tokenizer(s3_env.download_dir(tok, str(tmp_path / "t")))
    text = "def resolve(path):\n    return path"
    assert copied(text)["input_ids"] == load_tokenizer(tokenizer_dir)(text)["input_ids"]
    assert "store/p/assets/tokenizer/SOURCE.json" in s3_env.keys("store/p/assets/tokenizer/")
