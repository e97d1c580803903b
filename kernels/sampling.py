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

`draw_tokens` is the plain case (temperature only, or greedy) in a single pass, split across several programs per
row, with a grammar's token bitmask read in the same pass: what the engine's sampler uses on CUDA for such rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
def _open(u):
    """Uniforms clamped into (0, 1): Philox floats can round to exactly 0 or 1.0, whose Gumbel noise is infinite."""
    return tl.minimum(tl.maximum(u, 1e-20), 0.99999994)


@triton.jit
def _uniform_open(seed, offsets):
    return _open(tl.rand(seed, offsets))


@triton.jit
def _load_scaled(row_ptr, cols, vocab, temp):
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    return x / temp


@triton.jit
def _first_max(v, idx, size):
    """(max of v, lowest idx among the lanes holding it): ties go to the lower token id, as in torch.argmax."""
    best = tl.max(v, axis=0)
    return best, tl.min(tl.where(v == best, idx, size), axis=0)


@triton.jit
def _softmax_stats(row_ptr, vocab, temp, kth_key, BLOCK: tl.constexpr):
    """Max m and sum of exp(y - m) over the top-k survivors; per-lane online accumulation, one final reduction."""
    offs = tl.arange(0, BLOCK)
    m_v = tl.full([BLOCK], float("-inf"), tl.float32)
    z_v = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        y = _load_scaled(row_ptr, cols, vocab, temp)
        y = tl.where((cols < vocab) & (_ordered_key(y) >= kth_key), y, float("-inf"))
        m_new = tl.maximum(m_v, y)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z_v = z_v * tl.exp(m_v - safe) + tl.exp(y - safe)
        m_v = m_new
    m = tl.max(m_v, axis=0)
    z = tl.sum(z_v * tl.exp(m_v - tl.where(m == float("-inf"), 0.0, m)), axis=0)
    return m, z


@triton.jit
def _draw(row_ptr, vocab, temp, kth_key, pivot, seed, draw, BLOCK: tl.constexpr):
    """Gumbel-max over the top-k survivors above `pivot`: returns (token, its scaled logit)."""
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    pick = tl.zeros([BLOCK], tl.int32)
    pick_y = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        y = _load_scaled(row_ptr, cols, vocab, temp)
        ok = (cols < vocab) & (_ordered_key(y) >= kth_key) & (y > pivot)
        u = _uniform_open(seed, draw * vocab + cols)
        score = tl.where(ok, y - tl.log(-tl.log(u)), float("-inf"))
        take = score > best
        best = tl.where(take, score, best)
        pick = tl.where(take, cols, pick)
        pick_y = tl.where(take, y, pick_y)
    top, token = _first_max(best, pick, vocab)
    return token, tl.max(tl.where((best == top) & (pick == token), pick_y, float("-inf")), axis=0)


@triton.jit
def _mass_above(row_ptr, vocab, temp, kth_key, pivot, m, BLOCK: tl.constexpr):
    """Sum of exp(y - m) over the top-k survivors strictly above `pivot`."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        y = _load_scaled(row_ptr, cols, vocab, temp)
        ok = (cols < vocab) & (_ordered_key(y) >= kth_key) & (y > pivot)
        acc += tl.where(ok, tl.exp(y - m), 0.0)
    return tl.sum(acc, axis=0)


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
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            take = x > best  # strict: a lane keeps its earliest (lowest-id) maximum
            best = tl.where(take, x, best)
            best_idx = tl.where(take, cols, best_idx)
        _, token = _first_max(best, best_idx, vocab)
        tl.store(out_ptr + row, token.to(tl.int64))
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

        m, z = _softmax_stats(row_ptr, vocab, temp, kth_key, BLOCK)
        draw = tl.zeros([], tl.int32)
        pick, pick_y = _draw(row_ptr, vocab, temp, kth_key, float("-inf"), seed, draw, BLOCK)
        # Top-p by rejection with a rising pivot: accept once the mass strictly above the pick is < top_p * z.
        # (z == 0: nothing is allowed at all, e.g. a fully masked row; the draw stands.)
        done = ((top_p >= 1.0) | (z == 0)).to(tl.int32)
        while done == 0:
            done = (_mass_above(row_ptr, vocab, temp, kth_key, pick_y, m, BLOCK) < top_p * z).to(tl.int32)
            if done == 0:
                draw += 1
                pick, pick_y = _draw(row_ptr, vocab, temp, kth_key, pick_y, seed, draw, BLOCK)
        tl.store(out_ptr + row, pick.to(tl.int64))


def _checked(logits: torch.Tensor, block: int, least: int, rows: tuple) -> tuple[int, int]:
    """(B, V) of logits [B, V] with contiguous rows, after checking that `block` is a power of two >= `least`
    and each (name, tensor, dtype) of `rows` is a [B] tensor of that dtype."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [B, V] with contiguous rows")
    batch, vocab = logits.shape
    for name, t, dtype in rows:
        if t.shape != (batch,) or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} [{batch}]")
    if block < least or block & (block - 1):
        raise ValueError(f"block must be a power of two >= {least}")
    return batch, vocab


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
    batch, vocab = _checked(logits, block, 16, (
        ("temperature", temperature, torch.float32),
        ("top_k", top_k, torch.int32),
        ("top_p", top_p, torch.float32),
        ("seeds", seeds, torch.int64),
    ))
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _sample_kernel[(batch,)](
            logits, logits.stride(0), vocab, temperature, top_k, top_p, seeds, out, BLOCK=block, num_warps=8
        )
    return out


