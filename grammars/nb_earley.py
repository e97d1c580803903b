"""The Earley core in compiled code: closure, interned configurations, origin representatives, byte steps.

Items are int32 triples (state, origin, count); a configuration is the interned, sorted set of its kernel
items (nb_store's kernel interner: its id is the configuration id). The grammar's static tables come from
`ir_arrays` as a tuple of int32 arrays, built once per compile with numpy. The semantics are earley.py's
(see there); this module only does them without a Python object per item or configuration.

Callers hold the Space's lock: these functions grow the shared memo.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit, types

from .automata import GrammarIR
from .nb_store import (BITS, CFG, DATA, DEAD, F_CAN_END, F_INC, F_KERN, F_MAIN_N, F_MAIN_T, F_NALLOW, F_ROOTS, F_SELF,
                       FULL, K_KERN, K_ORIG, K_PRED, K_ROOTS, K_SCAN, K_SELF, K_WAIT, M_NCFG, META, NCF, PK, PTR, ST,
                       TABLE, UNKNOWN, VAL, A, I, insert, lookup, need, packed, part, room)

MAX_ORIGIN_DEPTH = 64  # origin chains followed this deep to find a representative; deeper ones stay as they are

# the grammar's tables (ir_arrays), per state unless said otherwise
R_BNEXT = 0  # 256 per state: byte -> state, -1 none
R_SBITS = 1  # 8 words per state: its bytes
R_SCANS = 2  # 1 if it has a byte transition
R_FINAL = 3
R_KEEP = 4  # not a dead end (a final state with no way on is not kept in kernels)
R_RULE = 5
R_REPB = 6  # counted repetition (the single state of a REP rule): body rule, else -1
R_REPLO = 7
R_REPHI = 8  # -1: unbounded
R_RN_PTR = 9  # rule references: state s's are entries rn_ptr[s]:rn_ptr[s + 1]
R_RN_RULE = 10
R_RN_TGT = 11
R_RULE_BASE = 12  # per rule
R_NULLABLE = 13  # per rule
R_SIZES = 14  # (n_states, n_rules)
IRT = PK
U8 = types.Array(types.uint8, 1, "C", readonly=True)
I64A = types.Array(types.int64, 1, "C")
B = types.boolean
AN = types.Tuple((A, I))
ORIGIN_SIG = I(IRT, ST, I, I)


def ir_arrays(ir: GrammarIR) -> tuple[np.ndarray, np.ndarray]:
    """The IR's tables (R_* order) packed into one int32 array, without a Python loop over bytes."""
    n = ir.n_states
    bnext = ir.byte_table()
    sbits = np.packbits(bnext >= 0, axis=1, bitorder="little").view(np.int32)
    rlen = np.fromiter(map(len, ir.rnext), dtype=np.int64, count=n)
    rn_ptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(rlen, out=rn_ptr[1:])
    rn_rule = np.fromiter(itertools.chain.from_iterable(ir.rnext), dtype=np.int32, count=int(rlen.sum()))
    rn_tgt = np.fromiter(itertools.chain.from_iterable(d.values() for d in ir.rnext), dtype=np.int32,
                         count=int(rlen.sum()))
    reps = [(-1, 0, -1) if r is None else (r[0], r[1], -1 if r[2] is None else r[2]) for r in ir.rep_of]
    rep = np.asarray(reps, dtype=np.int64).reshape(n, 3)
    if (rep[:, 1:] >= 2 ** 31 - 2).any():
        raise ValueError("a repetition bound exceeds 2**31 - 2")
    return packed([
        bnext.reshape(-1), sbits.reshape(-1), (bnext >= 0).any(axis=1).astype(np.int32),
        np.asarray(ir.final, dtype=np.int32), 1 - np.asarray(ir.dead_end, dtype=np.int32),
        np.asarray(ir.rule_of, dtype=np.int32), rep[:, 0].astype(np.int32), rep[:, 1].astype(np.int32),
        rep[:, 2].astype(np.int32), rn_ptr, rn_rule, rn_tgt, np.asarray(ir.rule_base, dtype=np.int32),
        np.asarray(ir.nullable, dtype=np.int32), np.asarray([n, len(ir.rule_names)], dtype=np.int32),
    ])


