"""Decode GEMV against torch's linear: odd sizes, bias, 1..16 rows, fp32 output, bad input."""

from __future__ import annotations

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU, nan_allocations, rel_err  # noqa: I001  (sets up the interpreter first)

from treadle.kernels.gemv import gemv
from treadle.kernels.reference import gemv_reference

# The interpreter multiplies bf16 tiles as raw integers (see test_kernels_attention.py); fp16 takes the same path.
HALF = torch.bfloat16 if ON_GPU else torch.float16
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize(
    "m,n,k,bias",
    [
        (1, 48, 96, False),  # N and K not multiples of the tiles
        (3, 80, 700, True),  # K spans two tiles, with a bias (Qwen2's QKV)
        (16, 40, 64, False),  # a full tile of rows
        (5, 16400, 96, False),  # the wide-N configuration
        (2, 24, 8200, False),  # the long-K configuration
    ],
)
def test_gemv_matches_torch_linear(dtype, m, n, k, bias):
    torch.manual_seed(m * n + k)
    x = _rand(m, k, dtype=dtype)
    w = _rand(n, k, dtype=dtype, scale=k**-0.5)
    b = _rand(n, dtype=dtype) if bias else None
    with nan_allocations():
        out = gemv(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, gemv_reference(x, w, b)) < TOL[dtype]


def test_gemv_fp32_output_and_bad_input():
    x = _rand(2, 64, dtype=HALF)
    w = _rand(40, 64, dtype=HALF)
    out = gemv(x, w, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and rel_err(out, gemv_reference(x, w, out_dtype=torch.float32)) < 1e-3
    with pytest.raises(ValueError, match="rows"):
        gemv(_rand(17, 64, dtype=HALF), w)
    with pytest.raises(ValueError, match="dtype"):
        gemv(x.float(), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(x, w, _rand(41, dtype=HALF))


@pytest.mark.parametrize("m,bias", [(1, False), (3, True), (16, False)])
def test_gemv_fused_silu_mul_matches_the_unfused_pair(m, bias):
    """Stacked [gate; up] weight: silu(gate) * up of the rounded projection (activation.py), written into `out`."""
    torch.manual_seed(m)
    k, inter = 96, 100  # I not a multiple of the half-tile: masked tail
    x = _rand(m, k, dtype=HALF)
    w = _rand(2 * inter, k, dtype=HALF, scale=2 * k**-0.5)
    b = _rand(2 * inter, dtype=HALF) if bias else None
    gate, up = gemv_reference(x, w, b).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate.float()).to(HALF).float() * up.float()
    out = torch.full((m, inter), float("nan"), dtype=torch.float32, device=DEVICE)
    got = gemv(x, w, b, out_dtype=torch.float32, silu_mul=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert rel_err(out, ref) < TOL[HALF]
    with pytest.raises(ValueError, match="N even"):
        gemv(x, w[1:], silu_mul=True)
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, w, out=torch.empty(m, 2 * inter + 1, dtype=HALF, device=DEVICE))
