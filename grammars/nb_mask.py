"""A classification's results turned into mask words and uncertain strings, in compiled code.

Each classification walk (mask.py) ends here: its accepted string ranges become token bitmask words, and its
exits (with the byte after each) become the uncertain strings for one FOLLOW1 set. In numpy both cost tens
of microseconds of vocabulary-sized temporaries however few tokens are involved; here they cost what the
ranges hold.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

A = types.Array(types.int32, 1, "C")
A64 = types.Array(types.int64, 1, "C")
U8 = types.Array(types.uint8, 1, "C", readonly=True)
U32 = types.Array(types.uint32, 1, "C")


@njit(types.void(A, A, A64, A64, U32), cache=True)
def range_words(lo, hi, ids_start, ids, words):
    """Sets in `words` the bit of every token id spelling a string in one of the ranges [lo, hi)."""
    for r in range(len(lo)):
        for p in range(ids_start[lo[r]], ids_start[hi[r]]):
            t = ids[p]
            words[t >> 5] |= np.uint32(1) << np.uint32(t & 31)


@njit(types.void(A, A, A64, A64, U32, U32), cache=True)
def set_words(lo, hi, ids_start, ids, all_words, words):
    """Sets in `words` (zeros) the bits of the tokens spelling strings in the ranges [lo, hi): token by
    token, or, when the ranges hold most strings, as `all_words` (every string's tokens) less the strings
    between them, so a string body's ~48k accepted tokens cost what its few hundred rejected ones do (one
    bit at a time that was ~50 us a mask)."""
    n = len(ids_start) - 1
    total = 0
    for r in range(len(lo)):
        total += hi[r] - lo[r]
    if 2 * total <= n:
        range_words(lo, hi, ids_start, ids, words)
        return
    words[:] = all_words
    prev = 0
    for r in range(len(lo) + 1):
        end = lo[r] if r < len(lo) else n
        for p in range(ids_start[prev], ids_start[end]):
            t = ids[p]
            words[t >> 5] &= ~(np.uint32(1) << np.uint32(t & 31))
        if r < len(lo):
            prev = hi[r]


@njit(A(A, A, A, A, A, U8, types.int64), cache=True)
def uncertain(lo, hi, ex_lo, ex_hi, ex_byte, follow, n):
    """Sorted strings that pass an exit whose next byte is in `follow` and are not accepted."""
    a, b = n, 0
    for e in range(len(ex_lo)):
        if follow[ex_byte[e]]:
            a = min(a, ex_lo[e])
            b = max(b, ex_hi[e])
    if a >= b:
        return np.zeros(0, np.int32)
    mark = np.zeros(b - a, np.uint8)
    for e in range(len(ex_lo)):
        if follow[ex_byte[e]]:
            mark[ex_lo[e] - a: ex_hi[e] - a] = 1
    for r in range(len(lo)):
        x, y = max(lo[r], a), min(hi[r], b)
        if x < y:
            mark[x - a: y - a] = 0
    out = np.empty(b - a, np.int32)
    m = 0
    for i in range(b - a):
        if mark[i]:
            out[m] = a + i
            m += 1
    return out[:m].copy()
