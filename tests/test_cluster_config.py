"""cluster.yaml passes Ray's autoscaler schema and validation; broken variants are caught."""

from __future__ import annotations

import copy

import pytest
import yaml

from raylong.cluster import ClusterConfigError, load_cluster_config, validate_cluster_config


@pytest.fixture
def raw() -> dict:
    with open("cluster.yaml") as f:
        return yaml.safe_load(f)


def test_cluster_yaml_is_valid():
    prepared = load_cluster_config("cluster.yaml")
    types = prepared["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_h100x8"]["resources"]["GPU"] == 8
    # the planner's GPUs per node (which decides whether an SP group crosses nodes) is this node type's
    from raylong.config import load_recipe

    recipe = load_recipe("jobs/recipes/llama31_8b_1m.yaml")
    assert {s.parallel.gpus_per_node for s in recipe.stages if s.parallel.use_gpu} == {8}
    assert types["gpu_h100x8"]["min_workers"] == 0 and types["cpu_data"]["min_workers"] == 0
    assert any("[gpu]" in c for c in prepared["setup_commands"])


def test_typo_in_a_key_is_caught(raw):
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_h100x8"]["max_worker"] = 8
    with pytest.raises(ClusterConfigError, match="Additional properties are not allowed .'max_worker'"):
        validate_cluster_config(bad)


def test_fractional_gpu_count_is_caught(raw):
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_h100x8"]["resources"]["GPU"] = 7.5
    with pytest.raises(ClusterConfigError, match="available_node_types.gpu_h100x8.resources.GPU: 7.5 is not of type 'integer'"):
        validate_cluster_config(bad)


def test_min_workers_above_max_workers_is_caught(raw):
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["cpu_data"]["min_workers"] = 5
    with pytest.raises(ClusterConfigError, match=r"cpu_data: min_workers \(5\) must be <= max_workers \(4\)"):
        validate_cluster_config(bad)


def test_head_type_must_exist(raw):
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ClusterConfigError, match="head_node_type"):
        validate_cluster_config(bad)


def test_every_node_matches_the_tested_environment_and_reaches_the_bucket(raw):
    """What autoscaled nodes need to run what the tests ran: the tested Python, the pinned versions, flash-attn
    built the way its authors say, a role for the bucket, the cluster's auth token, one zone, EFA on GPU nodes."""
    import os

    setup = "\n".join(raw["setup_commands"])
    constraints = "requirements/constraints-py311.txt"
    assert os.path.exists(constraints) and f"-c ~/raylong/{constraints}" in setup
    with open(constraints) as f:
        pins = dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))
    import ray
    import torch

    assert pins["ray"] == ray.__version__ and pins["torch"] == torch.__version__.split("+")[0]
    assert "python3.11 -m venv" in setup  # the constraints are for 3.11
    for name, node in raw["available_node_types"].items():
        assert "raylong-node" in node["node_config"]["IamInstanceProfile"]["Arn"], name
    gpu = raw["available_node_types"]["gpu_h100x8"]
    assert any("--no-build-isolation" in c and "flash-attn" in c for c in gpu["worker_setup_commands"])
    assert gpu["node_config"]["NetworkInterfaces"][0]["InterfaceType"] == "efa" and gpu["node_config"]["Placement"]
    assert "," not in raw["provider"]["availability_zone"]
    assert ".gitignore" in raw["rsync_filter"]
    assert any(dest.endswith(".ray/auth_token") for dest in raw["file_mounts"])
