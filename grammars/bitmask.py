"""Token bitmasks in xgrammar's layout, and applying them to logits.

A bitmask row has ceil(vocab_size / 32) int32 words; token j is bit (j & 31) of word (j >> 5), 1 = allowed.
On CPU the mask is applied with torch; on CUDA with a Triton kernel when triton is importable (one pass over
the logits, no unpacked boolean tensor), else with torch.
"""

from __future__ import annotations

import torch

bitmask_dtype = torch.int32


def get_bitmask_shape(batch_size: int, vocab_size: int) -> tuple[int, int]:
    return (batch_size, (vocab_size + 31) // 32)


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed (-1) int32 bitmask on CPU; fill rows with GrammarMatcher.fill_next_token_bitmask."""
    return torch.full(get_bitmask_shape(batch_size, vocab_size), -1, dtype=bitmask_dtype)


def reset_token_bitmask(bitmask: torch.Tensor) -> None:
    bitmask.fill_(-1)


def _apply_torch(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int, indices) -> None:
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    rows = bitmask if indices is None else bitmask[indices]
    allowed = ((rows.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)[..., :vocab_size]
    if indices is None:
        logits[..., :vocab_size].masked_fill_(~allowed, float("-inf"))
    else:
        logits[indices, :vocab_size] = logits[indices, :vocab_size].masked_fill(~allowed, float("-inf"))


def _triton_kernel():
    """Builds the Triton kernel on first CUDA use; None when triton is unavailable."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL or None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _KERNEL = False
        return None

    @triton.jit
    def kernel(logits_ptr, bitmask_ptr, indices_ptr, vocab_size, logits_stride, bitmask_stride,
               HAS_INDICES: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = tl.load(indices_ptr + pid) if HAS_INDICES else pid
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < vocab_size
        words = tl.load(bitmask_ptr + row * bitmask_stride + offs // 32, mask=inside, other=-1)
        blocked = ((words >> (offs % 32)) & 1) == 0
        tl.store(logits_ptr + row * logits_stride + offs, -float("inf"), mask=inside & blocked)

    _KERNEL = (kernel, triton.cdiv)
    return _KERNEL


_KERNEL = None


def apply_token_bitmask_inplace(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    *,
    vocab_size: int | None = None,
    indices: list[int] | None = None,
) -> None:
    """Sets logits of disallowed tokens to -inf in place; `indices` limits it to those batch rows.

    logits is (batch, V) or (V,), bitmask (batch, W) or (W,) on the same device. Columns at or beyond
    vocab_size (default: min(V, 32 * W)) are left untouched.
    """
    if bitmask.dtype != bitmask_dtype:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    if logits.device != bitmask.device:
        raise ValueError(f"logits ({logits.device}) and bitmask ({bitmask.device}) must be on the same device")
    if logits.dim() != bitmask.dim() or logits.dim() not in (1, 2):
        raise ValueError("logits and bitmask must both be 1-D or both be 2-D")
    if logits.dim() == 2 and logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"batch mismatch: logits {logits.shape[0]} rows, bitmask {bitmask.shape[0]} rows")
    width = min(logits.shape[-1], bitmask.shape[-1] * 32)
    vocab_size = width if vocab_size is None else min(vocab_size, width)
    if indices is not None and logits.dim() == 1:
        raise ValueError("indices need 2-D logits")
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1 and bitmask.stride(-1) == 1:
        kt = _triton_kernel()
        if kt is not None:
            kernel, cdiv = kt
            block = 4096
            if indices is None:
                rows, idx = logits.shape[0], bitmask  # any pointer; unused without indices
            else:
                idx = torch.as_tensor(indices, dtype=torch.int64, device=logits.device)
                rows = len(indices)
            if rows:
                kernel[(rows, cdiv(vocab_size, block))](
                    logits, bitmask, idx, vocab_size, logits.stride(0), bitmask.stride(0),
                    HAS_INDICES=indices is not None, BLOCK=block,
                )
            return
    _apply_torch(logits, bitmask, vocab_size, indices)