@njit(AN(A, I, I), cache=True)
def _push(buf, n, x):
    if n >= len(buf):
        nb = np.empty(2 * len(buf) + 8, np.int32)
        nb[:n] = buf[:n]
        buf = nb
    buf[n] = x
    return buf, n + 1


@njit(AN(A, I, I, I, I), cache=True)
def _push3(buf, n, s, o, c):
    """Appends item (s, o, c) to a flat triple buffer holding n items."""
    if 3 * n + 3 > len(buf):
        nb = np.empty(2 * len(buf) + 24, np.int32)
        nb[: 3 * n] = buf[: 3 * n]
        buf = nb
    buf[3 * n] = s
    buf[3 * n + 1] = o
    buf[3 * n + 2] = c
    return buf, n + 1


@njit(B(A, I, I), cache=True)
def _less3(b, i, j):
    if b[3 * i] != b[3 * j]:
        return b[3 * i] < b[3 * j]
    if b[3 * i + 1] != b[3 * j + 1]:
        return b[3 * i + 1] < b[3 * j + 1]
    return b[3 * i + 2] < b[3 * j + 2]


@njit(I(A, I, A), cache=True)
def sort_items(b, n, flags):
    """Sorts n triples in place (carrying flags along), drops duplicates (OR-ing their flags); new n."""
    for i in range(1, n):
        j = i
        while j > 0 and _less3(b, j, j - 1):
            for k in range(3):
                b[3 * j + k], b[3 * j - 3 + k] = b[3 * j - 3 + k], b[3 * j + k]
            flags[j], flags[j - 1] = flags[j - 1], flags[j]
            j -= 1
    m = 0
    for i in range(n):
        if m and b[3 * m - 3] == b[3 * i] and b[3 * m - 2] == b[3 * i + 1] and b[3 * m - 1] == b[3 * i + 2]:
            flags[m - 1] |= flags[i]
            continue
        for k in range(3):
            b[3 * m + k] = b[3 * i + k]
        flags[m] = flags[i]
        m += 1
    return m


@njit(inline="always")
def kernel_span(st, o):
    """Where configuration o's kernel items lie in the interner's data: (start, end)."""
    ptr = st[PTR]
    k = st[CFG][NCF * o + F_KERN]
    return ptr[k] + 1, ptr[k + 1]


@njit(inline="always")
def self_span(st, o):
    """Where o's self (predicted) states lie: (start, end of the scanning ones, end)."""
    ptr = st[PTR]
    k = st[CFG][NCF * o + F_SELF]
    return ptr[k] + 1, ptr[k] + 1 + st[VAL][k], ptr[k + 1]


@njit(AN(IRT, I, A), cache=True)
def expand(ir, s, buf):
    """States of s's rule reachable from s over references to nullable rules: buf[0] = s, then the others."""
    buf[0] = s
    n = 1
    if part(ir, R_REPB)[s] >= 0:
        return buf, n
    rn_ptr, rn_rule, rn_tgt = part(ir, R_RN_PTR), part(ir, R_RN_RULE), part(ir, R_RN_TGT)
    nullable = part(ir, R_NULLABLE)
    i = 0
    while i < n:
        x = buf[i]
        i += 1
        for e in range(rn_ptr[x], rn_ptr[x + 1]):
            if nullable[rn_rule[e]]:
                t = rn_tgt[e]
                seen = False
                for j in range(n):
                    if buf[j] == t:
                        seen = True
                        break
                if not seen:
                    buf, n = _push(buf, n, t)
    return buf, n


