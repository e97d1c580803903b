"""The compiled parser's memory: a few int32 arrays, one interner of tagged integer records, growth by retry.

Everything the compiled Earley core (nb_earley.py) and trie walk (nb_walk.py) build lives in `Store` arrays
passed as one tuple, so a classification walk is one compiled call however many configurations it creates.
The tuple is short on purpose: numba passes a tuple's arrays as separate arguments to every call, which
costs call time and, above all, compile time. Static tables (the grammar's, the trie's) are one array plus
offsets (`packed`). Compiled code cannot grow an array its caller holds, so an insertion that finds its
arrays full changes nothing, records which slot needs room in META and returns FULL; the Python side grows
that slot and calls again. Every memo entry is written only once its dependencies are complete, so a call
cut short leaves a consistent memo and the retry finds what was built. Numba compiles each function once
per machine (`cache=True`, next to the module); `_drop_stale_caches` keeps the caches of the nb_*.py modules
consistent with each other.

The interner maps tagged int32 sequences (kind, payload...) to dense ids with one value each (open
addressing over a power-of-two table): kernels, scanned item sets, prediction sets, self sets, origin keys,
waiting sets, root flags and nb_shape's contexts and shapes all share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numba import njit, types


def _drop_stale_caches() -> None:
    """numba keys a function's cache on its own file, but compiled code embeds the compiled functions it calls
    from other files: after an edit of nb_earley.py, nb_walk.py's cache would still run the old code (and read
    the memo with an old layout). So the caches of all nb_*.py modules are dropped together whenever any of their
    sources changes, recorded by a hash of them beside the caches. Runs before this module compiles anything."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("nb_*.py")))).hexdigest()
    cache = here / "__pycache__"
    stamp = cache / "nb_sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:  # an installed, read-only package has caches elsewhere (numba's user-wide ones) and never changes
        for f in [*cache.glob("nb_*.nbi"), *cache.glob("nb_*.nbc")]:
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass


_drop_stale_caches()

FULL = -3  # an array is full: grow the slot named in META and call again
UNKNOWN = -2
DEAD = -1

# record kinds (nb_shape's: contexts by (origin, rule), context sets, shapes)
K_KERN, K_SCAN, K_PRED, K_SELF, K_ORIG, K_WAIT, K_ROOTS, K_CTX, K_CSET, K_SHAPE = range(1, 11)
# store slots
DATA, PTR, TAB, VAL, CFG, BITS, TABLE, META = range(8)
N_SLOTS = 8
# CFG fields, NCF per configuration (F_INC: nb_earley's counted-step index, -1 none)
F_CAN_END, F_SELF, F_MAIN_T, F_NALLOW, F_MAIN_N, F_KERN, F_ROOTS, F_INC = range(8)
NCF = 8
# BITS: 16 words per configuration, the bytes it can scan (0..7) and its main group's (8..15)
# META fields
M_COUNT, M_DLEN, M_NCFG, M_NEED_SLOT, M_NEED_SIZE = range(5)

A = types.Array(types.int32, 1, "C")
I = types.int64
ST = types.UniTuple(A, N_SLOTS)
PK = types.UniTuple(A, 2)  # a packed static table: (data, offsets)

_UNIT = {CFG: NCF, BITS: 16, TABLE: 256}
_FILL = {TAB: -1, TABLE: UNKNOWN}


