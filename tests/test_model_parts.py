"""Pure pieces of the train path: per-document attention, RoPE per stage, the LR schedule."""

from __future__ import annotations

import math

import numpy as np
import torch

from raylong.config import OptimConfig, StageConfig
from raylong.train.attention import attention_for, document_spans
from raylong.train.engine import lr_lambda
from raylong.train.loss import loss_sum_and_count, shift_labels
from raylong.train.model import load_model, rotary_inv_freq


def stage(rope: dict | None = None, per_document: bool = True, seq_len: int = 256) -> StageConfig:
    return StageConfig.model_validate({
        "name": "s", "kind": "pretrain", "seq_len": seq_len, "rope": rope or {"type": "default", "theta": 10000},
        "data": {"sources": [{"name": "x", "path": "/dev/null", "format": "text"}]},
        "optim": {"steps": 10}, "parallel": {"num_workers": 1, "sp_size": 1},
        "per_document_attention": per_document,
    })


def test_document_spans_from_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert document_spans(pos) == [(0, 3), (3, 5), (5, 9)]


def test_per_document_attention_gradients_match_each_document_alone_with_one_split_per_input():
    from raylong.train.attention import doc_causal_attention

    sizes = [5, 17, 1, 40, 9]
    pos = torch.cat([torch.arange(n) for n in sizes])[None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(sizes), 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    out, _ = doc_causal_attention(None, q, k, v, None, position_ids=pos)
    weights = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    # the reference: each document through sdpa on its own copies of q, k, v
    start, ref = 0, [torch.zeros_like(t) for t in (q, k, v)]
    for n in sizes:
        parts = [t[:, :, start : start + n].detach().clone().requires_grad_() for t in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(
            parts[0], *(p.repeat_interleave(2, dim=1) for p in parts[1:]), is_causal=True)
        (o.transpose(1, 2) * weights[:, start : start + n]).sum().backward()
        for r, p in zip(ref, parts):
            r[:, :, start : start + n] = p.grad
        start += n
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want, atol=1e-5)
    # the backward splits each input once, instead of one sequence-long gradient per document slice
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    assert names.count("SplitWithSizesBackward0") == 3 and not any(n.startswith("SliceBackward") for n in names)


def per_token_losses(model, ids, pos, labels):
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    targets = shift_labels(labels)
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], ignore_index=-100, reduction="none")


def test_packed_sequence_loss_equals_each_document_alone(tiny_model_dir):
    rng = np.random.default_rng(0)
    docs = [torch.from_numpy(rng.integers(3, 1000, n)) for n in (40, 70, 30)]
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    labels = ids.clone()
    labels[pos == 0] = -100
    model = load_model(tiny_model_dir, stage(), attention_for(True, False), torch.float32)
    packed = per_token_losses(model, ids, pos, labels)
    alone = []
    for d in docs:
        lab = d.clone().unsqueeze(0)
        lab[0, 0] = -100
        alone.append(per_token_losses(model, d.unsqueeze(0), torch.arange(len(d)).unsqueeze(0), lab))
    reference = torch.cat(alone)
    mask = shift_labels(labels)[0] != -100
    assert torch.allclose(packed[mask], reference[mask], atol=1e-5)

    cross = load_model(tiny_model_dir, stage(per_document=False), attention_for(False, False), torch.float32)
    crossed = per_token_losses(cross, ids, pos, labels)
    first = slice(0, 39)  # the first document sees nothing before it: identical either way
    assert torch.allclose(crossed[first], packed[first], atol=1e-5)
    assert not torch.allclose(crossed[mask], packed[mask], atol=1e-3)  # later documents attend across


def test_rotary_frequencies_follow_the_stage_rope(tiny_model_dir):
    head_dim = 32 // 4
    base = 123456.0
    m = load_model(tiny_model_dir, stage({"type": "default", "theta": base}), attention_for(True, False), torch.float32)
    expected = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    assert torch.allclose(rotary_inv_freq(m), expected, rtol=1e-6)
    assert m.config.max_position_embeddings >= 256

    yarn = {"type": "yarn", "theta": base, "factor": 4.0, "original_max_position_embeddings": 128}
    y = load_model(tiny_model_dir, stage(yarn, seq_len=512), attention_for(True, False), torch.float32)
    f = rotary_inv_freq(y)
    # YaRN keeps the fastest frequency and divides the slowest by the factor
    assert math.isclose(float(f[0]), float(expected[0]), rel_tol=1e-5)
    assert math.isclose(float(f[-1]), float(expected[-1]) / 4.0, rel_tol=1e-5)
    assert y.config.max_position_embeddings == 512

    l3 = {"type": "llama3", "theta": base, "factor": 8.0, "original_max_position_embeddings": 128}
    z = load_model(tiny_model_dir, stage(l3), attention_for(True, False), torch.float32)
    g = rotary_inv_freq(z)
    assert math.isclose(float(g[-1]), float(expected[-1]) / 8.0, rel_tol=1e-5)
    assert math.isclose(float(g[0]), float(expected[0]), rel_tol=1e-5)


