"""A tiny Llama-3-style GGUF, written the way llama.cpp's converter lays one out, against the transformers model
it came from: Q/K row interleave, Q4_1 / Q8_0 blocks, and Llama 3 rope scaling as a rope_freqs tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, LlamaConfig

from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig
from treadle.engine.loader import build_model
from treadle.engine.model_runner import ModelRunner
from treadle.engine.models.gguf_weights import gguf_model_config, gguf_state_dict
from treadle.engine.models.int4_cpu import Int4Linear

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}  # fmt: skip
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1,
              rope_parameters={"rope_theta": 10000.0, **ROPE})  # fmt: skip
Q4, Q8, F32 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's per-head row order for Q/K: (i, i + D/2) pairs stored adjacently."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freq_factors(head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter derives them from Llama 3's rope_scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        old = ROPE["original_max_position_embeddings"]
        low, high = old / ROPE["low_freq_factor"], old / ROPE["high_freq_factor"]
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(ROPE["factor"])
        else:
            smooth = (old / wavelen - ROPE["low_freq_factor"]) / (ROPE["high_freq_factor"] - ROPE["low_freq_factor"])
            out.append(1 / ((1 - smooth) / ROPE["factor"] + smooth))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def gguf_and_reference(tmp_path_factory):
    """Writes the GGUF; sets the reference's weights to what the GGUF stores (its quantized values)."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).eval()
    c = reference.config
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama3.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)

    def put(name: str, param: torch.nn.Parameter, qtype: GGMLQuantizationType, heads: int | None = None) -> None:
        w = param.detach().numpy()
        stored = interleave(w, heads) if heads else w
        if qtype == F32:
            writer.add_tensor(name, np.ascontiguousarray(stored))
            return
        raw = quantize(np.ascontiguousarray(stored), qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        value = dequantize(raw, qtype)
        param.data.copy_(torch.from_numpy(interleave_back(value, heads) if heads else value))

    def interleave_back(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    m = reference.model
    put("token_embd.weight", m.embed_tokens.weight, Q8)
    put("output_norm.weight", m.norm.weight, F32)
    put("output.weight", reference.lm_head.weight, Q8)
    writer.add_tensor("rope_freqs.weight", rope_freq_factors(c.head_dim, 10000.0))
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, F32)
        put(f"blk.{i}.attn_q.weight", a.q_proj.weight, Q4, c.num_attention_heads)
        put(f"blk.{i}.attn_k.weight", a.k_proj.weight, Q4, c.num_key_value_heads)
        put(f"blk.{i}.attn_v.weight", a.v_proj.weight, Q4)
        put(f"blk.{i}.attn_output.weight", a.o_proj.weight, Q4)
        put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, F32)
        put(f"blk.{i}.ffn_gate.weight", f.gate_proj.weight, Q4)
        put(f"blk.{i}.ffn_up.weight", f.up_proj.weight, Q4)
        put(f"blk.{i}.ffn_down.weight", f.down_proj.weight, Q8)  # a layer mixing Q4 and Q8 projections
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, reference


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_logits_match_transformers(gguf_and_reference, dtype):
    path, reference = gguf_and_reference
    reader = GGUFReader(path)
    config = gguf_model_config(reader)
    assert config.rope_scaling["rope_type"] == "freq_factors" and not config.tie_word_embeddings
    int4 = dtype == "bfloat16"  # what the loader does for bfloat16 on CPU
    model = build_model(config, gguf_state_dict(reader, config, getattr(torch, dtype), False, int4), torch.device("cpu"))
    assert isinstance(model.layers[0].qkv_proj, Int4Linear) == int4
    assert not isinstance(model.layers[0].down_proj, Int4Linear)

    runner = ModelRunner(model, config, EngineConfig(dtype=dtype), num_slots=128)
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
    got = [runner.execute([SeqChunk(ids[:40], list(range(40)), list(range(40)), True)])[0]]
    for i in range(40, 48):
        got.append(runner.execute([SeqChunk([ids[i]], [i], list(range(i + 1)), True)])[0])
    got = torch.stack(got)
    expected = expected[39:]
    if dtype == "float32":
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    else:
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()
