"""GGUF Q4_0 / Q4_1 matrices (and a Q8_0 LM head) served 4-bit on CPU agree with the gguf package's own
dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from treadle.engine.models.int4_cpu import Int4Head, Int4Linear, pack_int4, packable, q4_blocks, q8_blocks_as_int4


@pytest.fixture(params=[GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1], ids=["Q4_0", "Q4_1"])
def stored(request):
    rng = np.random.default_rng(0)
    # Per-row offsets make the Q4_1 minimums matter.
    w = (0.05 * rng.standard_normal((96, 128)) + rng.uniform(-0.03, 0.03, (96, 1))).astype(np.float32)
    raw = quantize(w, request.param)
    return raw, request.param, dequantize(raw, request.param)


def test_block_parsing_reproduces_dequantization(stored):
    raw, qtype, reference = stored
    q, scale, zero = q4_blocks(raw, qtype)
    assert q.min() >= 0 and q.max() <= 15
    ours = (q.reshape(96, -1, 32) - 8.0) * scale[..., None] + zero[..., None]
    np.testing.assert_allclose(ours.reshape(96, 128), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [5, 40], ids=["int4-kernel", "dense-copy"])
def test_int4_linear_matches_dequantized_matmul(stored, rows):
    raw, qtype, reference = stored
    layer = Int4Linear(128, 96, bias=True)
    for name, value in pack_int4(*q4_blocks(raw, qtype)).items():
        setattr(layer, name, value)
    layer.weight = torch.nn.Parameter(torch.from_numpy(reference).bfloat16(), requires_grad=False)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(1))
    layer.bias = torch.nn.Parameter(bias.bfloat16(), requires_grad=False)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = x.float() @ torch.from_numpy(reference).T + bias.bfloat16().float()
    got = layer(x).float()
    # bfloat16 activations, scales and output: about 3 significant digits.
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_only_tileable_q4_matrices_are_packed():
    q4, q8 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
    assert packable([q4, q4, GGMLQuantizationType.Q4_0], 960)
    assert not packable([q4, q8], 960)
    assert not packable([q4], 968)


def test_q8_head_halves_rebuild_the_stored_values_exactly():
    rng = np.random.default_rng(3)
    w = (0.05 * rng.standard_normal((64, 128))).astype(np.float32)
    w[5, 7] = 0.9  # a block whose largest value maps to q = 127, and its negative to q = -127
    w[9, 40] = -0.9
    raw = quantize(w, GGMLQuantizationType.Q8_0)
    reference = dequantize(raw, GGMLQuantizationType.Q8_0)
    q, scale, zero = q8_blocks_as_int4(raw)
    assert q.shape == (128, 128) and q.min() >= 0 and q.max() <= 15
    halves = (q.reshape(128, -1, 32) - 8.0) * scale[..., None] + zero[..., None]
    np.testing.assert_array_equal(halves[:64].reshape(64, 128) + halves[64:].reshape(64, 128), reference)

    head = Int4Head(64, 128)
    for name, value in pack_int4(q, scale, zero).items():
        setattr(head, name, value)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    expected = x.float() @ torch.from_numpy(reference).T
    assert (head(x) - expected).abs().max() <= 1e-2 * expected.abs().max()
