"""Greedy, temperature, top-k and top-p sampling on the device, without sorting the vocabulary.

Semantics follow transformers' warpers in their usual order: logits / temperature, then top-k (every token tied
with the k-th largest value survives), then top-p over the renormalized survivors (a token survives if the
probability mass strictly above it is < top_p), then a draw. Temperature 0 is greedy: the first maximum, like
torch.argmax.

One program per row streams the row a few times instead of sorting it:
- top-k: the k-th largest value by radix select on the order-preserving integer image of the floats, 8 bits per
  pass (4 passes, histogram of the next digit among the candidates that match the digits chosen so far);
- the draw: Gumbel-max (argmax of y + Gumbel noise) over the allowed tokens, which samples softmax(y) restricted
  to them; noise comes from Philox keyed by the row's seed, so a row's draw does not depend on the rest of the batch;
- top-p by rejection: if the drawn token has too much mass above it, every token at or below its probability is
  out too, so it becomes a pivot and the draw repeats among strictly more probable tokens. The most probable
  token always passes, so the loop ends; in practice it runs once or twice. The accepted token is distributed
  exactly as the top-k/top-p-filtered distribution.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ordered_key(y):
    """uint32 image of fp32 values that preserves their order (sign-magnitude -> offset binary)."""
    u = y.to(tl.uint32, bitcast=True)
    flip = tl.where((u >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return u ^ flip


@triton.jit
def _uniform_open(seed, offsets):
    """Philox uniforms clamped into (0, 1): tl.rand can round up to exactly 1.0, whose Gumbel noise is +inf."""
    return tl.minimum(tl.maximum(tl.rand(seed, offsets), 1e-20), 0.99999994)


@triton.jit
def _load_scaled(row_ptr, cols, vocab, temp):
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    return x / temp


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride_row,
    vocab,
    temp_ptr,
    top_k_ptr,
    top_p_ptr,
    seed_ptr,
    out_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temp = tl.load(temp_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    seed = tl.load(seed_ptr + row)
    offs = tl.arange(0, BLOCK)

    if temp == 0:
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.zeros([], tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            bmax = tl.max(x, axis=0)
            bidx = start + tl.argmax(x, axis=0, tie_break_left=True)
            take = bmax > best
            best_idx = tl.where(take, bidx, best_idx)
            best = tl.where(take, bmax, best)
        tl.store(out_ptr + row, best_idx.to(tl.int64))
    else:
        # Top-k threshold: the ordered key of the k-th largest scaled logit (0 = keep everything).
        kth_key = tl.zeros([], tl.uint32)
        if (top_k > 0) & (top_k < vocab):
            k_rem = top_k
            bins = tl.arange(0, 256)
            for pass_i in tl.static_range(4):
                shift = 24 - 8 * pass_i
                hist = tl.zeros([256], tl.int32)
                for start in range(0, vocab, BLOCK):
                    cols = start + offs
                    key = _ordered_key(_load_scaled(row_ptr, cols, vocab, temp))
                    cand = cols < vocab
                    if pass_i > 0:  # only keys whose higher digits match the ones chosen so far
                        cand = cand & ((key >> (shift + 8)) == (kth_key >> (shift + 8)))
                    hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=cand)
                total = tl.sum(hist, axis=0)
                above = total - tl.cumsum(hist, axis=0)  # candidates whose digit is > each bin
                digit = tl.min(tl.where(above < k_rem, bins, 256), axis=0)
                k_rem -= tl.sum(tl.where(bins == digit, above, 0), axis=0)
                kth_key = kth_key | (digit.to(tl.uint32) << shift)

        # Softmax statistics over the top-k survivors (online max), fused with the first Gumbel-max draw.
        m = tl.full([], float("-inf"), tl.float32)
        z = tl.zeros([], tl.float32)
        best = tl.full([], float("-inf"), tl.float32)
        pick_y = tl.full([], float("-inf"), tl.float32)
        pick = tl.zeros([], tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            y = _load_scaled(row_ptr, cols, vocab, temp)
            ok = (cols < vocab) & (_ordered_key(y) >= kth_key)
            y = tl.where(ok, y, float("-inf"))
            m_new = tl.maximum(m, tl.max(y, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.exp(m - m_safe) + tl.sum(tl.exp(y - m_safe), axis=0)
            m = m_new
            u = _uniform_open(seed, cols)
            score = y - tl.log(-tl.log(u))
            bmax = tl.max(score, axis=0)
            barg = tl.argmax(score, axis=0, tie_break_left=True)
            take = bmax > best
            pick = tl.where(take, start + barg, pick)
            pick_y = tl.where(take, tl.sum(tl.where(offs == barg, y, 0.0), axis=0), pick_y)
            best = tl.where(take, bmax, best)

        # Top-p by rejection with a rising pivot: accept once the mass strictly above the pick is < top_p * z.
        draw = tl.zeros([], tl.int32)
        done = (top_p >= 1.0).to(tl.int32)
        while done == 0:
            mass_above = tl.zeros([], tl.float32)
            for start in range(0, vocab, BLOCK):
                cols = start + offs
                y = _load_scaled(row_ptr, cols, vocab, temp)
                ok = (cols < vocab) & (_ordered_key(y) >= kth_key) & (y > pick_y)
                mass_above += tl.sum(tl.where(ok, tl.exp(y - m), 0.0), axis=0)
            done = (mass_above < top_p * z).to(tl.int32)
            if done == 0:
                draw += 1
                pivot = pick_y
                best = tl.full([], float("-inf"), tl.float32)
                for start in range(0, vocab, BLOCK):
                    cols = start + offs
                    y = _load_scaled(row_ptr, cols, vocab, temp)
                    ok = (cols < vocab) & (_ordered_key(y) >= kth_key) & (y > pivot)
                    y = tl.where(ok, y, float("-inf"))
                    u = _uniform_open(seed, draw * vocab + cols)
                    score = y - tl.log(-tl.log(u))
                    bmax = tl.max(score, axis=0)
                    barg = tl.argmax(score, axis=0, tie_break_left=True)
                    take = bmax > best
                    pick = tl.where(take, start + barg, pick)
                    pick_y = tl.where(take, tl.sum(tl.where(offs == barg, y, 0.0), axis=0), pick_y)
                    best = tl.where(take, bmax, best)
        tl.store(out_ptr + row, pick.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    block: int = 2048,
) -> torch.Tensor:
    """Draw one token per row of `logits` [B, V] (any float dtype); returns int64 [B].

    Per-row parameters, all [B] on the logits' device: temperature (fp32, 0 = greedy), top_k (int32, <= 0 or
    >= V = off), top_p (fp32 in (0, 1], 1 = off), seeds (int64; the same seed and inputs give the same token).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [B, V] with contiguous rows")
    batch, vocab = logits.shape
    for name, t, dtype in (
        ("temperature", temperature, torch.float32),
        ("top_k", top_k, torch.int32),
        ("top_p", top_p, torch.float32),
        ("seeds", seeds, torch.int64),
    ):
        if t.shape != (batch,) or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} [{batch}]")
    if block < 16 or block & (block - 1):
        raise ValueError("block must be a power of two >= 16")
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _sample_kernel[(batch,)](
            logits, logits.stride(0), vocab, temperature, top_k, top_p, seeds, out, BLOCK=block, num_warps=8
        )
    return out
