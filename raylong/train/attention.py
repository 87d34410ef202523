"""Attention functions raylong registers with transformers.

- `raylong_doc_causal`: causal attention within each packed document. Documents are found from
  position_ids restarts (as transformers' own packed-sequence detection does); each runs through sdpa
  alone, so no [seq, seq] mask is ever built. Under Ulysses SP the wrapper hands us the gathered
  full-sequence position_ids, so this is exact at every SP degree.
- `raylong_causal`: plain causal attention over the whole packed sequence (cross-document attention,
  as UltraLong trains), ignoring position restarts, identical at every SP degree.

On GPU, per-document attention is flash_attention_2, which does varlen attention from position_ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DOC_CAUSAL = "raylong_doc_causal"
CAUSAL = "raylong_causal"


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document in a [1, L] position_ids row: a new one wherever pos != prev + 1."""
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    bounds = [0, *starts.tolist(), pos.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def _expand_kv(module, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor):
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    return key, value


def doc_causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [b, hq, L, d], key/value [b, hkv, L, d] -> ([b, L, hq, d], None)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != query.shape[2]:
        raise ValueError(f"{DOC_CAUSAL} needs full-length position_ids (got {None if position_ids is None else tuple(position_ids.shape)})")
    if query.shape[0] != 1:
        raise ValueError(f"{DOC_CAUSAL} supports micro-batch 1 (packed sequences), got batch {query.shape[0]}")
    key, value = _expand_kv(module, key, value, query)
    sizes = [e - s for s, e in document_spans(position_ids)]
    if len(sizes) == 1:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:  # one split per tensor: its backward concatenates the documents' gradients once (slicing would
        # give each document a sequence-long zero-filled gradient to add up: O(documents x L) work)
        out = torch.cat(
            [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
             for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))],
            dim=2,
        )
    return out.transpose(1, 2).contiguous(), None


def causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    key, value = _expand_kv(module, key, value, query)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register_attention() -> None:
    """Make both functions loadable as `attn_implementation=...` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DOC_CAUSAL, doc_causal_attention)
    AttentionInterface.register(CAUSAL, causal_attention)
    AttentionMaskInterface.register(DOC_CAUSAL, _no_mask)
    AttentionMaskInterface.register(CAUSAL, _no_mask)


def reset_sequence_parallel() -> None:
    """Undo a previous Ulysses registration in this process (its SP groups and the attention wrapper it
    installed), so one process can build more than one stage engine: tests, eval after training."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
    if getattr(sp_state, "_SEQUENCE_PARALLEL_GROUP", None) is not None:
        sp_state._release_sequence_parallel_groups()


def attention_for(per_document: bool, use_gpu: bool) -> str:
    """flash_attention_2 (varlen from position_ids) on GPU when flash-attn is installed, else raylong's
    sdpa-based functions (on GPU sdpa runs its own flash kernels per document)."""
    import importlib.util

    register_attention()
    if per_document and use_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return DOC_CAUSAL if per_document else CAUSAL
