"""Paged attention for decode (one query token per sequence), split over the KV length, GQA-aware.

KV layout is the engine's token-level index (engine/batch.py): each sequence attends a list of cache slots,
given here in CSR form (`kv_indptr` [B+1], `kv_indices` [nnz] of slots, slot = page * page_size + offset) over
caches shaped [num_slots, Hkv, D]. Since the index is per token, any page size and any slot order work.

One program handles one (sequence, KV head, split): it loads the group's query heads together so each K/V row
is read once for all of them, and runs an online softmax over its share of the sequence. With more than one
split, a second small kernel merges the partial results through their log-sum-exp. Splitting keeps the GPU busy
at small batch sizes, where (sequences x KV heads) alone would occupy a fraction of the SMs. The split count is a
fixed launch parameter, not derived from the lengths, so the launch can be captured in a CUDA graph and replayed
for any lengths; splits that fall past a sequence's end just write an empty state.

The returned log-sum-exp is in natural-log units: lse = log(sum_j exp(q.k_j * sm_scale)). An empty sequence
gives output 0 and lse -inf.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_common import check_kv_index, dot_precision

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    o_ptr,
    lse_ptr,
    scale_log2,
    head_dim,
    stride_qb,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(kv_indptr_ptr + b)
    length = tl.load(kv_indptr_ptr + b + 1) - start
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < head_dim
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_head_off = kvh.to(tl.int64) * stride_ch
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        slot = tl.load(kv_indices_ptr + start + n, mask=nmask, other=0).to(tl.int64)
        row = slot[:, None] * stride_cs + kv_head_off + d[None, :]
        lmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + row, mask=lmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row, mask=lmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    nonempty = l_sum > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_sum, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
    smask = gmask[:, None] & dmask[None, :]
    o_off = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    l_off = b.to(tl.int64) * stride_lb + heads * stride_lh + split
    if SPLITS == 1:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=smask)
        tl.store(lse_ptr + l_off, lse * 0.6931471805599453, mask=gmask)
    else:
        tl.store(o_ptr + o_off, out, mask=smask)
        tl.store(lse_ptr + l_off, lse, mask=gmask)


@triton.jit
def _decode_merge_kernel(
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    lse_ptr,
    head_dim,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lh,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < SPLITS
    dmask = d < head_dim
    lse_s = tl.load(part_lse_ptr + b * stride_plb + h * stride_plh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)
    total = tl.sum(w, axis=0)
    o_s = tl.load(
        part_o_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=smask[:, None] & dmask[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * o_s, axis=0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, (m_safe + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=dmask)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh, lse)


def decode_num_splits(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """Splits per (sequence, KV head) so that the split kernel has about two programs per SM."""
    return max(1, min(max_splits, math.ceil(2 * num_sms / max(1, batch_size * num_kv_heads))))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int = 1,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over its KV index.

    q [B, Hq, D]; k_cache, v_cache [num_slots, Hkv, D]; kv_indptr [B+1] int32 (CSR offsets into kv_indices);
    kv_indices [>= nnz] int32 slots. Returns (o [B, Hq, D] in q.dtype, lse [B, Hq] fp32, natural log).
    `sm_scale` defaults to 1/sqrt(D). `num_splits` (see `decode_num_splits`) only changes how the work is
    spread, not the result beyond rounding.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = check_kv_index(q, k_cache, v_cache, kv_indptr, kv_indices)
    if num_splits < 1 or block_n < 16 or block_n & (block_n - 1):
        raise ValueError("num_splits must be >= 1 and block_n a power of two >= 16")
    group = num_q_heads // num_kv_heads
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)) * _LOG2E
    o = torch.empty_like(q)
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return o, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits == 1:
        part_o, part_lse = o, lse
        pstrides = (o.stride(0), o.stride(1), 0, lse.stride(0), lse.stride(1))
    else:
        part_o = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        pstrides = (part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        kv_indptr,
        kv_indices,
        part_o,
        part_lse,
        scale,
        head_dim,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        *pstrides,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        SPLITS=num_splits,
        PRECISION=dot_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_q_heads)](
            part_o,
            part_lse,
            o,
            lse,
            head_dim,
            part_o.stride(0),
            part_o.stride(1),
            part_o.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            o.stride(0),
            o.stride(1),
            lse.stride(0),
            lse.stride(1),
            SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=1,
        )
    return o, lse
