"""Token-weighted causal-LM loss, exact across sequence-parallel shards.

Each SP rank holds a slice of the sequence and so a different number of learnable tokens. The loss is
sum(token losses over all shards) / (learnable tokens over all shards): the per-rank sums are added over
the SP group by `GroupSum`, whose backward adds the incoming gradients over the group again, so each
rank's backward gets its share of the gradient (what the differentiable all_gather + sum computes).
torch's own differentiable all_gather cannot be used: on gloo its backward scatters from *global* rank
i of each group position, which fails for every SP group that does not hold global rank 0 (DP > 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raylong.data.packing import IGNORE
from raylong.train.collectives import all_reduce_


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: labels moved left by one, -100 at the end."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:].contiguous()


def loss_sum_and_count(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over learnable tokens, and how many there are."""
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum, (targets != IGNORE).sum()


def token_weighted_loss(loss_sum: torch.Tensor, count: torch.Tensor, sp_group=None,
                        per_token: bool = True) -> tuple[torch.Tensor, int]:
    """Loss over the SP group (or this rank alone), differentiable: the mean per learnable token, or with
    per_token=False the sum (the caller weights it). Returns (loss, learnable tokens of the group)."""
    if sp_group is None:
        tokens = int(count.item())
    else:
        tokens = group_sum(count, sp_group)
        loss_sum = GroupSum.apply(loss_sum, sp_group)
    return (loss_sum / max(tokens, 1) if per_token else loss_sum), tokens


class GroupSum(torch.autograd.Function):
    """Differentiable sum of a tensor over a process group: forward and backward are both all-reduce SUM
    within `group` (any subgroup: no global rank is assumed to be in it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return all_reduce_(tensor.detach().clone(), group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_(grad.contiguous().clone(), group=ctx.group), None


def group_sum(value: torch.Tensor, group=None, as_float: bool = False):
    """Sum of a scalar over the SP group (no gradient): an int, or a float with as_float."""
    value = value.detach().clone().double()
    if group is not None:
        all_reduce_(value, group=group)
    return float(value) if as_float else int(value)


def sp_gradient_scale(sp_size: int, zero_stage: int) -> float:
    """Factor on the loss so the applied gradient equals the SP=1 gradient.

    Measured (design notes, guarded by tests): with ZeRO-3's default reduce-scatter the update is
    already exact; with ZeRO 1/2 the gradient comes out exactly sp_size times too large.
    """
    return 1.0 if zero_stage == 3 or sp_size == 1 else 1.0 / sp_size
