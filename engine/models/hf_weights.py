"""HF-style checkpoint directories (config.json + safetensors shards) -> ModelConfig and a fused state dict."""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import ModelConfig
from .llama import o_proj_has_bias

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class CheckpointError(ValueError):
    """The directory is not a checkpoint this engine can serve (unknown architecture, missing files or tensors)."""


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def hf_model_config(path: str) -> ModelConfig:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path} has no config.json")
    c = _read_json(config_path)
    model_type = c.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"unsupported model_type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
    if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias", False):
        raise CheckpointError("only SiLU-gated MLPs without bias are supported")
    arch = ARCHITECTURES[model_type]
    # transformers 5 writes rope settings as rope_parameters; older configs use rope_theta + rope_scaling.
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    max_pos = c.get("max_position_embeddings", 2048)
    # Sliding-window attention equals full attention while sequences fit in the window, so cap the context there.
    windowed = (model_type == "mistral" and c.get("sliding_window")) or c.get("use_sliding_window", False)
    if windowed:
        max_pos = min(max_pos, c["sliding_window"])
    eos = _ids(c.get("eos_token_id"))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        eos += _ids(_read_json(gen_path).get("eos_token_id"))
    num_heads = c["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
        max_position_embeddings=max_pos,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        attention_bias=arch == "qwen2" or c.get("attention_bias", False),
        qk_norm=arch == "qwen3",
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos)),
    )


def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> shard file, from the index when there is one."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return {k: os.path.join(path, v) for k, v in _read_json(index)["weight_map"].items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors files")
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            names.update(dict.fromkeys(st.keys(), f))
    return names


def hf_state_dict(
    path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Read the shards straight onto `device` in `dtype`, fusing q/k/v and gate/up, in LlamaForCausalLM's names."""
    files = _tensor_files(path)
    handles: dict[str, object] = {}

    def load(name: str) -> torch.Tensor:
        if name not in files:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt", device=str(device))
        return handles[f].get_tensor(name).to(dtype)

    sd = {"embed_tokens.weight": load("model.embed_tokens.weight"), "norm.weight": load("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = load("lm_head.weight")
    for i in tqdm(range(cfg.num_layers), desc="Loading weights", unit="layer", disable=not progress):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        sd[p + "input_norm.weight"] = load(h + "input_layernorm.weight")
        sd[p + "post_attention_norm.weight"] = load(h + "post_attention_layernorm.weight")
        for suffix in ("weight", "bias") if cfg.attention_bias else ("weight",):
            sd[p + f"qkv_proj.{suffix}"] = torch.cat([load(h + f"self_attn.{x}_proj.{suffix}") for x in "qkv"])
        sd[p + "o_proj.weight"] = load(h + "self_attn.o_proj.weight")
        if o_proj_has_bias(cfg):
            sd[p + "o_proj.bias"] = load(h + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            sd[p + "q_norm.weight"] = load(h + "self_attn.q_norm.weight")
            sd[p + "k_norm.weight"] = load(h + "self_attn.k_norm.weight")
        sd[p + "gate_up_proj.weight"] = torch.cat([load(h + "mlp.gate_proj.weight"), load(h + "mlp.up_proj.weight")])
        sd[p + "down_proj.weight"] = load(h + "mlp.down_proj.weight")
    return sd
