"""The vocabulary trie walk in compiled code: one call runs every token string from a configuration.

Depth first over the flat trie (vocab.py's `VocabIndex.flat`), stepping configurations through
nb_earley.step, which builds any it has not met, so a classification walk makes no round trip to Python.
A subtree is accepted whole, without a visit, when every byte under it stays on the main byte group of the
configurations its strings pass through (a string body's loop, a counted class count by count): then no
string under it can die.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from .nb_earley import IRT, main, step
from .nb_store import (BITS, CFG, F_CAN_END, F_MAIN_N, F_MAIN_T, F_NALLOW, FULL, NCF, PK, TABLE, UNKNOWN, A, I, ST,
                       part)

# flat trie arrays (VocabIndex.flat): per node
V_BYTE, V_LO, V_HI, V_TERM, V_CLO, V_CHI, V_REACH, V_BELOW, V_FIRST = range(9)
SKIP_SPAN = 32  # subtrees of fewer strings are walked rather than checked for wholesale acceptance
LOOP_MIN = 32  # byte groups smaller than this are not followed to accept whole subtrees
VT = PK


@njit(I(IRT, ST, VT, I, I), cache=True)
def _whole(ir, st, vt, cid, node):
    """1 if every string under `node` (reached in configuration cid) stays on main byte groups, 0 if not,
    FULL if the memo needs room."""
    below = part(vt, V_BELOW)
    d = part(vt, V_REACH)[node]
    cfg, bits = st[CFG], st[BITS]
    k = cid
    for _ in range(d):
        if cfg[NCF * k + F_NALLOW] < LOOP_MIN:
            return 0
        t = cfg[NCF * k + F_MAIN_T]
        if t == UNKNOWN:
            t = main(ir, st, k)
        if t == FULL:
            return FULL
        if t < 0 or cfg[NCF * k + F_MAIN_N] < LOOP_MIN:
            return 0
        for w in range(8):
            if below[8 * node + w] & ~bits[16 * k + 8 + w]:
                return 0
        if t == k:
            return 1
        k = t
    return 1


@njit(A(A, I), cache=True)
def _grow(a, n):
    if n < len(a):
        return a
    b = np.empty(2 * len(a) + 16, a.dtype)
    b[: len(a)] = a
    return b


@njit(types.Tuple((I, A, A, A, A, A))(IRT, ST, VT, I, types.boolean, A), cache=True)
def walk(ir, st, vt, start, exits, cum):
    """Runs every string (or, when `cum` is non-empty, only those whose flag's running sum `cum` counts)
    from configuration `start`. Returns (status, lo, hi, ex_lo, ex_hi, ex_byte): accepted strings as
    disjoint ranges [lo, hi) sorted by lo (depth first with children in byte order is sorted order;
    adjacent ranges are merged) and, when `exits`, the ranges of strings that pass a point where
    the bottom item's rule has ended with the byte that comes next there. Status FULL: grow and call again."""
    byte, lo_a, hi_a, term = part(vt, V_BYTE), part(vt, V_LO), part(vt, V_HI), part(vt, V_TERM)
    clo_a, chi_a, first = part(vt, V_CLO), part(vt, V_CHI), part(vt, V_FIRST)
    cfg, bits, table = st[CFG], st[BITS], st[TABLE]
    filt = len(cum) > 0
    acc_lo = np.empty(64, np.int32)
    acc_hi = np.empty(64, np.int32)
    na = 0
    ex_lo = np.empty(64, np.int32)
    ex_hi = np.empty(64, np.int32)
    ex_b = np.empty(64, np.int32)
    ne = 0
    s_node = np.empty(256, np.int32)
    s_cfg = np.empty(256, np.int32)
    s_deep = np.empty(256, np.int32)
    ns = 0
    for b in range(255, -1, -1):
        if (bits[16 * start + (b >> 5)] >> (b & 31)) & 1:
            nd = first[b]
            if nd >= 0 and (not filt or cum[hi_a[nd]] > cum[lo_a[nd]]):
                s_node[ns] = nd
                s_cfg[ns] = start
                s_deep[ns] = 0
                ns += 1
    empty = np.empty(0, np.int32)
    while ns:
        ns -= 1
        node, p = s_node[ns], s_cfg[ns]
        b = byte[node]
        if exits and s_deep[ns] and cfg[NCF * p + F_CAN_END]:
            ex_lo, ex_hi, ex_b = _grow(ex_lo, ne), _grow(ex_hi, ne), _grow(ex_b, ne)
            ex_lo[ne], ex_hi[ne], ex_b[ne] = lo_a[node], hi_a[node], b
            ne += 1
        c = table[256 * p + b]
        if c == UNKNOWN:
            c = step(ir, st, p, b)
        if c == FULL:
            return FULL, empty, empty, empty, empty, empty
        if c < 0:
            continue
        t = term[node]
        if t >= 0:
            if na and acc_hi[na - 1] == t:
                acc_hi[na - 1] = t + 1
            else:
                acc_lo, acc_hi = _grow(acc_lo, na), _grow(acc_hi, na)
                acc_lo[na], acc_hi[na] = t, t + 1
                na += 1
        clo, chi = clo_a[node], chi_a[node]
        if clo == chi:
            continue
        if hi_a[node] - lo_a[node] >= SKIP_SPAN and cfg[NCF * c + F_NALLOW] >= LOOP_MIN:
            w = _whole(ir, st, vt, c, node)
            if w == FULL:
                return FULL, empty, empty, empty, empty, empty
            if w:
                lo = lo_a[node] + (1 if t >= 0 else 0)
                if lo < hi_a[node]:
                    if na and acc_hi[na - 1] == lo:
                        acc_hi[na - 1] = hi_a[node]
                    else:
                        acc_lo, acc_hi = _grow(acc_lo, na), _grow(acc_hi, na)
                        acc_lo[na], acc_hi[na] = lo, hi_a[node]
                        na += 1
                continue
        every = exits and cfg[NCF * c + F_CAN_END] != 0  # children it cannot scan still record their exit
        for k in range(chi - 1, clo - 1, -1):
            x = byte[k]
            if not every and not (bits[16 * c + (x >> 5)] >> (x & 31)) & 1:
                continue
            if filt and cum[hi_a[k]] <= cum[lo_a[k]]:
                continue
            if ns >= len(s_node):
                s_node, s_cfg, s_deep = _grow(s_node, ns), _grow(s_cfg, ns), _grow(s_deep, ns)
            s_node[ns], s_cfg[ns], s_deep[ns] = k, c, 1
            ns += 1
    return 0, acc_lo[:na].copy(), acc_hi[:na].copy(), ex_lo[:ne].copy(), ex_hi[:ne].copy(), ex_b[:ne].copy()
