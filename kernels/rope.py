"""Rotary position embedding (rotate-half layout, as transformers' Llama/Qwen), optionally fused with the KV append.

cos/sin come from a precomputed fp32 table indexed by position rather than from in-kernel sin/cos: the table
is computed once with torch exactly as transformers computes it, and a gather is cheaper than accurate
transcendental functions at large positions. Products and sums are rounded to the activation dtype in the same
places as transformers' `apply_rotary_pos_emb`, so the results agree bit for bit wherever the fp32 cos/sin do.

The fused form writes rotated K and plain V straight into the paged cache at each token's slot, so K never makes
a round trip through memory between the two ops. A slot < 0 means "do not write" (padding rows of a CUDA-graph
batch bucket).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """fp32 table [max_positions, head_dim]: cos of each pair's angle in the first half, sin in the second.

    `inv_freq` [head_dim // 2] carries any frequency scaling (linear, Llama 3, GGUF freq factors): the model's
    rotary embedding computes it. The angle is position * inv_freq in fp32, as transformers computes it.
    """
    pos = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


@triton.jit
def _rotate(x_ptr, row, stride_t, stride_h, heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Load one token's heads [BLOCK_H, 2*HALF] and return the two rotated halves, rounded like transformers."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    base = x_ptr + row * stride_t + h * stride_h + d
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    c = c.to(dt).to(tl.float32)
    s = s.to(dt).to(tl.float32)
    a1 = (x1.to(tl.float32) * c).to(dt).to(tl.float32)
    b1 = (x2.to(tl.float32) * s).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s).to(dt).to(tl.float32)
    return (a1 - b1).to(dt), (a2 + b2).to(dt), h, d, mask


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_out_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_h,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    c = tl.load(cos_sin_ptr + pos * (2 * HALF) + d)
    s = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + d)

    o1, o2, h, d, mask = _rotate(q_ptr, t, stride_qt, stride_qh, num_q_heads, c, s, HALF, BLOCK_HQ)
    q_out = q_out_ptr + t * num_q_heads * 2 * HALF + h * 2 * HALF + d
    tl.store(q_out, o1, mask=mask)
    tl.store(q_out + HALF, o2, mask=mask)

    o1, o2, h, d, mask = _rotate(k_ptr, t, stride_kt, stride_kh, num_kv_heads, c, s, HALF, BLOCK_HKV)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            dst = k_cache_ptr + slot * stride_cache_slot + h * stride_cache_h + d
            tl.store(dst, o1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, o2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            src = v_ptr + t * stride_vt + h * stride_vh + d
            dst = v_cache_ptr + slot * stride_cache_slot + h * stride_cache_h + d
            tl.store(dst, tl.load(src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, tl.load(src + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        k_out = k_out_ptr + t * num_kv_heads * 2 * HALF + h * 2 * HALF + d
        tl.store(k_out, o1, mask=mask)
        tl.store(k_out + HALF, o2, mask=mask)


def _check_heads(t: torch.Tensor, name: str, tokens: int, head_dim: int) -> None:
    if t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != head_dim or t.stride(2) != 1:
        raise ValueError(f"{name} must be [{tokens}, heads, {head_dim}] with contiguous head rows, got {tuple(t.shape)}")


def _check_common(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> int:
    tokens, _, head_dim = q.shape
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be an even power of two, got {head_dim}")
    _check_heads(q, "q", tokens, head_dim)
    _check_heads(k, "k", tokens, head_dim)
    if positions.shape != (tokens,):
        raise ValueError("positions must be [tokens]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError("cos_sin_cache must be fp32 [max_positions, head_dim]")
    if not cos_sin_cache.is_contiguous():
        raise ValueError("cos_sin_cache must be contiguous")
    return head_dim


def _launch(q, k, v, positions, cos_sin_cache, q_out, k_out, slots, k_cache, v_cache, write_cache: bool) -> None:
    head_dim = q.shape[2]
    _rope_kernel[(q.shape[0],)](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        q_out,
        k_out,
        slots,
        k_cache,
        v_cache,
        q.shape[1],
        k.shape[1],
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HKV=triton.next_power_of_2(k.shape[1]),
        WRITE_CACHE=write_cache,
        num_warps=4,
    )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (views with strided tokens/heads are fine) by `positions` [T].

    Returns new contiguous tensors. The table comes from `rope_cos_sin_cache`.
    """
    _check_common(q, k, positions, cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0]:
        _launch(q, k, k, positions, cos_sin_cache, q_out, k_out, positions, k_out, k_out, write_cache=False)
    return q_out, k_out


def rope_kv_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k by `positions`, write rotated k and v into the caches at `slots`; return rotated q.

    Caches are [num_slots, Hkv, D]; a negative slot skips that token's write.
    """
    head_dim = _check_common(q, k, positions, cos_sin_cache)
    _check_heads(v, "v", q.shape[0], head_dim)
    if v.shape != k.shape or slots.shape != (q.shape[0],):
        raise ValueError("v must match k, and slots must be [tokens]")
    if k_cache.shape != v_cache.shape or k_cache.shape[1:] != k.shape[1:] or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be alike and [num_slots, Hkv, D]")
    if k_cache.stride(2) != 1:
        raise ValueError("cache head rows must be contiguous")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0]:
        _launch(q, k, v, positions, cos_sin_cache, q_out, q_out, slots, k_cache, v_cache, write_cache=True)
    return q_out
