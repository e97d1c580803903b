"""Dense bitstream packing of b-bit integers along K, the storage format of the weight-only quantized matmul.

Column n of `packed` ([K * bits / 32, N] int32) is the little-endian bitstream of q[:, n]: element k occupies bits
[k * bits, (k + 1) * bits), so 32 elements fill exactly `bits` words and nothing is wasted at 3, 5 or 6 bits. A
value may straddle two words; the matmul kernel decodes each of the 32 element slots with compile-time shifts and
masks (a funnel shift for the few straddling slots), which costs fewer ALU operations per weight than the
bit-plane alternative (one mask-and-convert per plane, two planes at 3, 5 and 6 bits), while moving the same
bytes. Rows of words are contiguous along N so a tile of columns loads as wide coalesced vectors.

`to_row_blocks` rearranges such a [K-rows, N] array into the decode layout: blocks of `block_n` output columns,
each block's words contiguous along K. A GEMV program that owns a few columns then streams one contiguous slab
instead of rows N * 4 bytes apart, so no split-K is needed to fill the GPU; inside a block the words of
`chunks` consecutive chunks that share a word index j sit side by side, so lanes working on neighbouring chunks
issue one coalesced vector load per word.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
CHUNK = 32  # elements per run of `bits` words


def _check(bits: int, k: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if k % CHUNK:
        raise ValueError(f"the packed dimension must be a multiple of {CHUNK}, got {k}")


def _slot(e: int, bits: int) -> tuple[int, int]:
    """Word index (within its chunk) and bit offset of element slot e."""
    start = e * bits
    return start // 32, start % 32


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] integers in [0, 2**bits) -> packed [K * bits / 32, N] int32 (K a multiple of 32)."""
    _check(bits, q.shape[0])
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [K, N], got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits})")
    k, n = q.shape
    chunks = q.to(torch.int64).view(k // CHUNK, CHUNK, n)
    words = torch.zeros(k // CHUNK, bits, n, dtype=torch.int64, device=q.device)
    for e in range(CHUNK):
        j, s = _slot(e, bits)
        words[:, j] |= (chunks[:, e] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[:, j + 1] |= chunks[:, e] >> (32 - s)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.view(k // CHUNK * bits, n).to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: packed [K * bits / 32, N] int32 -> q [K, N] int32."""
    if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[0] % bits:
        raise ValueError(f"packed must be [K * {bits} / 32, N] int32, got {tuple(packed.shape)} {packed.dtype}")
    k = packed.shape[0] // bits * CHUNK
    _check(bits, k)
    n = packed.shape[1]
    words = packed.to(torch.int64).view(k // CHUNK, bits, n) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = torch.empty(k // CHUNK, CHUNK, n, dtype=torch.int32, device=packed.device)
    for e in range(CHUNK):
        j, s = _slot(e, bits)
        v = words[:, j] >> s
        if s + bits > 32:
            v = v | (words[:, j + 1] << (32 - s))
        out[:, e] = (v & mask).to(torch.int32)
    return out.view(k, n)


def to_row_blocks(t: torch.Tensor, block_n: int, chunks: int = 1, words: int = 1) -> torch.Tensor:
    """[R, N] (R = runs of `chunks` chunks of `words` rows each) -> [ceil(N / block_n), R * block_n].

    Row r = (run * chunks + c) * words + j of column n lands in block n // block_n at
    ((run * words + j) * chunks + c) * block_n + n % block_n; columns past N are zero-filled.
    """
    if t.dim() != 2 or block_n < 1 or t.shape[0] % (chunks * words):
        raise ValueError(f"cannot block {tuple(t.shape)} into runs of {chunks} x {words} rows, {block_n} columns")
    r, n = t.shape
    blocks = -(-n // block_n)
    if blocks * block_n != n:
        t = torch.cat([t, t.new_zeros(r, blocks * block_n - n)], 1)
    runs = t.view(r // (chunks * words), chunks, words, blocks, block_n)
    return runs.permute(3, 0, 2, 1, 4).reshape(blocks, r * block_n)


def from_row_blocks(t: torch.Tensor, n: int, block_n: int, chunks: int = 1, words: int = 1) -> torch.Tensor:
    """Inverse of `to_row_blocks`: [ceil(n / block_n), R * block_n] -> [R, n]."""
    blocks = t.shape[0]
    if t.dim() != 2 or blocks != -(-n // block_n) or t.shape[1] % (block_n * chunks * words):
        raise ValueError(f"{tuple(t.shape)} is not a row-blocked array of {n} columns")
    r = t.shape[1] // block_n
    runs = t.view(blocks, r // (chunks * words), words, chunks, block_n)
    return runs.permute(1, 3, 2, 0, 4).reshape(r, blocks * block_n)[:, :n]
