"""Scatter new tokens' K and V into the paged cache at their slots (slot = page * page_size + offset).

Used on its own where K needs no rotation (or was rotated elsewhere); the decode path uses the fused
`rope.rope_kv_append` instead. A slot < 0 skips the token, so padded rows of a batch bucket write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_append_kernel(
    k_ptr,
    v_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    num_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_h,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_heads) & (d < head_dim)
        dst = slot * stride_cache_slot + h * stride_cache_h + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_append(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """Write k, v [T, Hkv, D] into k_cache, v_cache [num_slots, Hkv, D] at `slots` [T] (in place)."""
    if k.dim() != 3 or v.shape != k.shape or slots.shape != (k.shape[0],):
        raise ValueError("k and v must be [T, Hkv, D] alike and slots [T]")
    if k_cache.shape != v_cache.shape or k_cache.shape[1:] != k.shape[1:] or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be alike and [num_slots, Hkv, D]")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("head rows must be contiguous")
    if k.shape[0] == 0:
        return
    _kv_append_kernel[(k.shape[0],)](
        k,
        v,
        slots,
        k_cache,
        v_cache,
        k.shape[1],
        k.shape[2],
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        BLOCK_H=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(k.shape[2]),
        num_warps=4,
    )
