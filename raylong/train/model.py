"""Build a stage's model from an HF export with the stage's RoPE; write the stage's HF export."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from raylong.config import ModelConfig, RopeConfig, StageConfig

END_OF_TURN = "<|eot_id|>"


def stage_model_config(init_dir: str, stage: StageConfig, attn_implementation: str):
    """The init model's config with this stage's RoPE, a max_position_embeddings >= seq_len, no cache."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(init_dir)
    config.rope_parameters = stage.rope.to_hf()
    config.max_position_embeddings = max(int(config.max_position_embeddings), stage.seq_len)
    config.use_cache = False  # with a cache transformers skips packed-sequence handling
    config._attn_implementation = attn_implementation
    return config


def rope_of(config: dict) -> RopeConfig:
    """The RoPE a Hugging Face config.json states (v5 `rope_parameters`, or v4 `rope_theta` + `rope_scaling`),
    as a stage's RopeConfig: how a model is run as it was trained (the base model's evaluation)."""
    params = dict(config.get("rope_parameters") or {})
    legacy = dict(config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    for key, value in legacy.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    kind = params.get("rope_type", "default")
    if kind not in ("default", "yarn", "llama3"):
        raise ValueError(f"rope_type {kind!r} in the model's config.json is not one a stage can state "
                         "(default, yarn, llama3)")
    extra = {k: params[k] for k in ("factor", "original_max_position_embeddings", "low_freq_factor",
                                    "high_freq_factor") if params.get(k) is not None}
    return RopeConfig(type=kind, theta=params["rope_theta"], **extra)


def load_model(init_dir: str, stage: StageConfig, attn_implementation: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = stage_model_config(init_dir, stage, attn_implementation)
    return AutoModelForCausalLM.from_pretrained(
        init_dir, config=config, dtype=dtype, attn_implementation=attn_implementation
    )


def init_random_model(model: ModelConfig, tokenizer_dir: str, out_dir: str) -> str:
    """Write a randomly initialised Llama (from `model.init`) as an HF directory: the chain's base model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(model.init or {})
    kwargs.setdefault("vocab_size", len(tok))
    kwargs.setdefault("bos_token_id", tok.bos_token_id)
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    kwargs.setdefault("pad_token_id", tok.pad_token_id)
    torch.manual_seed(model.seed)
    hf = LlamaForCausalLM(LlamaConfig(**kwargs))
    save_export(hf, None, tokenizer_dir, out_dir)
    return out_dir


def save_export(model, state_dict, tokenizer_dir: str, out_uri: str) -> None:
    """save_pretrained (safetensors) + tokenizer into a local temp dir, then copy to `out_uri` and write
    EXPORT.json last, so a half-written export is never mistaken for a complete one."""
    from raylong.storage import upload_dir

    from raylong.data.tokenize import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)  # with the chat template the stage trained with (SFT masks)
    with tempfile.TemporaryDirectory() as tmp:
        model.config.use_cache = True
        if model.generation_config is not None:  # generation stops at the end of a turn, not only of the text
            model.generation_config.eos_token_id = stop_token_ids(tokenizer)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        write_legacy_rope_keys(f"{tmp}/config.json")
        tokenizer.save_pretrained(tmp)
        manifest = {"files": sorted(p.name for p in Path(tmp).iterdir()), "checksum": weights_checksum(tmp)}
        upload_dir(tmp, out_uri)
    from raylong.storage import write_text

    write_text(f"{out_uri}/EXPORT.json", json.dumps(manifest, indent=2))


def write_legacy_rope_keys(config_path: str) -> None:
    """Also state the RoPE the way transformers v4 and serving engines read it (`rope_theta`, and
    `rope_scaling` without the theta): a reader that knows only those keys would otherwise run the export
    with default RoPE at the base theta, silently. transformers v5 rebuilds the same `rope_parameters`."""
    with open(config_path) as f:
        config = json.load(f)
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        return
    config["rope_theta"] = rope.pop("rope_theta", config.get("rope_theta"))
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def stop_token_ids(tokenizer) -> list[int]:
    """End of text, and end of turn when the vocabulary has it (`<|eot_id|>`, what the chat template closes
    every message with): an instruct model stops at either."""
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot not in ids:
        ids.append(eot)
    return ids


def weights_checksum(model_dir: str) -> str:
    """sha256 over the safetensors files of a local HF directory (names sorted)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def export_complete(out_uri: str) -> dict | None:
    from raylong.storage import read_text

    text = read_text(f"{out_uri}/EXPORT.json")
    return json.loads(text) if text is not None else None


def rotary_inv_freq(model) -> torch.Tensor:
    """The inverse frequencies the model's rotary embedding actually uses."""
    return model.model.rotary_emb.inv_freq.detach().clone()

