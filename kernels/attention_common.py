"""Input checks shared by the paged attention kernels, so both refuse bad metadata with the same messages."""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32,)


def check_kv_index(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    num_seqs: int | None = None,
) -> int:
    """Validate shapes, dtypes and layouts (not the index values, which live on the device); return Hkv."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [tokens, Hq, D] with contiguous head rows, got {tuple(q.shape)}")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be alike and [num_slots, Hkv, D]")
    if k_cache.stride(2) != 1:
        raise ValueError("cache head rows must be contiguous")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, cache has {k_cache.shape[2]}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"Hq ({num_q_heads}) must be a multiple of Hkv ({num_kv_heads})")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError("q and the caches must share one dtype")
    seqs = q.shape[0] if num_seqs is None else num_seqs
    if kv_indptr.dtype not in _INDEX_DTYPES or kv_indices.dtype not in _INDEX_DTYPES:
        raise ValueError("kv_indptr and kv_indices must be int32")
    if kv_indptr.shape != (seqs + 1,) or kv_indices.dim() != 1 or not kv_indices.is_contiguous():
        raise ValueError(f"kv_indptr must be [{seqs + 1}] and kv_indices a contiguous 1-D tensor")
    return num_kv_heads


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dot products (Triton defaults to tf32, which breaks fp32 parity tests)."""
    return "ieee" if dtype == torch.float32 else "tf32"
