"""Decode-sized linear layers: y = x @ W.T (+ bias) for a few rows of x, as a pure weight stream.

At batch 1-16 a projection reads W once and does almost no arithmetic per byte, so its time is W's bytes over
bandwidth. Each program owns BLOCK_N output columns and streams those rows of W in BLOCK_K tiles through a
cp.async pipeline; the few rows of x ride along as one 16-row MMA tile. On the H100 this matched or beat cuBLAS
on every Llama-3.1-8B / 3.2-1B decode projection (up to 11%; 8-9% on the LM heads) in the sweep of
benchmarks/kernels_roofline.py --sweep, which picked the launch configurations. A variant with the preceding residual add + RMSNorm fused in was
measured slower (46 vs 25 us on the 8B QKV projection): every program must re-derive the row's RMS before its
weight stream starts, and the padded 16-row x tiles crowd the pipeline's shared memory.

The MLP's SiLU(gate) * up, by contrast, fuses for free into the gate/up projection's epilogue (`silu_mul=True`):
each program takes matching rows of the gate and up halves of the stacked weight, interleaved, so its tile holds
both factors of its outputs; it rounds them as the unfused projection would, applies kernels/activation.py's
formula and writes [M, I]. That saves the activation's launch per layer (in a graph replay a small kernel costs
2-3 us, more than its work) and a round trip of the [M, 2I] intermediate, for a few epilogue instructions.
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
):
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    if SILU_MUL:  # tile column 2j is gate row c + j, column 2j + 1 is up row N + c + j (N = I, the output width)
        half = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        cmask = half < N
        cols = half + (tl.arange(0, BLOCK_N) % 2) * N
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wn + k[None, :],
            mask=cmask[:, None] & kmask[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(acc.to(w_ptr.dtype.element_ty), [BLOCK_M, BLOCK_N // 2, 2]))
        gf = gate.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(w_ptr.dtype.element_ty).to(tl.float32)
        res = act * up.to(tl.float32)
        ocols = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_mask = rmask[:, None] & (ocols < N)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + ocols[None, :], res.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
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

    Accumulates in fp32 and rounds once, like cuBLAS. With `silu_mul`, weight (and bias) stack gate and up
    ([2I, K]) and the result is silu(gate) * up, [M, I], as kernels/activation.py computes it from the unfused
    product. `out` ([M, N] with contiguous rows, e.g. a CUDA graph's static logits buffer) receives the result
    instead of a new tensor. `config` overrides (BLOCK_N, BLOCK_K, num_warps, num_stages), for tuning.
    """
    m, k = x.shape
    n = weight.shape[0]
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows, got {m}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1 or (silu_mul and n % 2):
        raise ValueError(f"weight must be [N, {k}] with contiguous rows" + (", N even" if silu_mul else ""))
    if x.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x must have contiguous rows and the weight's dtype")
    if bias is not None and bias.shape != (n,):
        raise ValueError("bias must be [N]")
    n_out = n // 2 if silu_mul else n
    dtype = out_dtype or weight.dtype
    if out is None:
        out = torch.empty((m, n_out), dtype=dtype, device=x.device)
    elif out.shape != (m, n_out) or out.dtype != dtype or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be [{m}, {n_out}] {dtype} on {x.device} with contiguous rows")
    block_n, block_k, warps, stages = config or _config(n, k)
    if config is None and weight.element_size() > 2:
        block_k //= weight.element_size() // 2  # same bytes per stage: fp32 tiles would overflow shared memory
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n_out,
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
        num_warps=warps,
        num_stages=stages,
    )
    return out
