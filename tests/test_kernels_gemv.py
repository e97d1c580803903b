"""Decode GEMV with fused residual+RMSNorm, bias and SiLU*mul against the unfused torch composition."""

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
    "m,n,k,norm,res,bias,gated",
    [
        (1, 48, 96, False, False, False, False),  # plain, N and K not multiples of the tiles
        (3, 80, 300, True, False, True, False),  # norm + bias (Qwen2 QKV), K spans two tiles
        (5, 40, 64, True, True, False, False),  # residual add + norm
        (2, 2 * 36, 100, True, True, False, True),  # residual + norm + gate/up + SiLU*mul
    ],
)
def test_gemv_matches_unfused_torch(dtype, m, n, k, norm, res, bias, gated):
    torch.manual_seed(m * n + k)
    x = _rand(m, k, dtype=dtype)
    w = _rand(n, k, dtype=dtype, scale=k**-0.5)
    kwargs = {
        "bias": _rand(n, dtype=dtype) if bias else None,
        "norm_weight": _rand(k, dtype=dtype) if norm else None,
        "residual": _rand(m, k, dtype=dtype) if res else None,
        "eps": 1e-5,
        "gated": gated,
    }
    with nan_allocations():
        out, summed = gemv(x, w, **kwargs)
    ref, ref_summed = gemv_reference(x, w, **kwargs)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    if res:
        assert torch.equal(summed, ref_summed)
    else:
        assert summed is None


def test_gemv_fp32_logits_and_bad_input():
    x = _rand(2, 64, dtype=HALF)
    w = _rand(40, 64, dtype=HALF)
    out, _ = gemv(x, w, norm_weight=_rand(64, dtype=HALF), out_dtype=torch.float32)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="rows"):
        gemv(_rand(17, 64, dtype=HALF), w)
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=x)
    with pytest.raises(ValueError, match="dtype"):
        gemv(x.float(), w)