@njit(AN(IRT, ST, I, I, A, I), cache=True)
def waiters(ir, st, o, r, out, n):
    """Appends the items of configuration o that wait on rule r, already advanced over it."""
    repb, replo, rephi = part(ir, R_REPB), part(ir, R_REPLO), part(ir, R_REPHI)
    rn_ptr, rn_rule, rn_tgt = part(ir, R_RN_PTR), part(ir, R_RN_RULE), part(ir, R_RN_TGT)
    kd = st[DATA]
    ka, kb = kernel_span(st, o)
    for p in range(ka, kb, 3):
        s, o2, c = kd[p], kd[p + 1], kd[p + 2]
        if repb[s] >= 0:
            if repb[s] == r:
                if rephi[s] < 0:
                    out, n = _push3(out, n, s, o2, min(c + 1, replo[s]))
                elif c < rephi[s]:
                    out, n = _push3(out, n, s, o2, c + 1)
        else:
            for e in range(rn_ptr[s], rn_ptr[s + 1]):
                if rn_rule[e] == r:
                    out, n = _push3(out, n, rn_tgt[e], o2, c)
    sa, _, sb = self_span(st, o)
    for p in range(sa, sb):
        s = kd[p]
        if repb[s] >= 0:
            if repb[s] == r:
                out, n = _push3(out, n, s, o, min(1, replo[s]) if rephi[s] < 0 else 1)
        else:
            for e in range(rn_ptr[s], rn_ptr[s + 1]):
                if rn_rule[e] == r:
                    out, n = _push3(out, n, rn_tgt[e], o, 0)
    return out, n


@njit(ORIGIN_SIG, cache=True)
def origin(ir, st, o, r):
    """The representative of origin o for items of rule r: the first configuration whose items waiting on
    r are the same (their origins represented in turn), the only thing closure reads of an origin. A cycle
    (left recursion) or a chain deeper than MAX_ORIGIN_DEPTH keeps o itself. Depth first over explicit
    frames (numba's cached recursive functions are not reliable)."""
    if o < 0:
        return o
    key = np.empty(2, np.int32)
    key[0] = o
    key[1] = r
    k = lookup(st, K_ORIG, key, 0, 2)
    if k >= 0:
        return st[VAL][k]
    rule = part(ir, R_RULE)
    f_o = np.empty(MAX_ORIGIN_DEPTH + 2, np.int64)
    f_r = np.empty(MAX_ORIGIN_DEPTH + 2, np.int64)
    f_at = np.empty(MAX_ORIGIN_DEPTH + 2, np.int64)  # its items: buf[3 * f_at : 3 * f_end]
    f_end = np.empty(MAX_ORIGIN_DEPTH + 2, np.int64)
    f_j = np.empty(MAX_ORIGIN_DEPTH + 2, np.int64)  # next item whose origin to represent
    buf = np.empty(48, np.int32)
    f_o[0], f_r[0], f_at[0], f_j[0] = o, r, 0, 0
    buf, f_end[0] = waiters(ir, st, o, r, buf, 0)
    d = 0
    while True:
        j = f_j[d]
        if j < f_end[d]:
            f_j[d] = j + 1
            o2 = buf[3 * j + 1]
            if o2 < 0:
                continue
            r2 = rule[buf[3 * j]]
            key[0] = o2
            key[1] = r2
            k = lookup(st, K_ORIG, key, 0, 2)
            if k >= 0:
                buf[3 * j + 1] = st[VAL][k]
                continue
            if d + 1 > MAX_ORIGIN_DEPTH:
                continue
            busy = False
            for i in range(d + 1):
                if f_o[i] == o2 and f_r[i] == r2:
                    busy = True
                    break
            if busy:
                continue
            f_j[d] = j  # come back to store the child's result
            d += 1
            f_o[d], f_r[d], f_at[d], f_j[d] = o2, r2, f_end[d - 1], f_end[d - 1]
            buf, f_end[d] = waiters(ir, st, o2, r2, buf, f_end[d - 1])
            continue
        n = f_end[d] - f_at[d]
        items = buf[3 * f_at[d]: 3 * f_end[d]].copy()
        n = sort_items(items, n, np.zeros(n, np.int32))
        w = np.empty(3 * n + 1, np.int32)
        w[0] = f_r[d]
        w[1:] = items[: 3 * n]
        k = lookup(st, K_WAIT, w, 0, 3 * n + 1)
        if k < 0:
            if room(st, 3 * n + 1, 1) == FULL:
                return FULL
            k = insert(st, K_WAIT, w, 0, 3 * n + 1, f_o[d])
        rep = st[VAL][k]
        if room(st, 2, 1) == FULL:
            return FULL
        key[0] = f_o[d]
        key[1] = f_r[d]
        insert(st, K_ORIG, key, 0, 2, rep)
        if d == 0:
            return rep
        d -= 1
        j = f_j[d]
        buf[3 * j + 1] = rep
        f_j[d] = j + 1


