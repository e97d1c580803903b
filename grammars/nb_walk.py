"""The vocabulary trie walk in compiled code: one call runs every token string from a configuration.

Front to back over the trie's nodes in depth-first order (vocab.py's `VocabIndex.flat`: a node's subtree
follows it, so skipping a subtree is a jump and the walk reads memory in order), stepping configurations
through nb_earley.step, which builds any it has not met, so a classification walk makes no round trip to
Python.
A sibling the stepping configuration cannot scan is passed over through the siblings' bytes side by side
(`VocabIndex.flat` lists them per parent), not by reading each sibling's record, which lies a whole subtree
past the previous one (two thirds of the nodes a walk met were such siblings).
A subtree is accepted whole, without a visit, when every byte under it stays on the main byte group of the
configurations its strings pass through (a string body's loop, a counted class count by count): then no
string under it can die.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from .nb_earley import IRT, R_REPB, R_REPHI, initial, kernel_span, main, step
from .nb_mask import A64, U8, U32, set_words, uncertain
from .nb_shape import shape
from .nb_store import (BITS, CFG, DATA, F_CAN_END, F_MAIN_N, F_MAIN_T, F_NALLOW, FULL, NCF, PK, TABLE, UNKNOWN, VAL,
                       A, I, ST, part)

# a trie node's record in VocabIndex.flat: what every visit reads (HOT int32), kept small so the walk's reads
# stay in cache, and what only wholesale acceptance reads (COLD int32)
H_KEY, H_LO, H_HI, H_SKIP = range(4)  # H_KEY: byte | depth << 8 | TERM (the string at lo ends at the node)
HOT = 4
TERM = 1 << 30
C_REACH, C_BELOW = 0, 1  # longest string's bytes below the node, then 8 words: the bytes below it
COLD = 9
SKIP_SPAN = 2  # single strings are walked; larger subtrees are first checked for wholesale acceptance
LOOP_MIN = 32  # byte groups smaller than this are not followed to accept whole subtrees
SHORT = -4  # a walk's status: its result buffer is too small
SHAPED, WALKED, CLASSIFY = range(3)  # how config_words answered
VT = PK


@njit(inline="always")
def _whole(cfg, bits, cold, cid, f):
    """1 if every string under the node at cold record f (reached in configuration cid) stays on main byte
    groups, 0 if not, 2 + k if that needs the main group of configuration k, not built yet. Inlined into the
    walk's loop with no call that builds configurations: such a call there made the walk 2-3x slower, so
    building is `_whole_building`'s, off the hot path."""
    k = cid
    for _ in range(cold[f + C_REACH]):
        if cfg[NCF * k + F_NALLOW] < LOOP_MIN:
            return 0
        t = cfg[NCF * k + F_MAIN_T]
        if t == UNKNOWN:
            return 2 + k
        if t < 0 or cfg[NCF * k + F_MAIN_N] < LOOP_MIN:
            return 0
        for w in range(8):
            if cold[f + C_BELOW + w] & ~bits[16 * k + 8 + w]:
                return 0
        if t == k:
            return 1
        k = t
    return 1


@njit(I(IRT, ST, A, I, I), cache=True)
def _whole_building(ir, st, cold, cid, f):
    """`_whole`, building the main groups it needs on the way; FULL if the memo needs room."""
    while True:
        w = _whole(st[CFG], st[BITS], cold, cid, f)
        if w < 2:
            return w
        if main(ir, st, w - 2) == FULL:
            return FULL


