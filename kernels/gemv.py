"""Decode-sized linear layers (a few rows) with the ops around them fused in: residual add + RMSNorm before, bias
and SiLU*mul after.

At batch 1-8 a projection is a weight stream: each program owns a slice of output columns and streams its rows
of W once, so time is bytes over bandwidth and everything else in a decoder layer is launch latency. Fusing the
norm in front (each program re-derives the row's RMS from x, which is a few KB and sits in L2) and the gate in
the back removes the RMSNorm and SiLU*mul launches and the round trips of their outputs: a layer becomes
norm+QKV, RoPE+KV append, attention, O, norm+gate/up+SiLU, down. The norm rounds like kernels/norm.py and the
gate like kernels/activation.py (transformers' order of roundings), so the fused and unfused paths agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # one MMA tile of rows: every program multiplies all rows by its slice of W


@triton.jit
def _gemv_kernel(
    x_ptr,
    res_ptr,
    norm_w_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    res_out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_om,
    stride_rom,
    eps,
    NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    kk = tl.arange(0, BLOCK_K)
    dt = w_ptr.dtype.element_ty

    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM:
        sq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            m2 = rmask[:, None] & (k < K)[None, :]
            h = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=m2, other=0.0)
            if HAS_RES:
                r = tl.load(res_ptr + rows[:, None] * stride_rm + k[None, :], mask=m2, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(dt)
                if pid == 0:
                    tl.store(res_out_ptr + rows[:, None] * stride_rom + k[None, :], h, mask=m2)
            hf = h.to(tl.float32)
            sq += hf * hf
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        m2 = rmask[:, None] & kmask[None, :]
        h = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=m2, other=0.0)
        if NORM:
            if HAS_RES:
                r = tl.load(res_ptr + rows[:, None] * stride_rm + k[None, :], mask=m2, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(dt)
            g = tl.load(norm_w_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            h = ((h.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * g[None, :]).to(dt)
        wmask = cmask[:, None] & kmask[None, :]
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + k[None, :], mask=wmask, other=0.0)
        acc = tl.dot(h.to(dt), tl.trans(w), acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_ptr + (cols[:, None] + N).to(tl.int64) * stride_wn + k[None, :], mask=wmask, other=0.0)
            acc_up = tl.dot(h.to(dt), tl.trans(w_up), acc_up, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        gate = acc.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        acc = act * acc_up.to(dt).to(tl.float32)
    out_mask = rmask[:, None] & cmask[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): enough programs to cover every SM twice, deep enough K tiles
    to keep tens of KB of W in flight per SM."""
    block_n = 16 if n <= 8192 else 32
    return block_n, 256, 4, 4


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = h @ weight.T (+ bias) for x [M <= 16, K], weight [N, K] (contiguous rows).

    With `norm_weight`, h = rmsnorm(x + residual) * norm_weight (residual optional), else h = x. With `gated`,
    weight is cat(gate, up) [2I, K] and y = silu(h @ gate.T) * (h @ up.T), [M, I]. Returns (y in `out_dtype`,
    default weight.dtype; x + residual when a residual is given, else None). `config` overrides the launch
    configuration (BLOCK_N, BLOCK_K, num_warps, num_stages), for tuning.
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows, got {m}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1 or (gated and weight.shape[0] % 2):
        raise ValueError("weight must be [N, K] (even N when gated) with contiguous rows")
    if x.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x must have contiguous rows and the weight's dtype")
    if residual is not None and (norm_weight is None or residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError("a residual needs norm_weight and must match x")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError("bias must be [N]")
    if bias is not None and gated:
        raise ValueError("the gated form takes no bias")
    out = torch.empty((m, n), dtype=out_dtype or weight.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    block_n, block_k, warps, stages = config or _config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else weight,
        weight,
        bias if bias is not None else weight,
        out,
        res_out if res_out is not None else out,
        m,
        n,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        weight.stride(0),
        out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        eps,
        NORM=norm_weight is not None,
        HAS_RES=residual is not None,
        HAS_BIAS=bias is not None,
        GATED=gated,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out, res_out
