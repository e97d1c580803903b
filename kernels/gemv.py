"""Decode-sized linear layers: y = x @ W.T (+ bias) for a few rows of x, as a pure weight stream.

At batch 1-16 a projection reads W once and does almost no arithmetic per byte, so its time is W's bytes over
bandwidth. Each program owns BLOCK_N output columns and streams those rows of W in BLOCK_K tiles through a
cp.async pipeline; the few rows of x ride along as one 16-row MMA tile. On the H100 this matched or beat cuBLAS
on every Llama-3.1-8B / 3.2-1B decode projection (up to 11%; 8-9% on the LM heads) in the sweep of
benchmarks/kernels_roofline.py --sweep, which picked the launch configurations. A variant with the preceding residual add + RMSNorm fused in was
measured slower (46 vs 25 us on the 8B QKV projection): every program must re-derive the row's RMS before its
weight stream starts, and the padded 16-row x tiles crowd the pipeline's shared memory.

The MLP's SiLU(gate) * up, by contrast, is elementwise: with `silu_mul=True` the down projection reads the fused
gate/up output and applies the activation to each x tile as it loads it, which saves a launch per layer (the
activation kernel and its gap in the graph cost more than the work). Only the next power of two of the real rows
is activated, then repeated to the 16-row MMA tile, so the extra exponentials are few; rounding is that of
kernels/activation.py, so the product is the same as the unfused pair.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # one MMA tile of rows: every program multiplies all rows by its slice of W


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        if SILU_MUL:  # x row = [gate | up]; activate ROWS rows, repeat them over the tile (extra rows not stored)
            r = tl.arange(0, ROWS)
            xmask = (r < M)[:, None] & kmask[None, :]
            g = tl.load(x_ptr + r[:, None] * stride_xm + k[None, :], mask=xmask, other=0.0)
            u = tl.load(x_ptr + r[:, None] * stride_xm + K + k[None, :], mask=xmask, other=0.0)
            gf = g.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
            xa = (act * u.to(tl.float32)).to(g.dtype)
            x = tl.reshape(tl.broadcast_to(xa[None, :, :], [BLOCK_M // ROWS, ROWS, BLOCK_K]), [BLOCK_M, BLOCK_K])
        else:
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
            )
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wn + k[None, :],
            mask=cmask[:, None] & kmask[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_mask = rmask[:, None] & cmask[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), from an H100 sweep of 18 configurations over the Llama-3.1-8B
    and 3.2-1B decode projections at one row: within 4% of the best on each, and never behind cuBLAS."""
    if k >= 8192:  # long rows (down projections): deep K tiles
        return 32, 512, 4, 4
    if n >= 16384:  # many columns (gate/up, LM head): wide N tiles, still ~2 programs per SM or more
        return 64, 256, 4, 4
    return 32, 256, 4, 4


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int] | None = None,
    silu_mul: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in `out_dtype` (default weight.dtype).

    Accumulates in fp32 and rounds once, like cuBLAS. With `silu_mul`, x is [M, 2K] = [gate | up] and the
    product is silu_and_mul(x) @ weight.T. `out` ([M, N] with contiguous rows, e.g. a CUDA graph's static logits
    buffer) receives the result instead of a new tensor. `config` overrides (BLOCK_N, BLOCK_K, num_warps,
    num_stages), for tuning.
    """
    m = x.shape[0]
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    n = weight.shape[0]
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows, got {m}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1 or (silu_mul and x.shape[1] != 2 * k):
        raise ValueError(f"weight must be [N, {k}] with contiguous rows" + (" and x [M, 2K]" if silu_mul else ""))
    if x.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x must have contiguous rows and the weight's dtype")
    if bias is not None and bias.shape != (n,):
        raise ValueError("bias must be [N]")
    dtype = out_dtype or weight.dtype
    if out is None:
        out = torch.empty((m, n), dtype=dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != dtype or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be [{m}, {n}] {dtype} on {x.device} with contiguous rows")
    block_n, block_k, warps, stages = config or _config(n, k)
    if config is None and weight.element_size() > 2:
        block_k //= weight.element_size() // 2  # same bytes per stage: fp32 tiles would overflow shared memory
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        SILU_MUL=silu_mul,
        BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ROWS=triton.next_power_of_2(m) if silu_mul else MAX_ROWS,
        num_warps=warps,
        num_stages=stages,
    )
    return out
