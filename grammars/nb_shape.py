"""Shapes and contexts of configurations in compiled code: what a configuration can do within one token.

A configuration's shape is its kernel items with counts clamped to one token's reach of their bounds and
origins replaced by their context; the context of an origin o for rule r is the set of o's items waiting on r
(clamped counts, their own contexts), all that closure ever reads of an origin. Configurations of one shape
have one mask (mask.py), so the 7th and 8th elements of `minItems: 200` share it. Both are interned records
of nb_store's interner (shape and context ids are record ids), built without a Python object per item: in
Python a shape cost ~7 us, mostly contexts met for the first time.

Items are encoded as quads (state, clamp of the lower bound, clamp of the upper bound or -1 when unbounded,
context); a state without a counted repetition has clamps (0, 0), ROOT_CTX is the bottom origin's context and
a context cut short (a cycle, or an origin chain deeper than MAX_CONTEXT_DEPTH) is AT - o: the origin itself,
exact and unshared.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .nb_earley import IRT, R_REPB, R_REPHI, R_REPLO, R_RULE, kernel_span, waiters
from .nb_store import DATA, FULL, K_CSET, K_CTX, K_SHAPE, VAL, I, ST, insert, lookup, part, room

MAX_CONTEXT_DEPTH = 64
ROOT_CTX = -1
AT = -2  # a context cut short: AT - o


@njit(inline="always")
def _clamps(ir, s, c, h):
    """mask.py's `_ckey` of an item at state s with count c, as two ints."""
    if part(ir, R_REPB)[s] < 0:
        return 0, 0
    lo, hi = part(ir, R_REPLO)[s], part(ir, R_REPHI)[s]
    return min(max(lo - c, 0), h), (-1 if hi < 0 else min(hi - c, h))


@njit(inline="always")
def _quads(ir, items, n, ctx, h, out):
    """Writes the n items (state, origin, count) as quads into `out`, with contexts `ctx`, sorted; returns
    out's length."""
    for j in range(n):
        a, b = _clamps(ir, items[3 * j], items[3 * j + 2], h)
        out[4 * j], out[4 * j + 1], out[4 * j + 2], out[4 * j + 3] = items[3 * j], a, b, ctx[j]
    # sort quads as pairs of triples: (state, a, b) then context
    keys = np.empty(n, np.int64)
    for j in range(n):
        keys[j] = j
    for i in range(1, n):  # insertion sort: a handful of items
        j = i
        while j > 0 and _less4(out, keys[j], keys[j - 1]):
            keys[j], keys[j - 1] = keys[j - 1], keys[j]
            j -= 1
    sorted_out = np.empty(4 * n, np.int32)
    m = 0
    for i in range(n):
        k = keys[i]
        if m and (sorted_out[4 * m - 4] == out[4 * k] and sorted_out[4 * m - 3] == out[4 * k + 1]
                  and sorted_out[4 * m - 2] == out[4 * k + 2] and sorted_out[4 * m - 1] == out[4 * k + 3]):
            continue
        for q in range(4):
            sorted_out[4 * m + q] = out[4 * k + q]
        m += 1
    out[: 4 * m] = sorted_out[: 4 * m]
    return 4 * m


@njit(inline="always")
def _less4(b, i, j):
    for q in range(4):
        if b[4 * i + q] != b[4 * j + q]:
            return b[4 * i + q] < b[4 * j + q]
    return False


@njit(I(IRT, ST, I, I, I), cache=True)
def context(ir, st, o, r, h):
    """The context id of origin o for rule r (ROOT_CTX for the bottom origin), or FULL. Depth first over
    explicit frames, as nb_earley.origin."""
    if o < 0:
        return ROOT_CTX
    key = np.empty(2, np.int32)
    key[0] = o
    key[1] = r
    k = lookup(st, K_CTX, key, 0, 2)
    if k >= 0:
        return st[VAL][k]
    rule = part(ir, R_RULE)
    f_o = np.empty(MAX_CONTEXT_DEPTH + 2, np.int64)
    f_r = np.empty(MAX_CONTEXT_DEPTH + 2, np.int64)
    f_at = np.empty(MAX_CONTEXT_DEPTH + 2, np.int64)  # its waiting items: buf[3 * f_at : 3 * f_end]
    f_end = np.empty(MAX_CONTEXT_DEPTH + 2, np.int64)
    f_j = np.empty(MAX_CONTEXT_DEPTH + 2, np.int64)  # next item whose context to find
    buf = np.empty(48, np.int32)
    ctx = np.empty(16, np.int64)  # ctx[j]: the context of buf's item j
    f_o[0], f_r[0], f_at[0], f_j[0] = o, r, 0, 0
    buf, f_end[0] = waiters(ir, st, o, r, buf, 0)
    d = 0
    while True:
        if len(ctx) < f_end[d]:
            grown = np.empty(2 * f_end[d], np.int64)
            grown[: len(ctx)] = ctx
            ctx = grown
        j = f_j[d]
        if j < f_end[d]:
            f_j[d] = j + 1
            o2 = buf[3 * j + 1]
            r2 = rule[buf[3 * j]]
            if o2 < 0:
                ctx[j] = ROOT_CTX
                continue
            key[0] = o2
            key[1] = r2
            k = lookup(st, K_CTX, key, 0, 2)
            if k >= 0:
                ctx[j] = st[VAL][k]
                continue
            busy = d + 1 > MAX_CONTEXT_DEPTH
            for i in range(d + 1):
                if f_o[i] == o2 and f_r[i] == r2:
                    busy = True
                    break
            if busy:
                ctx[j] = AT - o2
                continue
            f_j[d] = j  # come back to store the child's result
            d += 1
            f_o[d], f_r[d], f_at[d], f_j[d] = o2, r2, f_end[d - 1], f_end[d - 1]
            buf, f_end[d] = waiters(ir, st, o2, r2, buf, f_end[d - 1])
            continue
        n = f_end[d] - f_at[d]
        items = buf[3 * f_at[d]: 3 * f_end[d]]
        quads = np.empty(4 * max(n, 1), np.int32)
        m = _quads(ir, items, n, ctx[f_at[d]: f_end[d]], h, quads)
        if room(st, m + 2, 2) == FULL:
            return FULL
        k = lookup(st, K_CSET, quads, 0, m)
        if k < 0:
            k = insert(st, K_CSET, quads, 0, m, 0)
        key[0] = f_o[d]
        key[1] = f_r[d]
        insert(st, K_CTX, key, 0, 2, k)
        if d == 0:
            return k
        d -= 1
        j = f_j[d]
        ctx[j] = k
        f_j[d] = j + 1


@njit(I(IRT, ST, I, I), cache=True)
def shape(ir, st, cid, h):
    """The shape id of configuration cid (counts clamped to h bytes of their bounds), or FULL. The shape
    record's value is -1 until mask.py records the index of the shape's mask there."""
    rule = part(ir, R_RULE)
    kd = st[DATA]
    ka, kb = kernel_span(st, cid)
    n = (kb - ka) // 3
    items = kd[ka:kb].copy()
    ctx = np.empty(max(n, 1), np.int64)
    for j in range(n):
        c = context(ir, st, items[3 * j + 1], rule[items[3 * j]], h)
        if c == FULL:
            return FULL
        ctx[j] = c
    quads = np.empty(4 * max(n, 1), np.int32)
    m = _quads(ir, items, n, ctx, h, quads)
    k = lookup(st, K_SHAPE, quads, 0, m)
    if k >= 0:
        return k
    if room(st, m, 1) == FULL:
        return FULL
    return insert(st, K_SHAPE, quads, 0, m, -1)