@njit(I(IRT, ST, A, I), cache=True)
def predicted(ir, st, states, n):
    """The self set (states predicted by fresh rule instances) of sorted predicting states, interned with
    its scanning states first; its id. A rule's states are added once, when the rule is first predicted
    (states of different rules are distinct), so only rules need marking."""
    repb, rn_ptr, rn_rule = part(ir, R_REPB), part(ir, R_RN_PTR), part(ir, R_RN_RULE)
    base, scans = part(ir, R_RULE_BASE), part(ir, R_SCANS)
    rseen = np.zeros(part(ir, R_SIZES)[1], np.uint8)
    stack = states[:n].copy()
    ns = n
    out = np.empty(16, np.int32)
    no = 0
    ebuf = np.empty(8, np.int32)
    rbuf = np.empty(8, np.int32)
    while ns:
        ns -= 1
        x = stack[ns]
        nr = 0
        if repb[x] >= 0:
            rbuf, nr = _push(rbuf, nr, repb[x])
        else:
            ebuf, ne = expand(ir, x, ebuf)
            for j in range(ne):
                y = ebuf[j]
                for e in range(rn_ptr[y], rn_ptr[y + 1]):
                    rbuf, nr = _push(rbuf, nr, rn_rule[e])
        for j in range(nr):
            r = rbuf[j]
            if rseen[r]:
                continue
            rseen[r] = 1
            ebuf, ne = expand(ir, base[r], ebuf)
            for i in range(ne):
                out, no = _push(out, no, ebuf[i])
                stack, ns = _push(stack, ns, ebuf[i])
    out[:no].sort()
    seq = np.empty(max(no, 1), np.int32)
    nscan = 0
    for i in range(no):  # scanning states first
        if scans[out[i]]:
            seq[nscan] = out[i]
            nscan += 1
    m = nscan
    for i in range(no):
        if not scans[out[i]]:
            seq[m] = out[i]
            m += 1
    k = lookup(st, K_SELF, seq, 0, no)
    if k < 0:
        if room(st, no, 1) == FULL:
            return FULL
        k = insert(st, K_SELF, seq, 0, no, nscan)
    return k


@njit(I(I), cache=True)
def popcount(x):
    v = np.int64(x) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


@njit(I(ST, I, I), cache=True)
def config_room(st, cid, nk):
    """FULL unless configuration `cid` of `nk` kernel items fits: its kernel and root flags (after the
    configuration id) in the interner, its fields, scan bits and byte table in their slots."""
    if room(st, 4 * nk + 1, 2) == FULL:
        return FULL
    meta = st[META]
    if len(st[CFG]) < NCF * (cid + 1):
        return need(meta, CFG, NCF * (cid + 1))
    if len(st[BITS]) < 16 * (cid + 1):
        return need(meta, BITS, 16 * (cid + 1))
    if len(st[TABLE]) < 256 * (cid + 1):
        return need(meta, TABLE, 256 * (cid + 1))
    return 0


