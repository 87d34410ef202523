"""Check a Ray autoscaler cluster config: Ray's JSON schema and Ray's own cross-field validation, plus
the rules Ray leaves out (per node type min_workers <= max_workers)."""

from __future__ import annotations

import copy
from typing import Any

import yaml


class ClusterConfigError(ValueError):
    pass


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return Ray's prepared config, or raise ClusterConfigError naming the problem."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name, node in (config.get("available_node_types") or {}).items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers")
        if hi is not None and isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            raise ClusterConfigError(
                f"available_node_types.{name}: min_workers ({lo}) must be <= max_workers ({hi})"
            )
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "<top level>"
        raise ClusterConfigError(f"{where}: {exc.message}") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ClusterConfigError(str(exc)) from None
    return prepared


def load_cluster_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        return validate_cluster_config(yaml.safe_load(f))
