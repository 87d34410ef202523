"""Every collective raylong issues, in one place (a test keeps it so).

Ray Train gives GPU workers an NCCL-only process group, and NCCL reduces only tensors on the rank's GPU:
a collective on a CPU tensor passes every gloo test and fails on the cluster. So the helpers that reduce
numbers build their tensors on the device they are given (the engine's), and those that take tensors
refuse one on the wrong device for the group's backend. Without torch.distributed (one process) each is
the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def _check_device(tensor: torch.Tensor, group) -> None:
    if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        raise RuntimeError(f"a collective on a {tensor.device.type} tensor over NCCL: make it on the engine's device")


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor already on the rank's device; returns it."""
    if active():
        _check_device(tensor, group)
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def reduce_number(value: float, device: torch.device, op: str = "sum", group=None) -> float:
    """A Python number reduced over the group, through a float64 tensor on `device`."""
    if not active():
        return value
    return float(all_reduce_(torch.tensor(value, dtype=torch.float64, device=device), op, group).item())


def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every group member's equally shaped tensor, concatenated along dim 0 in group-rank order."""
    if not active() or dist.get_world_size(group) == 1:
        return tensor
    _check_device(tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (also a barrier)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