@njit(types.Tuple((I, A, A, A, A, A))(IRT, ST, VT, I, types.boolean, A, I), cache=True)
def walk(ir, st, vt, start, exits, cum, cap):
    """Runs every string (or, when `cum` is non-empty, only those whose flag's running sum `cum` counts)
    from configuration `start`. Returns (status, lo, hi, ex_lo, ex_hi, ex_byte): accepted strings as
    disjoint ranges [lo, hi) sorted by lo (adjacent ones merged) and, when `exits`, the ranges of strings
    that pass a point where the bottom item's rule has ended with the byte that comes next there. Status
    FULL: grow and call again; SHORT: more than `cap` ranges or exits, call again with a larger cap (results
    go to one buffer of fixed size: arrays grown and replaced inside the loop made the walk ~2x slower)."""
    hot, cold = part(vt, 0), part(vt, 1)
    kb, kn, sib = part(vt, 3), part(vt, 4), part(vt, 5)
    n_nodes = len(hot) // HOT
    cfg, bits, table = st[CFG], st[BITS], st[TABLE]
    filt = len(cum) > 0
    out = np.empty(5 * cap, np.int32)  # accepted lo, hi, then exits' lo, hi, byte: cap of each
    na = 0
    ne = 0
    empty = np.empty(0, np.int32)
    at = np.empty(part(vt, 2)[0] + 2, np.int32)  # at[d]: the configuration the nodes of depth d step from
    at[0] = start
    i = 0
    while i < n_nodes:
        f = HOT * i
        key, lo, hi, skip = hot[f + H_KEY], hot[f + H_LO], hot[f + H_HI], hot[f + H_SKIP]
        if filt and cum[hi] <= cum[lo]:
            i = skip
            continue
        d, b = (key & (TERM - 1)) >> 8, key & 255
        p = at[d]
        if exits and d and cfg[NCF * p + F_CAN_END]:
            if ne == cap:
                return SHORT, empty, empty, empty, empty, empty
            out[2 * cap + ne], out[3 * cap + ne], out[4 * cap + ne] = lo, hi, b
            ne += 1
        if not (bits[16 * p + (b >> 5)] >> (b & 31)) & 1:
            if exits and d and cfg[NCF * p + F_CAN_END]:  # every sibling is an exit to record
                i = skip
                continue
            # on to the next sibling p can scan, through the siblings' bytes side by side
            j, e = sib[2 * i] + 1, sib[2 * i + 1]
            while j < e:
                x = kb[j]
                if (bits[16 * p + (x >> 5)] >> (x & 31)) & 1:
                    break
                j += 1
            i = kn[j] if j < e else hot[HOT * kn[e - 1] + H_SKIP]
            continue
        c = table[256 * p + b]
        if c == UNKNOWN:
            c = step(ir, st, p, b)
            if c == FULL:
                return FULL, empty, empty, empty, empty, empty
        if c < 0:
            i = skip
            continue
        t = lo if key & TERM else -1
        if t >= 0:
            if na and out[cap + na - 1] == t:
                out[cap + na - 1] = t + 1
            else:
                if na == cap:
                    return SHORT, empty, empty, empty, empty, empty
                out[na], out[cap + na] = t, t + 1
                na += 1
        if skip == i + 1:
            i = skip
            continue
        if hi - lo >= SKIP_SPAN and cfg[NCF * c + F_NALLOW] >= LOOP_MIN:
            w = _whole(cfg, bits, cold, c, COLD * i)
            if w >= 2:
                w = _whole_building(ir, st, cold, c, COLD * i)
                if w == FULL:
                    return FULL, empty, empty, empty, empty, empty
            if w:
                lo += 1 if t >= 0 else 0
                if lo < hi:
                    if na and out[cap + na - 1] == lo:
                        out[cap + na - 1] = hi
                    else:
                        if na == cap:
                            return SHORT, empty, empty, empty, empty, empty
                        out[na], out[cap + na] = lo, hi
                        na += 1
                i = skip
                continue
        at[d + 1] = c
        i += 1
    return (0, out[:na].copy(), out[cap: cap + na].copy(), out[2 * cap: 2 * cap + ne].copy(),
            out[3 * cap: 3 * cap + ne].copy(), out[4 * cap: 4 * cap + ne].copy())


@njit(types.Tuple((I, A, A, A, A, A, A))(IRT, ST, VT, I, I, A64, A64, U32, U32, U8, I), cache=True)
def classify(ir, st, vt, s, c, ids_start, ids, all_words, words, follow, cap):
    """A classification in one call (mask.py's, for an item at state s with count c under the bottom origin):
    the walk with exits from that item's configuration, the tokens of its accepted strings set in `words`
    (zeros, left untouched unless the call completes; `all_words`: every string's tokens) and the uncertain
    strings for FOLLOW1 set `follow`.
    Returns (status, unc, lo, hi, ex_lo, ex_hi, ex_byte); status FULL or SHORT as in `walk`."""
    empty = np.empty(0, np.int32)
    start = initial(ir, st, s, c, -1)
    if start == FULL:
        return FULL, empty, empty, empty, empty, empty, empty
    r, lo, hi, ex_lo, ex_hi, ex_b = walk(ir, st, vt, start, True, empty, cap)
    if r != 0:
        return r, empty, empty, empty, empty, empty, empty
    set_words(lo, hi, ids_start, ids, all_words, words)
    return 0, uncertain(lo, hi, ex_lo, ex_hi, ex_b, follow, len(ids_start) - 1), lo, hi, ex_lo, ex_hi, ex_b


@njit(types.UniTuple(I, 3)(IRT, ST, VT, I, I, A64, A64, U32, U32, I), cache=True)
def config_words(ir, st, vt, cid, h, ids_start, ids, all_words, words, cap):
    """A new configuration's mask in one call (mask.py's). Returns (status, shape id, how): SHAPED when a mask
    of its shape (counts clamped to h bytes of their bounds) is known, the shape record's value being that
    mask's index (mask.py sets it); CLASSIFY when a kernel item is a counted repetition out of one token's
    reach of its upper bound (mask.py classifies such items: one classification serves every such count);
    else WALKED, the tokens a walk from cid accepts set in `words` (zeros, left untouched unless the call
    completes). Status FULL or SHORT as in `walk`."""
    sid = shape(ir, st, cid, h)
    if sid == FULL:
        return FULL, 0, 0
    if st[VAL][sid] >= 0:
        return 0, sid, SHAPED
    repb, rephi = part(ir, R_REPB), part(ir, R_REPHI)
    kd = st[DATA]
    ka, kb = kernel_span(st, cid)
    for p in range(ka, kb, 3):
        s = kd[p]
        if repb[s] >= 0 and (rephi[s] < 0 or rephi[s] - kd[p + 2] >= h):
            return 0, sid, CLASSIFY
    r, lo, hi, _, _, _ = walk(ir, st, vt, cid, False, np.empty(0, np.int32), cap)
    if r != 0:
        return r, 0, 0
    set_words(lo, hi, ids_start, ids, all_words, words)
    return 0, sid, WALKED