@njit(I(IRT, ST, A, A, I, I), cache=True)
def intern_config(ir, st, kern, rootf, nk, can_end):
    """The id of the configuration with these kernel items (origins not yet represented), built if new."""
    rule, repb, rephi = part(ir, R_RULE), part(ir, R_REPB), part(ir, R_REPHI)
    for j in range(nk):
        o = kern[3 * j + 1]
        if o >= 0:
            rep = origin(ir, st, o, rule[kern[3 * j]])
            if rep == FULL:
                return FULL
            kern[3 * j + 1] = rep
    nk = sort_items(kern, nk, rootf)
    k = lookup(st, K_KERN, kern, 0, 3 * nk)
    if k >= 0:
        return st[VAL][k]
    pst = np.empty(max(nk, 1), np.int32)
    npst = 0
    for j in range(nk):
        s = kern[3 * j]
        if repb[s] < 0 or rephi[s] < 0 or kern[3 * j + 2] < rephi[s]:
            dup = False
            for i in range(npst):
                if pst[i] == s:
                    dup = True
                    break
            if not dup:
                pst[npst] = s
                npst += 1
    pst[:npst].sort()
    k = lookup(st, K_PRED, pst, 0, npst)
    if k >= 0:
        sid = st[VAL][k]
    else:
        sid = predicted(ir, st, pst, npst)
        if sid == FULL or room(st, npst, 1) == FULL:
            return FULL
        insert(st, K_PRED, pst, 0, npst, sid)
    meta = st[META]
    cid = meta[M_NCFG]
    if config_room(st, cid, nk) == FULL:
        return FULL
    cfg = st[CFG]
    cfg[NCF * cid + F_KERN] = insert(st, K_KERN, kern, 0, 3 * nk, cid)
    rf = np.empty(nk + 1, np.int32)
    rf[0] = cid
    rf[1:] = rootf[:nk]
    cfg[NCF * cid + F_ROOTS] = insert(st, K_ROOTS, rf, 0, nk + 1, 0)
    cfg[NCF * cid + F_CAN_END] = can_end
    cfg[NCF * cid + F_SELF] = sid
    cfg[NCF * cid + F_MAIN_T] = UNKNOWN
    cfg[NCF * cid + F_INC] = -1
    meta[M_NCFG] = cid + 1
    sbits = part(ir, R_SBITS)
    bits = st[BITS]
    for w in range(16):
        bits[16 * cid + w] = 0
    for j in range(nk):
        s = kern[3 * j]
        for w in range(8):
            bits[16 * cid + w] |= sbits[8 * s + w]
    data = st[DATA]
    sa, sm, _ = self_span(st, cid)
    for p in range(sa, sm):
        s = data[p]
        for w in range(8):
            bits[16 * cid + w] |= sbits[8 * s + w]
    total = 0
    for w in range(8):
        total += popcount(bits[16 * cid + w])
    cfg[NCF * cid + F_NALLOW] = total
    return cid


@njit(inline="always")
def _tset_slot(k1, k2, a, b):
    """Where key (a, b) is in an open-addressing item set, or the empty slot where it would go."""
    mask = len(k1) - 1
    h = a * np.int64(-7046029254386353131) + b * np.int64(-4658895280553007687)
    h = (h ^ (h >> 31)) & mask
    while k1[h] >= 0 and not (k1[h] == a and k2[h] == b):
        h = (h + 1) & mask
    return h


@njit(B(I64A, I64A, I, I, I), cache=True)
def _tset_add(k1, k2, s, o, c):
    """Adds item (s, o, c) to an open-addressing set kept under half full; whether it was new."""
    a = (np.int64(s) << 32) | np.int64(o + 2)
    h = _tset_slot(k1, k2, a, np.int64(c))
    if k1[h] >= 0:
        return False
    k1[h] = a
    k2[h] = c
    return True


@njit(types.Tuple((I64A, I64A))(I64A, I64A), cache=True)
def _tset_grow(k1, k2):
    n1 = np.full(2 * len(k1), -1, np.int64)
    n2 = np.empty(2 * len(k1), np.int64)
    for i in range(len(k1)):
        if k1[i] >= 0:
            h = _tset_slot(n1, n2, k1[i], k2[i])
            n1[h] = k1[i]
            n2[h] = k2[i]
    return n1, n2


@njit(B(I64A, I64A, I, I, I), cache=True)
def _tset_has(k1, k2, s, o, c):
    return k1[_tset_slot(k1, k2, (np.int64(s) << 32) | np.int64(o + 2), np.int64(c))] >= 0