@triton.jit
def _log(x, FAST: tl.constexpr):
    """Natural log; FAST: the hardware's lg2.approx (relative error ~2^-22, plenty for Gumbel noise) instead of
    libdevice's exact logf (with it, the draw at 64 rows x 128k took 39 us on an H100 instead of 21)."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1) * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _gumbel_consider(row_ptr, mask_row, cols, hi, temp, bits, best, pick, HAS_MASK: tl.constexpr,
                     FAST_LOG: tl.constexpr):
    """Fold one sub-block of columns into the running per-lane best score and its column."""
    ok = cols < hi
    x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        word = tl.load(mask_row + cols // 32, mask=ok, other=0)
        ok = ok & (((word >> (cols % 32)) & 1) != 0)
    if temp > 0:
        score = x / temp - _log(-_log(_open(tl.uint_to_uniform_float(bits)), FAST_LOG), FAST_LOG)
    else:
        score = x
    score = tl.where(ok, score, float("-inf"))
    take = score > best  # strict: a lane keeps its earliest (lowest-id) maximum
    return tl.where(take, score, best), tl.where(take, cols, pick)


@triton.jit
def _gumbel_kernel(
    logits_ptr,
    stride_row,
    vocab,
    temp_ptr,
    seed_ptr,
    base_seed,
    mask_ptr,
    mask_stride,
    score_ptr,
    token_ptr,
    count_ptr,
    out_ptr,
    span,
    HAS_SEEDS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FAST_LOG: tl.constexpr,
    PARTS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    mask_row = mask_ptr + row.to(tl.int64) * mask_stride
    temp = tl.load(temp_ptr + row)
    if HAS_SEEDS:
        seed = tl.load(seed_ptr + row)
    else:
        seed = base_seed + row
    Q: tl.constexpr = BLOCK // 4
    q = tl.arange(0, Q)
    best = tl.full([Q], float("-inf"), tl.float32)
    pick = tl.zeros([Q], tl.int32)
    lo = part * span
    hi = tl.minimum(lo + span, vocab)
    for start in range(lo, hi, BLOCK):
        # One Philox call gives the noise of four columns; its counter depends on the column only, so a row's
        # draw is the same however the row is split into parts.
        r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + q)
        best, pick = _gumbel_consider(row_ptr, mask_row, start + q, hi, temp, r0, best, pick, HAS_MASK, FAST_LOG)
        best, pick = _gumbel_consider(row_ptr, mask_row, start + Q + q, hi, temp, r1, best, pick, HAS_MASK,
                                      FAST_LOG)
        best, pick = _gumbel_consider(row_ptr, mask_row, start + 2 * Q + q, hi, temp, r2, best, pick, HAS_MASK,
                                      FAST_LOG)
        best, pick = _gumbel_consider(row_ptr, mask_row, start + 3 * Q + q, hi, temp, r3, best, pick, HAS_MASK,
                                      FAST_LOG)
    top, token = _first_max(best, pick, vocab)
    slot = row * parts + part
    tl.store(score_ptr + slot, top)
    tl.store(token_ptr + slot, token)
    # The row's last part to finish picks among the parts' winners (the atomic orders the others' stores before
    # its loads, which read through L2: L1 may hold lines of these slots from another row's pick), writes the
    # token and resets the row's counter for the next launch.
    if tl.atomic_add(count_ptr + row, 1, sem="acq_rel") == parts - 1:
        i = tl.arange(0, PARTS_P2)
        scores = tl.load(score_ptr + row * parts + i, mask=i < parts, other=float("-inf"), cache_modifier=".cg")
        tokens = tl.load(token_ptr + row * parts + i, mask=i < parts, other=0, cache_modifier=".cg")
        first = tl.min(tl.where(scores == tl.max(scores, axis=0), i, PARTS_P2), axis=0)  # ties: the lower ids
        tl.store(out_ptr + row, tl.sum(tl.where(i == first, tokens, 0), axis=0).to(tl.int64))
        tl.store(count_ptr + row, 0)


@dataclass
class DrawScratch:
    """Per-part winners and per-row arrival counters of `draw_tokens`, kept by a caller that draws every step.

    The counters must be zero before a launch; each launch leaves them zero. One scratch serves one stream.
    """

    device: torch.device
    scores: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def ensure(self, slots: int, rows: int) -> None:
        if self.scores is None or self.scores.numel() < slots:
            self.scores = torch.empty(slots, dtype=torch.float32, device=self.device)
            self.tokens = torch.empty(slots, dtype=torch.int32, device=self.device)
        if self.counts is None or self.counts.numel() < rows:
            self.counts = torch.zeros(rows, dtype=torch.int32, device=self.device)


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs per launch: eight per SM, so each SM holds enough warps to keep its loads in flight."""
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def draw_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor | int,
    bitmask: torch.Tensor | None = None,
    parts: int | None = None,
    block: int = 2048,
    scratch: DrawScratch | None = None,
) -> torch.Tensor:
    """One token per row of `logits` [B, V] from softmax(logits / temperature) over the tokens `bitmask` allows
    (temperature 0: the first maximum, as torch.argmax); returns int64 [B].

    The plain draw with no top-k/top-p, in one launch over the logits: Gumbel-max with Philox noise keyed by the
    row's seed (`seeds`: int64 [B], or an int s for seeds s + row), and the grammar's bitmask (int32
    [B, ceil(V/32)], bit j of word w allows token 32w + j, xgrammar's layout) read in the same pass, so a
    constrained row costs no extra pass over its logits. Each row is split into `parts` column ranges (default:
    eight programs per SM in all); the last to finish picks among their winners, so the result does not depend
    on `parts`. A caller drawing every step passes its own `scratch` (one per stream) to save the allocations.
    """
    has_seeds = isinstance(seeds, torch.Tensor)
    batch, vocab = _checked(logits, block, 64, (("temperature", temperature, torch.float32),
                                                *((("seeds", seeds, torch.int64),) if has_seeds else ())))
    words = (vocab + 31) // 32
    if bitmask is not None and (bitmask.dtype != torch.int32 or bitmask.shape != (batch, words)
                                or bitmask.stride(1) != 1):
        raise ValueError(f"bitmask must be int32 [{batch}, {words}] with contiguous rows")
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if parts is None:
        parts = -(-_programs(logits.device) // batch)
    span = block * max(1, -(-vocab // (block * max(1, parts))))
    parts = -(-vocab // span)
    scratch = scratch or DrawScratch(logits.device)
    scratch.ensure(batch * parts, batch)
    _gumbel_kernel[(batch, parts)](
        logits, logits.stride(0), vocab, temperature,
        seeds if has_seeds else out, 0 if has_seeds else seeds,  # `out`: any pointer, never read
        bitmask if bitmask is not None else scratch.scores, 0 if bitmask is None else bitmask.stride(0),
        scratch.scores, scratch.tokens, scratch.counts, out, span,
        HAS_SEEDS=has_seeds, HAS_MASK=bitmask is not None, FAST_LOG=logits.is_cuda,
        PARTS_P2=triton.next_power_of_2(parts), BLOCK=block, num_warps=4,
    )
    return out
