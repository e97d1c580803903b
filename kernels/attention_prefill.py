"""Paged attention for prefill and extend: several new tokens per sequence on top of a cached prefix.

Same KV index as the decode kernel (CSR `kv_indptr`/`kv_indices` of cache slots over [num_slots, Hkv, D] caches),
plus `qo_indptr` giving each sequence's run of new tokens in q. The new tokens' K/V must already be in the cache
(the tail of each sequence's index), and new token i of a sequence with C cached entries attends index entries
0..C+i: causal with an offset, which covers plain prefill (C = 0), chunked prefill and prefix-cache hits alike.

One program handles a block of one sequence's new tokens for one query head and walks the KV index only up to
the causal limit of its last row. The returned log-sum-exp is in natural-log units, per (token, head).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_common import check_kv_index, dot_precision

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    qo_indptr_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    o_ptr,
    lse_ptr,
    scale_log2,
    head_dim,
    stride_qt,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_ot,
    stride_oh,
    stride_lt,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m_blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + b)
    q_len = tl.load(qo_indptr_ptr + b + 1) - q_start
    kv_start = tl.load(kv_indptr_ptr + b)
    kv_len = tl.load(kv_indptr_ptr + b + 1) - kv_start
    cached = kv_len - q_len

    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    tok = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)

    # Keys past the causal limit of this block's last row are never needed; a block past the end does nothing.
    hi = tl.minimum(kv_len, cached + (m_blk + 1) * BLOCK_M)
    hi = tl.where(m_blk * BLOCK_M < q_len, hi, 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_head_off = (h // GROUP).to(tl.int64) * stride_ch
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        slot = tl.load(kv_indices_ptr + kv_start + n, mask=nmask, other=0).to(tl.int64)
        row = slot[:, None] * stride_cs + kv_head_off + d[None, :]
        lmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + row, mask=lmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        allowed = nmask[None, :] & (n[None, :] <= cached + rows[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row, mask=lmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    nonempty = l_sum > 0
    out = acc / tl.where(nonempty, l_sum, 1.0)[:, None]
    lse = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, l_sum, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(
        o_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )
    tl.store(lse_ptr + tok * stride_lt + h, lse, mask=rmask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_q_len: int,
    sm_scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-with-offset attention of each sequence's new tokens over its whole KV index.

    q [T, Hq, D] (sequences' new tokens back to back); qo_indptr [B+1] int32 offsets into q; kv_indptr [B+1]
    int32 and kv_indices [>= nnz] int32 slots; each sequence needs kv_len >= q_len. `max_q_len` (known to the
    caller without a device sync) sizes the grid. Returns (o [T, Hq, D] in q.dtype, lse [T, Hq] fp32, natural log).
    The block sizes, warps and pipeline stages only change speed.
    """
    tokens, num_q_heads, head_dim = q.shape
    batch = qo_indptr.shape[0] - 1
    num_kv_heads = check_kv_index(q, k_cache, v_cache, kv_indptr, kv_indices, num_seqs=batch)
    if qo_indptr.dtype != torch.int32 or qo_indptr.dim() != 1:
        raise ValueError("qo_indptr must be a 1-D int32 tensor")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16")
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)) * _LOG2E
    o = torch.empty_like(q)
    lse = torch.empty((tokens, num_q_heads), dtype=torch.float32, device=q.device)
    if tokens == 0 or batch == 0 or max_q_len <= 0:
        return o, lse
    _prefill_kernel[(triton.cdiv(max_q_len, block_m), num_q_heads, batch)](
        q,
        k_cache,
        v_cache,
        qo_indptr,
        kv_indptr,
        kv_indices,
        o,
        lse,
        scale,
        head_dim,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return o, lse