@njit(I(IRT, ST, A, I), cache=True)
def closure(ir, st, items, n):
    """Completes and expands scanned items (nullable skips, completions through origins' waiters) into a
    kernel, interns it and returns its id."""
    final, keep, rule = part(ir, R_FINAL), part(ir, R_KEEP), part(ir, R_RULE)
    repb, replo, rephi = part(ir, R_REPB), part(ir, R_REPLO), part(ir, R_REPHI)
    stack = items[: 3 * n].copy()
    ns = n
    seen1 = np.full(64, -1, np.int64)
    seen2 = np.empty(64, np.int64)
    nseen = 0
    dir1 = np.full(64, -1, np.int64)
    dir2 = np.empty(64, np.int64)
    ndir = 0
    for j in range(n):
        if 2 * (ndir + 1) > len(dir1):
            dir1, dir2 = _tset_grow(dir1, dir2)
        if _tset_add(dir1, dir2, items[3 * j], items[3 * j + 1], items[3 * j + 2]):
            ndir += 1
    kern = np.empty(24, np.int32)
    nk = 0
    can_end = 0
    ebuf = np.empty(8, np.int32)
    while ns:
        ns -= 1
        s, o, c = stack[3 * ns], stack[3 * ns + 1], stack[3 * ns + 2]
        if 2 * (nseen + 1) > len(seen1):
            seen1, seen2 = _tset_grow(seen1, seen2)
        if not _tset_add(seen1, seen2, s, o, c):
            continue
        nseen += 1
        if repb[s] < 0:
            fin = final[s] != 0
            kp = keep[s] != 0
            ebuf, ne = expand(ir, s, ebuf)
            for j in range(1, ne):
                stack, ns = _push3(stack, ns, ebuf[j], o, c)
        else:
            fin = c >= replo[s]
            kp = rephi[s] < 0 or c < rephi[s]
        if kp:
            kern, nk = _push3(kern, nk, s, o, c)
        if fin:
            if o < 0:
                can_end = 1
            else:
                before = ns
                stack, ns = waiters(ir, st, o, rule[s], stack, ns)
                for j in range(before, ns):
                    if 2 * (ndir + 1) > len(dir1):
                        dir1, dir2 = _tset_grow(dir1, dir2)
                    if _tset_add(dir1, dir2, stack[3 * j], stack[3 * j + 1], stack[3 * j + 2]):
                        ndir += 1
    rootf = np.zeros(max(nk, 1), np.int32)
    for j in range(nk):
        if _tset_has(dir1, dir2, kern[3 * j], kern[3 * j + 1], kern[3 * j + 2]):
            rootf[j] = 1
    return intern_config(ir, st, kern, rootf, nk, can_end)


@njit(I(IRT, ST, A, I), cache=True)
def close(ir, st, items, n):
    """closure() memoized by the scanned item set (half of all closures repeat one)."""
    n = sort_items(items, n, np.zeros(n, np.int32))
    k = lookup(st, K_SCAN, items, 0, 3 * n)
    if k >= 0:
        return st[VAL][k]
    cid = closure(ir, st, items, n)
    if cid == FULL or room(st, 3 * n, 1) == FULL:
        return FULL
    insert(st, K_SCAN, items, 0, 3 * n, cid)
    return cid


@njit(I(IRT, ST, I, A, I, I), cache=True)
def _intern_count(ir, st, cid, kern, nk, j):
    """The configuration whose kernel is cid's with item j's count changed (`kern`, sorted as cid's): the
    same self set, root flags, end flag and scanned bytes as cid (see `_counted`); its id, or FULL."""
    k = lookup(st, K_KERN, kern, 0, 3 * nk)
    if k >= 0:
        return st[VAL][k]
    meta = st[META]
    new = meta[M_NCFG]
    if config_room(st, new, nk) == FULL:
        return FULL
    cfg, bits, ptr = st[CFG], st[BITS], st[PTR]
    cfg[NCF * new + F_KERN] = insert(st, K_KERN, kern, 0, 3 * nk, new)
    rk = cfg[NCF * cid + F_ROOTS]
    rf = st[DATA][ptr[rk] + 1: ptr[rk + 1]].copy()
    rf[0] = new
    cfg[NCF * new + F_ROOTS] = insert(st, K_ROOTS, rf, 0, nk + 1, 0)
    cfg[NCF * new + F_CAN_END] = cfg[NCF * cid + F_CAN_END]
    cfg[NCF * new + F_SELF] = cfg[NCF * cid + F_SELF]
    cfg[NCF * new + F_NALLOW] = cfg[NCF * cid + F_NALLOW]
    cfg[NCF * new + F_MAIN_T] = UNKNOWN
    cfg[NCF * new + F_INC] = j
    for w in range(8):
        bits[16 * new + w] = bits[16 * cid + w]
        bits[16 * new + 8 + w] = 0
    meta[M_NCFG] = new + 1
    return new


