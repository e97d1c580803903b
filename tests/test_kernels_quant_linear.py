"""QuantLinear against nn.Linear on the dequantized weight, and quantize_model_ on the engine's Llama model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kernels_testing import DEVICE, ON_GPU, rel_err  # noqa: I001  (sets up the interpreter first)

from treadle.engine.config import ModelConfig
from treadle.engine.models.attention import AttentionMetadata
from treadle.engine.models.llama import LlamaForCausalLM
from treadle.kernels.quant_linear import QuantLinear, quantize_model_
from treadle.kernels.quantize import dequantize


@pytest.mark.parametrize("bias,block_n", [(False, 0), (True, 8)])
def test_quant_linear_is_linear_on_the_dequantized_weight(bias, block_n):
    torch.manual_seed(0)
    linear = nn.Linear(200, 24, bias=bias)
    q = QuantLinear.from_linear(linear, bits=4, group_size=64, block_n=block_n)
    assert q.quantized_weight.block_n == block_n
    x = torch.randn(2, 3, 200)
    w_hat = dequantize(q.quantized_weight).t()
    expected = nn.functional.linear(x, w_hat, linear.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert "bits=4" in repr(q)
    with pytest.raises(ValueError, match="200 input features"):
        q(torch.randn(2, 199))


def test_quant_linear_layout_is_row_blocks_unless_given():
    linear = nn.Linear(64, 48)
    assert {b: QuantLinear.from_linear(linear, b, 32).block_n for b in (3, 4)} == {3: 16, 4: 16}
    q = QuantLinear.from_linear(linear, 3, 32, block_n=0)
    assert q.block_n == 0 and q.packed.shape == (6, 48)
    blocked = QuantLinear.from_linear(linear, 3, 32).quantized_weight
    assert torch.equal(dequantize(q.quantized_weight), dequantize(blocked))


def test_quant_linear_state_moves_and_casts():
    q = QuantLinear.from_linear(nn.Linear(64, 8), bits=3, group_size=32)
    q(torch.randn(1, 64))
    q = q.to(torch.float16)
    assert q.packed.dtype == torch.int32 and q.scales.dtype == torch.float16
    assert q(torch.randn(1, 64).half()).dtype == torch.float16  # the cached fp32 weight was rebuilt
    assert set(q.state_dict()) == {"packed", "scales", "mins", "bias"}


def _tiny_model() -> LlamaForCausalLM:
    cfg = ModelConfig("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model.eval()


def _logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    attn = AttentionMetadata.build([], [list(range(n))], [n], list(range(n)), list(range(n)), torch.device("cpu"))
    cfg = model.config
    kv = [(torch.zeros(n, cfg.num_kv_heads, cfg.head_dim), torch.zeros(n, cfg.num_kv_heads, cfg.head_dim))
          for _ in range(cfg.num_layers)]
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), torch.arange(n), attn, kv)
        return model.compute_logits(hidden)


def test_quantize_model_replaces_every_projection_but_the_lm_head():
    model = _tiny_model()
    tokens = [5, 17, 42, 3, 77, 8]
    full = _logits(model, tokens)
    errors = {}
    for bits in (8, 4, 2):
        quantized = copy.deepcopy(model)
        names = quantize_model_(quantized, bits, group_size=32)
        projections = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        assert names == [f"layers.{i}.{p}" for i in range(2) for p in projections]
        assert isinstance(quantized.lm_head, nn.Linear) and not isinstance(quantized.lm_head, QuantLinear)
        errors[bits] = rel_err(_logits(quantized, tokens), full)
    assert errors[8] < 1e-2 < errors[2]
    assert errors[8] < errors[4] < errors[2]


@pytest.mark.skipif(not ON_GPU, reason="the fused kernel path runs on CUDA")
def test_quant_linear_on_gpu_matches_its_cpu_path():
    for block_n in (0, 8, 16):  # the CUDA tensor-core kernel where it runs (0, 16), Triton (8)
        linear = nn.Linear(4096, 1024, bias=True)
        q = QuantLinear.from_linear(linear, bits=4, group_size=128, block_n=block_n).to(torch.bfloat16)
        for m in (1, 3):
            x = torch.randn(m, 4096).bfloat16()
            assert rel_err(q.to(DEVICE)(x.to(DEVICE)), q.cpu()(x)) < 1e-2, (block_n, m)
