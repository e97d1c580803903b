"""Weight-only quantized matmul: y = x @ W_hat (+ bias), W_hat = q * scale + min with b-bit codes q.

On NVIDIA GPUs with cuda-python, M <= 16 with bf16/fp16 activations goes to the CUDA C++ tensor-core kernel of
quant_mma (decode in registers, mma.sync, fp32 sums), which `default_config` picks where it measured faster:
every width at M = 3-16, 2-4 bits at M <= 2. Otherwise two Triton kernels read the packed weight of `quant_pack`
once and never materialize W_hat:

- `_gemv_kernel` (small M, decode): CUDA cores. With `f16x2=True` (opt-in: NVIDIA GPUs, 16-bit activations)
  each 32-code chunk is decoded by inline PTX two codes per instruction into fp16 and multiplied in packed fp16
  (quant_f16x2), summed to fp32 per chunk. The default, portable decode (also the CPU interpreter's) turns each of the
  32 slots into an exact fp32 integer with compile-time masks (OR-ing the code into the mantissa of a power of
  two and subtracting it, cheaper than an int-to-float conversion), then multiplies by the activation. Per
  group, scale * sum(x*q) + min * sum(x) applies the scale once instead of once per weight.
- `_dot_kernel` (larger M, prefill): tensor cores. One group's codes are decoded into a [BLOCK_N, group] tile
  of exact integers in the activation dtype and multiplied as W^T x^T, so the weight tile is the MMA's
  M side (64+ rows, wgmma on Hopper) and the few tokens its N side; the scale and minimum are applied to the
  group's partial product, so the result is the same sum as the GEMV's.

Both read either weight layout of QuantizedWeight (`block_n`): the flat [K-rows, N] words, or row blocks whose
words are contiguous along K, where a GEMV program owning 16-32 columns streams whole rows without split-K.

Both accumulate in fp32 (the packed decode sums each chunk's 32 products in fp16 first) and round once at the
end, the math of `quant_matmul_reference`. Split-K programs write
fp32 partials; the last program of each output tile (found with an atomic counter) sums them in a fixed order,
so one launch does the whole product and results are deterministic.

Where the GEMV's time goes (H100, benchmarks/quant_gemv.py, docs/benchmarks.md): the packed decode brought the
main loop from ~4.5 to ~3.4 instructions per weight at 4 bits but the time only 5-16% (3-4 bits): the largest
8B layer streams at ~2 TB/s rather than 3 (in either layout), and the small ones pay ~5 us of ramp, latency and
split-K tail, ~1 us of which the row-blocked layout removes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .quant_f16x2 import PAIRS as _PAIRS
from .quant_f16x2 import pair_codes, ptx
from .quant_mma import MmaConfig, quant_mma_matmul, usable
from .quant_pack import SUPPORTED_BITS
from .quantize import QuantizedWeight, dequantize

# Slot decoding. A code q of BITS bits at bit offset s (s + BITS <= 23) of a word, OR-ed with the bits of the
# float 2**23, gives the float 2**23 + q * 2**s exactly; one FMA by constants turns that into q. The OR operand
# `magic` (always 0x4B000000) arrives as a kernel argument: as a compile-time constant the compiler would split
# the mask-and-OR into two instructions, as a register it stays one LOP3.
MAGIC = 0x4B000000


@triton.constexpr_function
def _slot_offset(e, j, bits):
    """Bit offset of slot e relative to word j (negative: the code starts in word j - 1)."""
    return e * bits - 32 * j


@triton.constexpr_function
def _last_word(e, bits):
    return (e * bits + bits - 1) // 32


@triton.constexpr_function
def _field_mask(bits, s):
    return ((1 << bits) - 1) << s


@triton.constexpr_function
def _unscale(s):
    return 2.0**-s


@triton.constexpr_function
def _unbias(s):
    return -(2.0 ** (23 - s))


@triton.jit
def _code(t, magic, BITS: tl.constexpr, S: tl.constexpr):
    f = ((t & _field_mask(BITS, S)) | magic).to(tl.float32, bitcast=True)
    return f * _unscale(S) + _unbias(S)


@triton.jit
def _decode_slot(prev, w, magic, E: tl.constexpr, J: tl.constexpr, BITS: tl.constexpr):
    """Code of element slot E, whose last bit is in word J (`w`); `prev` is word J - 1. Exact fp32."""
    s: tl.constexpr = _slot_offset(E, J, BITS)
    if s < 0:  # straddles the two words: funnel-shift them
        return _code((prev >> (32 + s)) | (w << (-s)), magic, BITS, 0)
    elif s + BITS <= 23:
        return _code(w, magic, BITS, s)
    else:  # above the mantissa: use the upper half-word
        return _code(w >> 16, magic, BITS, s - 16)


@triton.jit
def _store_tile(total, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(
    res,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    bias_ptr,
    offs_m,
    offs_n,
    M,
    N,
    stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    REDUCE: tl.constexpr,
):
    """Write the [BM, BN] fp32 tile `res`; with split-K, only the last program of the tile sums the partials."""
    if not SPLIT_K:
        _store_tile(res, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        mn = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * N + mn, res, mask=mask)
        tl.debug_barrier()
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        splits = tl.num_programs(1)
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == splits - 1:
            # REDUCE partials in flight at a time (all of them when registers allow): the sum's latency is
            # splits / REDUCE round trips to L2, the serial tail of every split-K launch.
            total = tl.zeros_like(res)
            for k0 in range(0, splits, REDUCE):
                for i in tl.static_range(REDUCE):
                    live = mask & (k0 + i < splits)
                    total += tl.load(ws_ptr + (k0 + i) * M * N + mn, mask=live, other=0.0, cache_modifier=".cg")
            _store_tile(total, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _word_ptrs(w_ptr, chunk, cols, N, G, BITS: tl.constexpr, GROUP: tl.constexpr, LB: tl.constexpr):
    """Word 0 of each chunk in `chunk` for columns `cols`; word j follows at j * `_word_step`. LB = 0: the flat
    [K-rows, N] layout; else row blocks of LB columns, runs of GROUP / 32 chunks (quant_pack.to_row_blocks)."""
    if LB == 0:
        return w_ptr + chunk * (BITS * N) + cols
    else:
        RUN: tl.constexpr = GROUP // 32
        return (w_ptr + (cols // LB) * (G * RUN * BITS * LB) + (chunk // RUN) * (RUN * BITS * LB)
                + (chunk % RUN) * LB + cols % LB)


@triton.jit
def _word_step(N, GROUP: tl.constexpr, LB: tl.constexpr):
    """Distance between words j and j + 1 of a chunk."""
    if LB == 0:
        return N
    else:
        return GROUP // 32 * LB


@triton.jit
def _group_ptrs(s_ptr, group, cols, N, G, LB: tl.constexpr):
    """Scale (or minimum) of `group` for columns `cols`, in the layout of LB (see `_word_ptrs`)."""
    if LB == 0:
        return s_ptr + group * N + cols
    else:
        return s_ptr + (cols // LB) * (G * LB) + group * LB + cols % LB


@triton.jit
def _load_words(w_ptr, chunk, cols, N, G, BITS: tl.constexpr, GROUP: tl.constexpr, LB: tl.constexpr):
    """The BITS words of each chunk in `chunk` for columns `cols`, as a tuple of uint32 tensors."""
    rows = _word_ptrs(w_ptr, chunk, cols, N, G, BITS, GROUP, LB)
    step = _word_step(N, GROUP, LB)
    words = ()
    for j in tl.static_range(BITS):
        words = words + (tl.load(rows + j * step).to(tl.uint32, bitcast=True),)
    return words


@triton.jit
def _gemv_step(words, chunk, live, x_rows, s_ptr, z_ptr, n3, N, G, K, magic, BITS: tl.constexpr,
               GROUP: tl.constexpr, LB: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, C: tl.constexpr,
               BN: tl.constexpr):
    """sum over the chunks' 32 slots of x * W_hat for one step, [BM, C, BN]; `live` masks clamped chunks."""
    x_chunk = x_rows + chunk * 32
    part = tl.zeros([BM, C, BN], dtype=tl.float32)
    xsum = tl.zeros([BM, C, 1], dtype=tl.float32)
    for j in tl.static_range(BITS):
        for e in tl.static_range((32 * j) // BITS, (32 * j + 32) // BITS):
            if EVEN_K:
                xe = tl.load(x_chunk + e).to(tl.float32)
            else:
                xe = tl.load(x_chunk + e, mask=chunk * 32 + e < K, other=0.0).to(tl.float32)
            part += xe * _decode_slot(words[j - 1 if j > 0 else 0], words[j], magic, e, j, BITS)
            xsum += xe
    group = (chunk * 32) // GROUP
    scale = tl.load(_group_ptrs(s_ptr, group, n3, N, G, LB), mask=live, other=0.0).to(tl.float32)
    zero = tl.load(_group_ptrs(z_ptr, group, n3, N, G, LB), mask=live, other=0.0).to(tl.float32)
    return part * scale + xsum * zero


PAIRS = tl.constexpr(_PAIRS)  # code pairs per chunk
_CHUNK_PTX = {bits: ptx(bits) for bits in SUPPORTED_BITS}  # (asm, constraints) by width
_PAIR_CODES = {bits: pair_codes(bits) for bits in SUPPORTED_BITS}


@triton.constexpr_function
def _pair_code(bits, i, half):
    return _PAIR_CODES[bits][i][half]


@triton.constexpr_function
def _chunk_asm(bits):
    return _CHUNK_PTX[bits][0]


@triton.constexpr_function
def _chunk_constraints(bits):
    return _CHUNK_PTX[bits][1]


@triton.jit
def _f16x2(lo, hi):
    """Two fp32 tensors -> one uint32 tensor of fp16 pairs (lo in the low half), one CVT per pair."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.uint32,
                                     is_pure=True, pack=1)


@triton.jit
def _gemv_step_f16x2(words, chunk, live, x_rows, s_ptr, z_ptr, n3, N, G, K, BITS: tl.constexpr,
                     GROUP: tl.constexpr, LB: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, C: tl.constexpr):
    """`_gemv_step` on the GPU with the packed fp16 decode of quant_f16x2 (inline PTX, one block per chunk)."""
    x_chunk = x_rows + chunk * 32
    xsum = tl.zeros([BM, C, 1], dtype=tl.float32)
    xs = ()
    for i in tl.static_range(PAIRS):
        if EVEN_K:
            lo = tl.load(x_chunk + _pair_code(BITS, i, 0)).to(tl.float32)
            hi = tl.load(x_chunk + _pair_code(BITS, i, 1)).to(tl.float32)
        else:
            lo = tl.load(x_chunk + _pair_code(BITS, i, 0), mask=chunk * 32 + _pair_code(BITS, i, 0) < K,
                         other=0.0).to(tl.float32)
            hi = tl.load(x_chunk + _pair_code(BITS, i, 1), mask=chunk * 32 + _pair_code(BITS, i, 1) < K,
                         other=0.0).to(tl.float32)
        xsum += lo + hi
        xs = xs + (_f16x2(lo, hi),)
    part = tl.inline_asm_elementwise(_chunk_asm(BITS), _chunk_constraints(BITS), words + xs, dtype=tl.float32,
                                     is_pure=True, pack=1)
    group = (chunk * 32) // GROUP
    scale = tl.load(_group_ptrs(s_ptr, group, n3, N, G, LB), mask=live, other=0.0).to(tl.float32)
    zero = tl.load(_group_ptrs(z_ptr, group, n3, N, G, LB), mask=live, other=0.0).to(tl.float32)
    return part * (scale * (1 << BITS)) + xsum * zero


@triton.jit
def _step(words, chunk, live, x_rows, s_ptr, z_ptr, n3, N, G, K, magic, BITS: tl.constexpr, GROUP: tl.constexpr,
          LB: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, C: tl.constexpr, BN: tl.constexpr,
          F16X2: tl.constexpr):
    if F16X2:
        return _gemv_step_f16x2(words, chunk, live, x_rows, s_ptr, z_ptr, n3, N, G, K, BITS, GROUP, LB, EVEN_K, BM, C)
    else:
        return _gemv_step(words, chunk, live, x_rows, s_ptr, z_ptr, n3, N, G, K, magic, BITS, GROUP, LB, EVEN_K, BM,
                          C, BN)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    G,
    n_chunks,
    chunks_per_split,
    stride_xm,
    stride_om,
    magic,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    LB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
    REDUCE: tl.constexpr,
    PREFETCH: tl.constexpr,
    F16X2: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(2) * BM + tl.arange(0, BM)
    # Loads use clamped indices instead of masks (no per-element predicates); clamped duplicates are zeroed by
    # masked scales and dropped by the masked store.
    if EVEN_N:
        n3 = tl.max_contiguous(tl.multiple_of(offs_n, BN), BN)[None, None, :]
    else:
        n3 = tl.minimum(offs_n, N - 1)[None, None, :]
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None, None] * stride_xm
    lane = tl.arange(0, C)[None, :, None]
    acc = tl.zeros([BM, C, BN], dtype=tl.float32)
    begin = tl.program_id(1) * chunks_per_split
    end = tl.minimum(begin + chunks_per_split, n_chunks)
    if PREFETCH == 1:  # registers double-buffer the words: the next step's loads fly while this one computes
        chunk = tl.minimum(begin + lane, end - 1)
        words = _load_words(w_ptr, chunk, n3, N, G, BITS, GROUP, LB)
        for c0 in tl.range(begin, end, C, num_stages=1):
            next_chunk = tl.minimum(c0 + C + lane, end - 1)
            next_words = _load_words(w_ptr, next_chunk, n3, N, G, BITS, GROUP, LB)
            acc += _step(words, chunk, c0 + lane < end, x_rows, s_ptr, z_ptr, n3, N, G, K, magic, BITS, GROUP, LB,
                         EVEN_K, BM, C, BN, F16X2)
            words = next_words
            chunk = next_chunk
    elif PREFETCH == 2:  # triple-buffered: two steps of loads in flight
        chunk = tl.minimum(begin + lane, end - 1)
        words = _load_words(w_ptr, chunk, n3, N, G, BITS, GROUP, LB)
        chunk1 = tl.minimum(begin + C + lane, end - 1)
        words1 = _load_words(w_ptr, chunk1, n3, N, G, BITS, GROUP, LB)
        for c0 in tl.range(begin, end, C, num_stages=1):
            chunk2 = tl.minimum(c0 + 2 * C + lane, end - 1)
            words2 = _load_words(w_ptr, chunk2, n3, N, G, BITS, GROUP, LB)
            acc += _step(words, chunk, c0 + lane < end, x_rows, s_ptr, z_ptr, n3, N, G, K, magic, BITS, GROUP, LB,
                         EVEN_K, BM, C, BN, F16X2)
            words = words1
            chunk = chunk1
            words1 = words2
            chunk1 = chunk2
    else:
        for c0 in tl.range(begin, end, C, num_stages=STAGES):
            chunk = tl.minimum(c0 + lane, end - 1)
            words = _load_words(w_ptr, chunk, n3, N, G, BITS, GROUP, LB)
            acc += _step(words, chunk, c0 + lane < end, x_rows, s_ptr, z_ptr, n3, N, G, K, magic, BITS, GROUP, LB,
                         EVEN_K, BM, C, BN, F16X2)
    _epilogue(
        tl.sum(acc, axis=1),
        out_ptr,
        ws_ptr,
        cnt_ptr,
        bias_ptr,
        offs_m,
        offs_n,
        M,
        N,
        stride_om,
        SPLIT_K,
        HAS_BIAS,
        REDUCE,
    )


@triton.jit
def _decode_tree(words, magic, E0: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr):
    """Slots E0, E0+STRIDE, ... (COUNT of them), joined so that a row-major reshape of the trailing dimensions
    puts them in slot order: the outermost join splits on the lowest bit of the slot index."""
    if COUNT == 1:
        j: tl.constexpr = _last_word(E0, BITS)
        if j == 0:
            return _decode_slot(words[0], words[0], magic, E0, 0, BITS)
        else:
            return _decode_slot(words[j - 1], words[j], magic, E0, j, BITS)
    else:
        return tl.join(
            _decode_tree(words, magic, E0, STRIDE * 2, COUNT // 2, BITS),
            _decode_tree(words, magic, E0 + STRIDE, STRIDE * 2, COUNT // 2, BITS),
        )


@triton.jit
def _dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    G,
    n_chunks,
    chunks_per_split,
    stride_xm,
    stride_om,
    magic,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    LB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
    REDUCE: tl.constexpr,
):
    T: tl.constexpr = GROUP // 32
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(2) * BM + tl.arange(0, BM)
    offs_g = tl.arange(0, GROUP)
    if EVEN_N:
        cols = tl.max_contiguous(tl.multiple_of(offs_n, BN), BN)
    else:
        cols = tl.minimum(offs_n, N - 1)
    begin = tl.program_id(1) * chunks_per_split
    end = tl.minimum(begin + chunks_per_split, n_chunks)
    step = _word_step(N, GROUP, LB)
    xt_rows = x_ptr + tl.minimum(offs_m, M - 1)[None, :] * stride_xm + begin * 32 + offs_g[:, None]
    ones = tl.full([BN, GROUP], 1.0, dtype=tl.float32).to(x_ptr.dtype.element_ty)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for c0 in tl.range(begin, end, T, num_stages=STAGES):
        w_rows = _word_ptrs(w_ptr, (c0 + tl.arange(0, T))[:, None], cols[None, :], N, G, BITS, GROUP, LB)
        words = ()
        for j in tl.static_range(BITS):
            words = words + (tl.load(w_rows + j * step).to(tl.uint32, bitcast=True),)
        q = tl.reshape(_decode_tree(words, magic, 0, 1, 32, BITS), T, BN, 32)
        a = tl.reshape(tl.permute(q, 1, 0, 2), BN, GROUP).to(x_ptr.dtype.element_ty)
        if EVEN_K:
            xt = tl.load(xt_rows)
        else:
            xt = tl.load(xt_rows, mask=c0 * 32 + offs_g[:, None] < K, other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:
            part = tl.dot(a, xt, input_precision="ieee")
            xsum = tl.dot(ones, xt, input_precision="ieee")
        else:
            part = tl.dot(a, xt)
            xsum = tl.dot(ones, xt)  # the columns' sums of x^T, already broadcast over the tile's rows
        group = c0 // T
        scale = tl.load(_group_ptrs(s_ptr, group, cols, N, G, LB)).to(tl.float32)
        zero = tl.load(_group_ptrs(z_ptr, group, cols, N, G, LB)).to(tl.float32)
        acc += part * scale[:, None] + xsum * zero[:, None]
        xt_rows += GROUP
    acc = tl.trans(acc)
    _epilogue(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, SPLIT_K, HAS_BIAS, REDUCE)


@dataclass(frozen=True)
class QuantMatmulConfig:
    """Tiling of one launch. dot: tensor-core kernel (C is then one group); else the CUDA-core GEMV."""

    dot: bool
    block_m: int
    block_n: int
    chunks: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2
    prefetch: int = 0  # GEMV: steps of words loaded ahead into registers, 0-2 (0: num_stages staging)
    # GEMV with 16-bit x on CUDA: the packed fp16 decode (quant_f16x2), 5-16% faster at M <= 2 but its fp16 chunk
    # sums can overflow to inf for activations beyond ~2000 (outlier features reach that), so it is opt-in.
    f16x2: bool = False
    # The CUDA C++ tensor-core kernel of quant_mma (M <= 16, bf16/fp16) with this launch shape; the fields above
    # are then unused.
    mma: MmaConfig | None = None


MMA_MAX_M = 16
WIDE_MIN_K = 8192  # in_features from which a lone block per SM takes 16 warps (64 steps of 128, 4+ a warp)
PDL_MAX_M = 1  # up to this M launches overlap the previous kernel's end (see mma_config)


def mma_config(m: int, n: int, num_sms: int, k: int, bits: int) -> MmaConfig:
    """Launch shape of the CUDA tensor-core kernel, from H100 sweeps on Llama-3.1-8B shapes: one step of loads in
    flight; 8 warps splitting K where the 32-column blocks barely fill the GPU (o at M >= 2, qkv at M <= 8), 4 warps
    and two blocks per SM where there are many (gate_up: 896 blocks). With at most one block per SM and a long
    K (`k` in_features, at 2-4 `bits`: down) 16 warps, whose loads in flight the DRAM needs: 8-13% faster at
    M = 1-16 there. At M = 1 and 2-4 bits, programmatic dependent launch that lets the next grid launch at each
    block's start, right after it has loaded its first weights, scales and minimums and before it waits for the
    previous grid (`pdl` 3, `preload`: three grids in flight), and 16 warps for every grid of at most one block
    per SM (o too), so that the next GEMV's early blocks cannot double up beside it: 4-5% faster per layer than
    the trigger past the wait (pdl 1) with GEMVs back to back, 7-10% faster than no overlap, no change with a
    plain torch kernel between them as in decode, and 3-5% faster with a small kernel that takes part in PDL
    between them. At M = 4 the pdl 1 launch cost 1-3% at 3 bits with kernels between, at M = 16 1-2% (with
    nothing gained back to back), so larger M keeps plain launches (docs/benchmarks.md)."""
    blocks = -(-n // 32)
    overlap = m <= PDL_MAX_M and 0 < bits <= 4
    pdl = {"pdl": 3, "preload": True} if overlap else {}
    if blocks <= num_sms and 0 < bits <= 4 and (k >= WIDE_MIN_K or overlap):
        return MmaConfig(16, **pdl)
    many = blocks >= 4 * num_sms
    return MmaConfig(4 if many or (m > 8 and blocks >= num_sms) else 8, 1, 2 if many else 1, **pdl)


GEMV_MAX_M = 2  # above this the tensor-core kernel's decode, shared by the rows, costs less than GEMV FMAs


def default_config(m: int, n: int, qw: QuantizedWeight, num_sms: int, mma: bool = False) -> QuantMatmulConfig:
    """The tilings that won benchmarks/quant_gemv.py's H100 sweeps on Llama-3.1-8B shapes. `mma`: the CUDA C++
    tensor-core kernel can run this call (quant_mma.usable); it is taken for M <= MMA_MAX_M, except at M <= 2
    with 5+ bits, where the Triton GEMV measured faster. GEMV on the flat
    layout: 2 chunks x 256 columns per step (each thread 4 columns of one chunk: with the packed fp16 decode, more
    columns per thread share the activations' conversion but cost registers and occupancy, and lost), words
    double-buffered in registers, ~4 programs per SM. On the row-blocked layout a program streams whole rows of
    16 (M = 1) or 32 (M = 2) columns, split-K only where that leaves fewer than ~M programs per SM. Tensor
    cores: one group per step, ~4 programs per SM at decode sizes."""
    if mma and m <= MMA_MAX_M and (m > GEMV_MAX_M or qw.bits <= 4):
        return QuantMatmulConfig(False, m, 32, 4, 1, mma=mma_config(m, n, num_sms, qw.in_features, qw.bits))
    if m <= GEMV_MAX_M and qw.block_n:  # row-blocked layout: 16 columns x 64 chunks per step at M = 1, 32 x 32 at 2
        bn = 16 * m
        cfg = QuantMatmulConfig(False, m, bn, 1024 // bn, 1, 4, 1, prefetch=1)
        return with_split_k(cfg, m, n, qw, m * num_sms)
    if m <= GEMV_MAX_M:
        cfg = QuantMatmulConfig(False, triton.next_power_of_2(m), 256, 2, 1, 4, 1, prefetch=1)
        return with_split_k(cfg, m, n, qw, 4 * num_sms)
    cfg = QuantMatmulConfig(True, 16 if m <= 16 else 32 if m <= 32 else 64, 64, qw.group_size // 32, 1, 4, 3)
    return with_split_k(cfg, m, n, qw, (4 if m <= 16 else 2) * num_sms)


MAX_SPLIT_K = 64  # the last program of a tile sums the partials: more splits lengthen that tail


def with_split_k(cfg: QuantMatmulConfig, m: int, n: int, qw: QuantizedWeight, programs: int) -> QuantMatmulConfig:
    """`cfg` with K split so that the grid has about `programs` programs, each keeping a step of K or more."""
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    steps = qw.padded_in_features // 32 // cfg.chunks
    split = max(1, min(triton.cdiv(programs, tiles), steps, MAX_SPLIT_K))
    return dataclasses.replace(cfg, split_k=split)


def _reduce_width(split: int, cfg: QuantMatmulConfig) -> int:
    """Partials the split-K tail loads at once: all of them, unless that would hold more than ~64 registers."""
    per_thread = max(1, cfg.block_m * cfg.block_n // (32 * cfg.num_warps))
    return max(1, min(triton.next_power_of_2(split), max(4, 64 // per_thread)))


def _use_f16x2(cfg: QuantMatmulConfig, x: torch.Tensor) -> bool:
    """The inline PTX runs only on NVIDIA GPUs (not under TRITON_INTERPRET), and fp16 would round fp32 x."""
    return cfg.f16x2 and x.is_cuda and torch.version.hip is None and x.dtype in (torch.float16, torch.bfloat16)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed per-tile arrival counters, reset by the kernel itself after use. One buffer per device, so calls
    must not overlap on two streams; it is allocated on first use, so run once before capturing a CUDA graph."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1 << 14), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def quant_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, config: QuantMatmulConfig | None = None
) -> torch.Tensor:
    """x [M, in_features] (fp16/bf16/fp32, rows contiguous) -> [M, out_features] in x.dtype. On the CUDA kernel's
    default launch (programmatic dependent launch, weights loaded before the wait) `qw` must not be written by the
    kernel just before this call in the stream; x and bias may be."""
    if x.dim() != 2 or x.shape[1] != qw.in_features or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {qw.in_features}] with contiguous rows, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if qw.packed.device != x.device:
        raise ValueError(f"weight is on {qw.packed.device}, x on {x.device}")
    if bias is not None and (bias.shape != (qw.out_features,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{qw.out_features}] vector")
    m, n = x.shape[0], qw.out_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or default_config(m, n, qw, _num_sms(x.device), usable(x, qw, bias))
    if cfg.mma is not None:
        return quant_mma_matmul(x, qw, bias, cfg.mma)
    if cfg.dot and cfg.block_m < 16:
        raise ValueError("the tensor-core kernel needs block_m >= 16")
    if cfg.dot:  # whole groups, padding included (its activations load as zeros)
        n_chunks, step = qw.padded_in_features // 32, qw.group_size // 32
        extra = {"EVEN_K": qw.in_features % qw.group_size == 0, "EVEN_N": n % cfg.block_n == 0}
    else:  # only chunks holding real input features
        n_chunks, step = triton.cdiv(qw.in_features, 32), cfg.chunks
        extra = {"EVEN_K": qw.in_features % 32 == 0, "EVEN_N": n % cfg.block_n == 0}
    per_split = triton.cdiv(triton.cdiv(n_chunks, cfg.split_k), step) * step
    split = triton.cdiv(n_chunks, per_split)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    cnt = _counters(x.device, grid[0] * grid[2]) if split > 1 else qw.packed
    kernel = _dot_kernel if cfg.dot else _gemv_kernel
    kernel[grid](
        x,
        qw.packed,
        qw.scales,
        qw.mins,
        bias if bias is not None else out,
        out,
        ws,
        cnt,
        m,
        n,
        qw.in_features,
        qw.groups,
        n_chunks,
        per_split,
        x.stride(0),
        out.stride(0),
        MAGIC,
        BITS=qw.bits,
        GROUP=qw.group_size,
        LB=qw.block_n,
        BM=cfg.block_m,
        BN=cfg.block_n,
        C=cfg.chunks,
        SPLIT_K=split > 1,
        REDUCE=_reduce_width(split, cfg),
        HAS_BIAS=bias is not None,
        STAGES=cfg.num_stages,
        **({} if cfg.dot else {"PREFETCH": int(cfg.prefetch), "F16X2": _use_f16x2(cfg, x)}),
        num_warps=cfg.num_warps,
        **extra,
    )
    return out


def quant_matmul_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize to fp32, multiply in fp32, round once to x.dtype: the math both kernels implement."""
    y = x.float() @ dequantize(qw)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
