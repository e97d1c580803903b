"""GGUF checkpoints -> ModelConfig and a state dict in LlamaForCausalLM's (fused) layout.

Quantized tensors are dequantized with the `gguf` package (every type it knows: Q4_0, Q4_1, Q8_0, K-quants,
F16, BF16, ...) and cast to the serving dtype. llama.cpp stores Llama-architecture Q/K projections with rows
interleaved per head (its RoPE pairs adjacent dims); they are permuted back to the half-split layout the model
code (and HF) uses. Qwen2/Qwen3 GGUFs are not permuted by llama.cpp.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from ..config import ModelConfig
from .int4_cpu import pack_int4, packable, q4_blocks, q8_blocks_as_int4
from .llama import o_proj_has_bias

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class GGUFFormatError(ValueError):
    """The file is not a GGUF this engine can serve (unknown architecture, missing metadata)."""


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_model_config(reader: GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFFormatError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFFormatError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = need("embedding_length")
    num_heads = need("attention.head_count")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFFormatError("GGUF has no token_embd.weight tensor")
    eos = [
        _field(reader, f"tokenizer.ggml.{name}_token_id")
        for name in ("eos", "eot", "eom")
        if _field(reader, f"tokenizer.ggml.{name}_token_id") is not None
    ]
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(embed.shape[1]),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=num_heads,
        num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=_field(reader, f"{arch}.attention.key_length", hidden // num_heads),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, tensors),
        max_position_embeddings=_field(reader, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos)),
    )


def _rope_scaling(reader: GGUFReader, arch: str, tensors: dict) -> dict | None:
    if "rope_freqs.weight" in tensors:  # Llama 3.x: llama.cpp bakes the frequency scaling into per-dim divisors
        factors = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    raise GGUFFormatError(f"unsupported GGUF rope scaling {kind!r}")


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave (pairs (i, i + D/2) stored adjacently) on [out, ...] weights."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(
    reader: GGUFReader, cfg: ModelConfig, dtype: torch.dtype, progress: bool = True, int4: bool = False
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to `dtype` on CPU, fusing q/k/v and gate/up, in LlamaForCausalLM's names.

    With `int4`, projections stored as Q4_0/Q4_1 also keep their 4-bit form (`<name>.qweight` and `.scales_zeros`,
    for Int4Linear) next to the dense weight.
    """
    tensors = {t.name: t for t in reader.tensors}
    permute = cfg.architecture == "llama"

    def tensor(name: str):
        t = tensors.get(name)
        if t is None:
            raise GGUFFormatError(f"GGUF lacks tensor {name}")
        return t

    def load(name: str, heads: int | None = None) -> np.ndarray:
        t = tensor(name)
        w = dequantize(t.data, t.tensor_type)
        return _unpermute(w, heads) if permute and heads else w

    def out(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(arr, np.float32, ["C", "W"])).to(dtype)

    def projection(prefix: str, parts: list[tuple[str, int | None]]) -> dict[str, torch.Tensor]:
        """One (possibly fused) projection's weights: rows of `parts` stacked in order."""
        ts = [tensor(name) for name, _ in parts]
        if int4 and packable([t.tensor_type for t in ts], sum(int(t.shape[1]) for t in ts)):
            blocks = []
            for name, heads in parts:
                t = tensor(name)
                q, scale, zero = q4_blocks(t.data, t.tensor_type)
                if permute and heads:
                    q, scale, zero = (_unpermute(a, heads) for a in (q, scale, zero))
                blocks.append((q, scale, zero))
            packed = pack_int4(*(np.concatenate(arrays) for arrays in zip(*blocks)))
            dense = out(np.concatenate([load(name, heads) for name, heads in parts]))
            return {f"{prefix}.weight": dense, **{f"{prefix}.{key}": value for key, value in packed.items()}}
        return {f"{prefix}.weight": out(np.concatenate([load(name, heads) for name, heads in parts]))}

    sd = {"embed_tokens.weight": out(load("token_embd.weight")), "norm.weight": out(load("output_norm.weight"))}
    embed = tensor("token_embd.weight")
    if int4 and cfg.tie_word_embeddings and embed.tensor_type == GGMLQuantizationType.Q8_0:
        sd.update({f"head_int4.{k}": v for k, v in pack_int4(*q8_blocks_as_int4(embed.data)).items()})
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = out(load("output.weight"))
    for i in tqdm(range(cfg.num_layers), desc="Loading GGUF", unit="layer", disable=not progress):
        b, p = f"blk.{i}.", f"layers.{i}."
        sd[p + "input_norm.weight"] = out(load(b + "attn_norm.weight"))
        sd[p + "post_attention_norm.weight"] = out(load(b + "ffn_norm.weight"))
        qkv = [(b + "attn_q", cfg.num_heads), (b + "attn_k", cfg.num_kv_heads), (b + "attn_v", None)]
        sd.update(projection(p + "qkv_proj", [(name + ".weight", heads) for name, heads in qkv]))
        if cfg.attention_bias:
            sd[p + "qkv_proj.bias"] = out(np.concatenate([load(name + ".bias", heads) for name, heads in qkv]))
        sd.update(projection(p + "o_proj", [(b + "attn_output.weight", None)]))
        if o_proj_has_bias(cfg):
            sd[p + "o_proj.bias"] = out(load(b + "attn_output.bias"))
        if cfg.qk_norm:
            sd[p + "q_norm.weight"] = out(load(b + "attn_q_norm.weight"))
            sd[p + "k_norm.weight"] = out(load(b + "attn_k_norm.weight"))
        sd.update(projection(p + "gate_up_proj", [(b + "ffn_gate.weight", None), (b + "ffn_up.weight", None)]))
        sd.update(projection(p + "down_proj", [(b + "ffn_down.weight", None)]))
    return sd