@njit(I(IRT, ST, I, I), cache=True)
def _counted(ir, st, cid, t):
    """The configuration after the one scanned item (t, cid, 0) when it ends the body of a counted repetition
    (a dead-end final state of body rule B, as one byte of `[ \\t\\n\\r]{0,20}` does) and the only item of cid
    waiting on B is a repetition item (R, O, k) that stays final and kept at its next count k2; else UNKNOWN.
    closure() then yields {(R, O, k2)} plus the closure of O's items waiting on R, whatever k2 is. So once a
    configuration is known to be made of exactly that (F_INC: the index of its R item), the next count's
    kernel is its own with item F_INC's count changed: same self set, root flags, end flag and scanned bytes,
    built without a closure (whitespace runs were half of all configurations built). A configuration built
    by closure() from such a step is marked so."""
    final, keep, rule = part(ir, R_FINAL), part(ir, R_KEEP), part(ir, R_RULE)
    repb, replo, rephi = part(ir, R_REPB), part(ir, R_REPLO), part(ir, R_REPHI)
    if not final[t] or keep[t] or repb[t] >= 0:
        return UNKNOWN
    bb = rule[t]
    buf, nw = waiters(ir, st, cid, bb, np.empty(6, np.int32), 0)
    if nw != 1:
        return UNKNOWN
    r, o, k2 = buf[0], buf[1], buf[2]
    if repb[r] != bb or o == cid or k2 < replo[r] or (rephi[r] >= 0 and k2 >= rephi[r]):
        return UNKNOWN
    cfg, kd = st[CFG], st[DATA]
    ka, kb = kernel_span(st, cid)
    nk = (kb - ka) // 3
    j = cfg[NCF * cid + F_INC]
    if j >= 0 and kd[ka + 3 * j] == r and kd[ka + 3 * j + 1] == o:
        kern = kd[ka:kb].copy()
        kern[3 * j + 2] = k2
        return _intern_count(ir, st, cid, kern, nk, j)
    items = np.empty(3, np.int32)
    items[0] = t
    items[1] = cid
    items[2] = 0
    nxt = close(ir, st, items, 1)
    if nxt < 0:
        return nxt
    ka, kb = kernel_span(st, nxt)
    found = -1
    for p in range(ka, kb, 3):
        if kd[p] == r:
            if found >= 0 or kd[p + 2] != k2:
                return nxt
            found = (p - ka) // 3
    cfg[NCF * nxt + F_INC] = found
    return nxt


@njit(I(IRT, ST, I, I), cache=True)
def step(ir, st, cid, b):
    """The configuration after byte b from cid (DEAD if none), memoized in TABLE."""
    table = st[TABLE]
    r = table[256 * cid + b]
    if r != UNKNOWN:
        return r
    bnext = part(ir, R_BNEXT)
    items = np.empty(24, np.int32)
    n = 0
    kd = st[DATA]
    ka, kb = kernel_span(st, cid)
    for p in range(ka, kb, 3):
        t = bnext[256 * kd[p] + b]
        if t >= 0:
            items, n = _push3(items, n, t, kd[p + 1], kd[p + 2])
    sa, sm, _ = self_span(st, cid)
    for p in range(sa, sm):
        t = bnext[256 * kd[p] + b]
        if t >= 0:
            items, n = _push3(items, n, t, cid, 0)
    r = UNKNOWN
    if n == 1 and items[1] == cid and items[2] == 0:
        r = _counted(ir, st, cid, items[0])
    if r == UNKNOWN:
        if n == 0:
            r = DEAD
        else:
            # items of rules cid predicted start at cid's representative (the kernel's origins already are), so
            # the scanned set is memoized across configurations with the same waiting items: the counts of a
            # whitespace run before one value close the byte that starts the value once, not once per count
            rule = part(ir, R_RULE)
            for j in range(n):
                if items[3 * j + 1] == cid:
                    rep = origin(ir, st, cid, rule[items[3 * j]])
                    if rep == FULL:
                        return FULL
                    items[3 * j + 1] = rep
            r = close(ir, st, items, n)
    if r != FULL:
        table[256 * cid + b] = r
    return r


