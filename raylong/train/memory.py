"""ALST memory switches applied to a model: TiledMLP and tiled logits+loss (DeepSpeed's autograd
functions); activation checkpointing and its CPU offload are set up in the loop.

Tiled logits+loss computes the lm_head and the cross-entropy one sequence tile at a time and runs each
tile's backward inside the forward (DeepSpeed TiledFusedLogitsLoss), so the [seq, vocab] logits never
exist. Because the lm_head gradient is produced there with an incoming gradient of 1, the objective it
returns must be the exact quantity backpropagated: `tiled_loss_objective` folds the token-weighting,
the SP factor and the gradient-accumulation factor into the per-tile loss, and the loop calls
`engine.backward(objective, scale_wrt_gas=False)`.
"""

from __future__ import annotations

import math
from types import MethodType

import torch
import torch.nn.functional as F

from raylong.train.collectives import reduce_number
from raylong.train.loss import IGNORE

LOSS_TILE_BYTES = 1 << 28  # fp32 logits per tile: 256 MiB
MIN_MLP_TILE = 1024


def _agreed_max(value: int, device) -> int:
    """All ranks must run the same number of tiles (ZeRO-3 gathers parameters per tile)."""
    return int(reduce_number(value, device, op="max"))


def _mlp(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _tiled_mlp_forward(self, x):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    # ALST: tiles of hidden_size tokens; at least MIN_MLP_TILE so small models do not run tiny tiles
    tile = self.raylong_tile_tokens or max(x.shape[-1], MIN_MLP_TILE)
    shards = _agreed_max(max(1, math.ceil(x.shape[-2] / tile)), x.device)
    params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
    return TiledMLP.apply(_mlp, self, x, shards, params)


def enable_tiled_mlp(model, tile_tokens: int | None = None) -> int:
    """Run every decoder layer's MLP over sequence tiles; returns the number of layers patched."""
    layers = model.model.layers
    for layer in layers:
        layer.mlp.raylong_tile_tokens = tile_tokens
        layer.mlp.forward = MethodType(_tiled_mlp_forward, layer.mlp)
    return len(layers)


def loss_tile(lm_head, tile_tokens: int | None) -> int:
    """Tokens per logits tile: `tile_tokens`, or as many as fit LOSS_TILE_BYTES of fp32 logits."""
    vocab = lm_head.weight.shape[0] if lm_head.weight.numel() else lm_head.out_features
    return tile_tokens or max(1, LOSS_TILE_BYTES // (4 * vocab))


@torch.no_grad()
def tiled_scores(lm_head, hidden: torch.Tensor, targets: torch.Tensor,
                 tile_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and greedy next token from final hidden states [n, hidden], one tile of
    logits at a time (evaluation: never the full [n, vocab]). Every rank runs as many tiles (ZeRO-3
    gathers the head's weight per call)."""
    n = hidden.shape[0]
    shards = _agreed_max(max(1, math.ceil(n / loss_tile(lm_head, tile_tokens))), hidden.device)
    size = math.ceil(n / shards)
    losses, argmax = [], []
    for i in range(shards):
        logits = lm_head(hidden[i * size : (i + 1) * size]).float()
        losses.append(F.cross_entropy(logits, targets[i * size : (i + 1) * size], ignore_index=IGNORE,
                                      reduction="none"))
        argmax.append(logits.argmax(-1))
    return torch.cat(losses), torch.cat(argmax)


def tiled_loss_objective(lm_head, hidden: torch.Tensor, targets: torch.Tensor, factor: float,
                         tile_tokens: int | None = None) -> torch.Tensor:
    """factor * sum of token cross-entropies, computed tile by tile without materialising the logits."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    shards = _agreed_max(max(1, math.ceil(hidden.shape[1] / loss_tile(lm_head, tile_tokens))), hidden.device)

    def tile_loss(head, x, y):
        logits = head(x).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=IGNORE, reduction="sum") * factor

    return TiledFusedLogitsLoss.apply(tile_loss, lm_head, hidden, targets, None, shards, [lm_head.weight], "sum")