def test_lr_warmup_then_cosine_to_floor():
    f = lr_lambda(OptimConfig(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == 0.1 and f(9) == 1.0
    assert math.isclose(f(10), 1.0)
    assert math.isclose(f(60), 0.55, rel_tol=1e-9)
    assert math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)


def test_loss_sum_counts_only_learnable_tokens():
    logits = torch.zeros(1, 4, 10)
    targets = torch.tensor([[1, -100, 2, -100]])
    s, n = loss_sum_and_count(logits, targets)
    assert int(n) == 2 and math.isclose(float(s), 2 * math.log(10), rel_tol=1e-6)


def test_weight_decay_spares_norms_biases_and_embeddings(tiny_model_dir):
    from raylong.train.engine import param_groups

    m = load_model(tiny_model_dir, stage(), attention_for(True, False), torch.float32)
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert "model.embed_tokens.weight" in spared and "lm_head.weight" in decayed
    assert all("norm" in n for n in spared - {"model.embed_tokens.weight"})
    assert any(n.endswith("self_attn.q_proj.weight") for n in decayed)


def test_export_states_the_rope_for_v4_readers_and_v5_reads_it_back(tiny_model_dir, tokenizer_dir, tmp_path):
    """rope_parameters (transformers v5) plus rope_theta / rope_scaling (v4, serving engines); v5 loads the
    export with the stage's RoPE and the same logits."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from raylong.train.model import save_export

    yarn = {"type": "yarn", "theta": 40000, "factor": 4.0, "original_max_position_embeddings": 128}
    st = stage(yarn, seq_len=512)
    m = load_model(tiny_model_dir, st, attention_for(True, False), torch.float32)
    save_export(m, None, tokenizer_dir, str(tmp_path / "export"))
    config = json.load(open(tmp_path / "export" / "config.json"))
    assert config["rope_parameters"] == st.rope.to_hf()
    assert config["rope_theta"] == 40000.0
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert AutoConfig.from_pretrained(tmp_path / "export").rope_parameters == st.rope.to_hf()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    ids = torch.arange(1, 300).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, m(ids).logits, atol=1e-5)
    assert torch.allclose(rotary_inv_freq(back), rotary_inv_freq(m))

    default = stage({"type": "default", "theta": 5000})
    save_export(load_model(tiny_model_dir, default, attention_for(True, False), torch.float32), None, tokenizer_dir,
                str(tmp_path / "plain"))
    config = json.load(open(tmp_path / "plain" / "config.json"))
    assert config["rope_theta"] == 5000.0 and config["rope_scaling"] is None
    assert AutoConfig.from_pretrained(tmp_path / "plain").rope_parameters == default.rope.to_hf()


def test_gpu_stages_accumulate_and_reduce_gradients_in_fp32():
    """bf16 weights on GPU, but gradient accumulation and every gradient reduction (DP, and the SP-group
    reductions DeepSpeed switches to seq_parallel_communication_data_type) in fp32, as DeepSpeed reads it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from raylong.config import StageConfig
    from raylong.train.engine import deepspeed_config

    def stage(use_gpu: bool, zero: int) -> StageConfig:
        return StageConfig.model_validate({
            "name": "g", "kind": "pretrain", "seq_len": 1024,
            "data": {"sources": [{"name": "x", "path": "/dev/null", "format": "text"}]},
            "optim": {"steps": 1, "grad_accum": 4},
            "parallel": {"num_workers": 8, "sp_size": 4, "zero_stage": zero, "use_gpu": use_gpu}})

    for zero in (1, 2, 3):
        ds = DeepSpeedConfig(deepspeed_config(stage(True, zero)))
        assert ds.bfloat16_config.enabled
        assert ds.grad_accum_dtype == "fp32"
        assert ds.communication_data_type == torch.float32 and ds.seq_parallel_communication_data_type == torch.float32
    cpu = DeepSpeedConfig(deepspeed_config(stage(False, 3)))
    assert not cpu.bfloat16_config.enabled and cpu.grad_accum_dtype is None  # fp32 throughout on CPU


def _layer_calls_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    from tests.conftest import gloo_exit, gloo_init

    gloo_init(rank, 1, port)
    from raylong.train.step import build_stage_engine, micro_step

    calls = {}
    for checkpointing in (False, True):
        st = stage(seq_len=64).model_copy(update={"memory": stage().memory.model_copy(
            update={"activation_checkpointing": checkpointing})})
        se = build_stage_engine(st, model_dir)
        mlp_class = type(se.engine.module.model.layers[0].mlp)
        forward, seen = mlp_class.forward, []

        def counted(self, *args, **kwargs):  # the recomputation calls forward, not the module (no hooks)
            seen.append(1)
            return forward(self, *args, **kwargs)

        mlp_class.forward = counted
        ids = torch.arange(3, 67)[None]
        micro_step(se, {"input_ids": ids, "position_ids": torch.arange(64)[None], "labels": ids.clone()})
        mlp_class.forward = forward
        calls[checkpointing] = (se.engine.module.training, len(seen))
    torch.save(calls, out)
    gloo_exit()


def test_a_built_stage_engine_trains_and_checkpointing_recomputes_each_layer(tiny_model_dir, tmp_path):
    """from_pretrained returns eval mode, where transformers skips activation checkpointing: the engine
    must come out of build_stage_engine training, or the memory switch does nothing."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out = str(tmp_path / "calls.pt")
    mp.start_processes(_layer_calls_worker, args=(free_port(), tiny_model_dir, out), nprocs=1, join=True,
                       start_method="spawn")
    calls = torch.load(out)
    layers = 2  # the tiny model's
    assert calls[False] == (True, layers)  # one forward per layer
    assert calls[True] == (True, 2 * layers)  # the forward, and its recomputation in the backward