@njit(I(IRT, ST, I), cache=True)
def main(ir, st, cid):
    """The target of cid's largest group of bytes leading to one configuration (DEAD if it scans nothing);
    the group's bytes go to MAIN_B, their number to MAIN_N."""
    cfg = st[CFG]
    if cfg[NCF * cid + F_MAIN_T] != UNKNOWN:
        return cfg[NCF * cid + F_MAIN_T]
    bits, table, bnext, scans = st[BITS], st[TABLE], part(ir, R_BNEXT), part(ir, R_SCANS)
    # bytes grouped by the states they scan to: one step per group (a string body has ~250 bytes, few groups)
    sts = np.empty(16, np.int32)
    m = 0
    kd = st[DATA]
    ka, kb = kernel_span(st, cid)
    for p in range(ka, kb, 3):
        if scans[kd[p]]:
            sts, m = _push(sts, m, kd[p])
    sa, sm, _ = self_span(st, cid)
    for p in range(sa, sm):
        sts, m = _push(sts, m, kd[p])
    reps = np.empty(256, np.int32)
    grp = np.full(256, -1, np.int32)
    ng = 0
    for b in range(256):
        if not (bits[16 * cid + (b >> 5)] >> (b & 31)) & 1:
            if table[256 * cid + b] == UNKNOWN:
                table[256 * cid + b] = DEAD
            continue
        g = 0
        while g < ng:
            rb = reps[g]
            same = True
            for j in range(m):
                if bnext[256 * sts[j] + b] != bnext[256 * sts[j] + rb]:
                    same = False
                    break
            if same:
                break
            g += 1
        if g == ng:
            reps[ng] = b
            ng += 1
        grp[b] = g
    res = np.empty(max(ng, 1), np.int32)
    for g in range(ng):
        r = table[256 * cid + reps[g]]
        if r == UNKNOWN:
            r = step(ir, st, cid, reps[g])
            if r == FULL:
                return FULL
        res[g] = r
    targets = np.empty(256, np.int32)
    nt = 0
    for b in range(256):
        if grp[b] >= 0:
            r = res[grp[b]]
            table[256 * cid + b] = r
            if r >= 0:
                targets[nt] = r
                nt += 1
    if nt == 0:
        cfg[NCF * cid + F_MAIN_T] = DEAD
        return DEAD
    targets[:nt].sort()
    best, best_n, i = -1, 0, 0
    while i < nt:
        j = i
        while j < nt and targets[j] == targets[i]:
            j += 1
        if j - i > best_n:
            best, best_n = targets[i], j - i
        i = j
    for w in range(8):
        word = np.int64(0)
        for i in range(32):
            if table[256 * cid + 32 * w + i] == best:
                word |= np.int64(1) << i
        bits[16 * cid + 8 + w] = np.int32(word - (np.int64(1) << 32) if word >= np.int64(1) << 31 else word)
    cfg[NCF * cid + F_MAIN_N] = best_n
    cfg[NCF * cid + F_MAIN_T] = best
    return best


@njit(I(IRT, ST, I, U8), cache=True)
def run(ir, st, cid, data):
    """The configuration after the bytes `data` from cid (DEAD if it dies), or FULL."""
    table = st[TABLE]
    for b in data:
        nxt = table[256 * cid + b]
        cid = step(ir, st, cid, b) if nxt == UNKNOWN else nxt
        if cid < 0:
            return cid
    return cid


@njit(I(IRT, ST, I, U8, A, A), cache=True)
def run_many(ir, st, start, data, offs, out):
    """out[i] = the configuration after the string data[offs[i]:offs[i + 1]] from `start` (DEAD if it
    dies); FULL or 0."""
    table = st[TABLE]
    for i in range(len(offs) - 1):
        cid = start
        for p in range(offs[i], offs[i + 1]):
            nxt = table[256 * cid + data[p]]
            cid = step(ir, st, cid, data[p]) if nxt == UNKNOWN else nxt
            if cid == FULL:
                return FULL
            if cid < 0:
                break
        out[i] = cid
    return 0


@njit(I(IRT, ST, I, I, I), cache=True)
def initial(ir, st, s, c, o):
    items = np.empty(3, np.int32)
    items[0] = s
    items[1] = o
    items[2] = c
    return close(ir, st, items, 1)
