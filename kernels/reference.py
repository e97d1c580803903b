"""Plain-torch references for every kernel in this package, with the same signatures and semantics.

They are the definitions the kernels are tested against (call them with fp64 inputs for a high-precision
answer) and the `reference` of each op in the kernel registry. Written for clarity, not speed.
"""

from __future__ import annotations

import math

import torch


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    summed = x if residual is None else x + residual
    xf = summed.float() if summed.dtype != torch.float64 else summed
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed, (None if residual is None else summed)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :].to(q.dtype)
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :].to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    return rotate(q), rotate(k)


def kv_append_reference(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    keep = slots >= 0
    k_cache[slots[keep].long()] = k[keep].to(k_cache.dtype)
    v_cache[slots[keep].long()] = v[keep].to(v_cache.dtype)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(
        out_dtype or weight.dtype
    )


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over each sequence's KV index: new token i of a sequence with C cached entries attends
    index entries 0..C+i. Decode is the case qo_indptr = arange(B+1). Returns (o, lse natural log)."""
    head_dim = q.shape[-1]
    group = q.shape[1] // k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    o = torch.zeros_like(q)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full(q.shape[:2], float("-inf"), dtype=lse_dtype, device=q.device)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        qs, qe, ks, ke = qo[b], qo[b + 1], kvp[b], kvp[b + 1]
        n_q, n_kv = qe - qs, ke - ks
        if n_q == 0 or n_kv == 0:
            continue
        slots = kv_indices[ks:ke].long()
        k = k_cache[slots].repeat_interleave(group, dim=1)  # [n_kv, Hq, D]
        v = v_cache[slots].repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qs:qe], k) * scale
        limit = torch.arange(n_q, device=q.device)[:, None] + (n_kv - n_q)  # last index each new token sees
        allowed = torch.arange(n_kv, device=q.device)[None, :] <= limit
        s = s.masked_fill(~allowed, float("-inf"))
        lse[qs:qe] = torch.logsumexp(s, -1).transpose(0, 1).to(lse.dtype)
        o[qs:qe] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return o, lse


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Out of place: logits with every token whose bit is 0 set to -inf (bit j of word w is token 32w+j)."""
    vocab = logits.shape[-1]
    bits = (bitmask.long()[..., :, None] >> torch.arange(32, device=bitmask.device)) & 1
    allowed = bits.flatten(-2)[..., :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def sampling_probs_reference(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The distribution `sample_tokens` draws from, per row: logits / T, then top-k (ties at the k-th value kept),
    then top-p over the renormalized survivors (a token stays if the mass strictly above it is < top_p); rows
    with T == 0 put all mass on the first argmax. top_k <= 0 or >= V means no top-k."""
    probs = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    for r in range(logits.shape[0]):
        x = logits[r].double()
        if temperature[r] == 0:
            probs[r, int(torch.argmax(x))] = 1.0
            continue
        x = x / float(temperature[r])
        k = int(top_k[r])
        if 0 < k < x.numel():
            x = x.masked_fill(x < torch.topk(x, k).values[-1], float("-inf"))
        p = torch.softmax(x, -1)
        p_sorted, order = torch.sort(p, descending=True)
        excl = torch.cumsum(p_sorted, 0) - p_sorted
        _, tie_group = torch.unique_consecutive(p_sorted, return_inverse=True)
        first = torch.full((int(tie_group[-1]) + 1,), math.inf, dtype=excl.dtype, device=excl.device)
        first = first.scatter_reduce(0, tie_group, excl, "amin")
        above = torch.empty_like(p)
        above[order] = first[tie_group]  # mass strictly more probable than each token
        p = p.masked_fill(above >= float(top_p[r]), 0.0)
        probs[r] = p / p.sum()
    return probs