def packed(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Static int32 arrays as (all concatenated, offsets): part k is data[offs[k]:offs[k + 1]]."""
    offs = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum([len(p) for p in parts], out=offs[1:])
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts]), offs


@njit(inline="always")
def part(pk, k):
    return pk[0][pk[1][k]: pk[1][k + 1]]


@njit(I(I, A, I, I), cache=True)
def seq_hash(kind, seq, a, n):
    h = (np.int64(-3750763034362895579) ^ kind) * np.int64(1099511628211)
    for j in range(n):
        h = (h ^ np.int64(seq[a + j])) * np.int64(1099511628211)
    return h ^ (h >> 29)


@njit(I(A, I, I), cache=True)
def need(meta, slot, size):
    """Records that `slot` needs `size` ints and returns FULL."""
    meta[M_NEED_SLOT] = slot
    meta[M_NEED_SIZE] = size
    return FULL


@njit(I(ST, I, A, I, I), cache=True)
def lookup(st, kind, seq, a, n):
    """The id of record (kind, seq[a:a + n]), or -1."""
    data, ptr, tab = st[DATA], st[PTR], st[TAB]
    mask = len(tab) - 1
    h = seq_hash(kind, seq, a, n) & mask
    while True:
        k = tab[h]
        if k < 0:
            return -1
        s = ptr[k]
        if ptr[k + 1] - s == n + 1 and data[s] == kind:
            same = True
            for j in range(n):
                if data[s + 1 + j] != seq[a + j]:
                    same = False
                    break
            if same:
                return k
        h = (h + 1) & mask


@njit(I(ST, I, I), cache=True)
def room(st, n, r):
    """FULL unless the interner can take r more records of n payload ints in all."""
    meta = st[META]
    count, dlen = meta[M_COUNT], meta[M_DLEN]
    if dlen + n + r > len(st[DATA]):
        return need(meta, DATA, dlen + n + r)
    if count + r + 1 > len(st[PTR]):
        return need(meta, PTR, count + r + 1)
    if 2 * (count + r) > len(st[TAB]):
        return need(meta, TAB, 4 * (count + r))
    if count + r > len(st[VAL]):
        return need(meta, VAL, count + r)
    return 0


@njit(I(ST, I, A, I, I, I), cache=True)
def insert(st, kind, seq, a, n, value):
    """Appends record (kind, seq[a:a + n]) with its value (the caller checked `room` and that it is
    absent); its id."""
    data, ptr, tab, meta = st[DATA], st[PTR], st[TAB], st[META]
    k = meta[M_COUNT]
    d = meta[M_DLEN]
    data[d] = kind
    for j in range(n):
        data[d + 1 + j] = seq[a + j]
    ptr[k + 1] = d + n + 1
    st[VAL][k] = value
    mask = len(tab) - 1
    h = seq_hash(kind, seq, a, n) & mask
    while tab[h] >= 0:
        h = (h + 1) & mask
    tab[h] = k
    meta[M_COUNT] = k + 1
    meta[M_DLEN] = d + n + 1
    return k


@njit(A(A, A, I, I), cache=True)
def rehash(data, ptr, count, size):
    """A hash table of `size` slots (a power of two) over the first `count` records."""
    tab = np.full(size, -1, dtype=np.int32)
    mask = size - 1
    for k in range(count):
        s = ptr[k]
        h = seq_hash(data[s], data, s + 1, ptr[k + 1] - s - 1) & mask
        while tab[h] >= 0:
            h = (h + 1) & mask
        tab[h] = k
    return tab


def new_store() -> list[np.ndarray]:
    """Empty arrays for about a thousand configurations (~1 MB, what a small grammar's first requests reach;
    each growth on the way there cost a retry of the call that found the memo full); `grow` enlarges them."""
    st = [np.zeros(16384, np.int32), np.zeros(4097, np.int32), np.full(8192, -1, np.int32),
          np.zeros(4096, np.int32)]
    st += [np.full(1024 * _UNIT[s], _FILL.get(s, 0), np.int32) for s in (CFG, BITS, TABLE)]
    st.append(np.zeros(5, np.int32))
    return st


def grow(st: list[np.ndarray]) -> None:
    """Enlarges the slot a compiled call found full (at least doubling it), and with it all the others, which
    fill at about the same pace (a configuration brings its CFG, BITS and TABLE rows and a few interned
    records), since each slot found full costs the call a retry from the start."""
    meta = st[META]
    slot, size = int(meta[M_NEED_SLOT]), int(meta[M_NEED_SIZE])
    ncfg = max(2 * (len(st[CFG]) // NCF), -(-size // _UNIT[slot]) if slot in (CFG, BITS, TABLE) else 0)
    for s in (CFG, BITS, TABLE):
        _resize(st, s, ncfg * _UNIT[s])
    nrec = max(2 * len(st[VAL]), {PTR: size - 1, VAL: size, TAB: -(-size // 4)}.get(slot, 0))
    _resize(st, PTR, nrec + 1)
    _resize(st, VAL, nrec)
    st[TAB] = rehash(st[DATA], st[PTR], int(meta[M_COUNT]), 1 << (4 * nrec - 1).bit_length())
    _resize(st, DATA, max(2 * len(st[DATA]), size if slot == DATA else 0))


def _resize(st: list[np.ndarray], slot: int, n: int) -> None:
    old = st[slot]
    if n > len(old):
        new = np.full(n, _FILL.get(slot, 0), np.int32)
        new[: len(old)] = old
        st[slot] = new
