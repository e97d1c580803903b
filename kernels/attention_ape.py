"""APE's two-part attention on the GPU: the paged prefill and decode kernels, then a log-sum-exp merge.

Part R (the sequence's own index: shared prefix, query, generated) is causal with an offset, which is exactly
`paged_prefill_attention`. Part C (the union of the cached contexts) is non-causal: every new token sees every
context slot, so each token runs as its own one-query "sequence" of `paged_decode_attention` over the same slot
list, with sm_scale / T. Both kernels return natural-log LSE, and the merge below works in natural log too, so
`factor` = S·T scales C's LSE on the same base (features brief B3: mixing bases is a known bug).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_decode import decode_num_splits, paged_decode_attention
from .attention_prefill import paged_prefill_attention

_MAX_INDEX_ENTRIES = 1 << 24  # int32 slots of the repeated context index per decode-kernel call (64 MiB)


@triton.jit
def _ape_merge_kernel(
    o_r_ptr,
    lse_r_ptr,
    o_c_ptr,
    lse_c_ptr,
    out_ptr,
    factor,
    first_query,
    head_dim,
    stride_ot,
    stride_oh,
    stride_lt,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    off = tok * stride_ot + h * stride_oh + d
    o_r = tl.load(o_r_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    o_c = tl.load(o_c_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    b = tl.load(lse_r_ptr + tok * stride_lt + h)
    a = tl.load(lse_c_ptr + tok * stride_lt + h) * factor
    a = tl.where(tok >= first_query, a, float("-inf"))  # shared-prefix tokens never attend the contexts
    m = tl.maximum(a, b)
    w_c = tl.exp(a - m)
    w_r = tl.exp(b - m)
    out = (w_c * o_c + w_r * o_r) / (w_c + w_r)
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=dmask)


def ape_merge(
    o_r: torch.Tensor, lse_r: torch.Tensor, o_c: torch.Tensor, lse_c: torch.Tensor, factor: float, first_query: int
) -> torch.Tensor:
    """(w_C·O_C + w_R·O_R) / (w_C + w_R), ln w_C = factor·lse_C (0 weight for rows before `first_query`),
    ln w_R = lse_R. o_* [n, H, D] alike and contiguous, lse_* [n, H] fp32 natural log -> [n, H, D] in o_r's dtype."""
    if o_r.shape != o_c.shape or lse_r.shape != lse_c.shape or lse_r.shape != o_r.shape[:2]:
        raise ValueError("o_r, o_c must be [n, H, D] and lse_r, lse_c [n, H]")
    o_r, o_c, lse_r, lse_c = o_r.contiguous(), o_c.contiguous(), lse_r.contiguous(), lse_c.contiguous()
    n, heads, head_dim = o_r.shape
    out = torch.empty_like(o_r)
    if n:
        _ape_merge_kernel[(n, heads)](
            o_r, lse_r, o_c, lse_c, out, factor, first_query, head_dim, o_r.stride(0), o_r.stride(1),
            lse_r.stride(0), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        )
    return out


def ape_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    context_slots: torch.Tensor,
    first_query: int,
    sm_scale: float,
    temperature: float,
    scale: float,
) -> torch.Tensor:
    """One APE sequence's new tokens q [n, H, D] (their K/V already written at the tail of `slots`) -> [n, H, D].

    `slots` is the sequence's own KV index (causal part), `context_slots` the contexts' union; T = `temperature`,
    S = `scale`."""
    n = q.shape[0]
    q = q.contiguous()
    dev = q.device
    r_idx = slots.to(torch.int32)
    o_r, lse_r = paged_prefill_attention(
        q, k_cache, v_cache, torch.tensor([0, n], dtype=torch.int32, device=dev),
        torch.tensor([0, r_idx.numel()], dtype=torch.int32, device=dev), r_idx, n, sm_scale=sm_scale,
    )
    c_idx = context_slots.to(torch.int32)
    num_ctx = c_idx.numel()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    rows = max(1, _MAX_INDEX_ENTRIES // max(1, num_ctx))  # every row repeats the index: bound its copies
    parts = []
    for start in range(0, n, rows):
        m = min(rows, n - start)
        indptr = torch.arange(m + 1, dtype=torch.int32, device=dev) * num_ctx
        parts.append(paged_decode_attention(
            q[start : start + m], k_cache, v_cache, indptr, c_idx.repeat(m), sm_scale=sm_scale / temperature,
            num_splits=decode_num_splits(m, k_cache.shape[1], sms),
        ))
    o_c = torch.cat([o for o, _ in parts])
    lse_c = torch.cat([lse for _, lse in parts])
    return ape_merge(o_r, lse_r, o_c, lse_c, scale * temperature, first_query)
