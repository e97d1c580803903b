"""Grammar token-bitmask apply: logits of disallowed tokens become -inf, in place.

Layout is xgrammar's: int32 words [B, ceil(V/32)], bit j of word w set = token 32*w + j allowed. As in xgrammar's
`apply_token_bitmask_inplace`, only the first `vocab_size` columns are touched (default: what both the logits and
the mask cover), and `indices` restricts the work to those batch rows (row b of the mask applies to row b of the
logits either way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bitmask_kernel(
    logits_ptr, bitmask_ptr, indices_ptr, vocab, stride_l, stride_m, HAS_INDICES: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0)
    row = i.to(tl.int64)
    if HAS_INDICES:
        row = tl.load(indices_ptr + i).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    words = tl.load(bitmask_ptr + row * stride_m + cols // 32, mask=mask, other=-1)
    banned = ((words >> (cols % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_l + cols, float("-inf"), mask=mask & banned)


def apply_token_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    indices: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> None:
    """Set logits [B, V] to -inf wherever `bitmask` [R, ceil(V/32)] int32 has a 0 bit (in place).

    Mask row b applies to logits row b; with `indices` (1-D int tensor on the logits' device) only those rows
    are touched.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [B, V] with contiguous rows")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.stride(1) != 1:
        raise ValueError("bitmask must be int32 [rows, words] with contiguous rows")
    if indices is None and bitmask.shape[0] != logits.shape[0]:
        raise ValueError("without indices, bitmask needs one row per logits row")
    if indices is not None and indices.dim() != 1:
        raise ValueError("indices must be 1-D")
    vocab = min(logits.shape[1], bitmask.shape[1] * 32) if vocab_size is None else vocab_size
    if not 0 <= vocab <= min(logits.shape[1], bitmask.shape[1] * 32):
        raise ValueError("vocab_size exceeds what the logits or the bitmask cover")
    rows = bitmask.shape[0] if indices is None else indices.shape[0]
    if rows == 0 or vocab == 0:
        return
    block = min(4096, triton.next_power_of_2(vocab))
    _bitmask_kernel[(rows, triton.cdiv(vocab, block))](
        logits,
        bitmask,
        indices if indices is not None else bitmask,
        vocab,
        logits.stride(0),
        bitmask.stride(0),
        HAS_INDICES=indices is not None,
        BLOCK=block,
        num_warps=4,
    )
