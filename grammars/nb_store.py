"""The compiled parser's memory: int32 arrays in one tuple, interned integer sequences, growth by retry.

Everything the compiled Earley core (nb_earley.py) and trie walk (nb_walk.py) build lives in `Store.arrays`, a
tuple of 1-D int32 arrays (numba indexes a homogeneous tuple with a runtime index, and passes one in ~3 us),
so a classification walk is one compiled call however many configurations it creates. Compiled code cannot
grow an array its caller holds, so an insertion that finds its arrays full changes nothing, records which
slot needs room in META and returns FULL; the Python side grows that slot and calls again. Every memo entry
is written only once its dependencies are complete, so a call cut short leaves a consistent memo and the
retry finds what was built. Numba compiles each function once per machine (`cache=True`, next to the module).

An interner maps sequences of int32 to dense ids (open addressing over a power-of-two table); kernels,
scanned item sets, prediction sets, origin keys and waiting sets each have one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

FULL = -3  # an array is full: grow the slot named in META and call again
UNKNOWN = -2
DEAD = -1

# interners: slots 3 * i (data), 3 * i + 1 (ptr: id k spans data[ptr[k]:ptr[k + 1]]), 3 * i + 2 (hash table)
I_KERN, I_SCAN, I_PRED, I_SELF, I_ORIG, I_WAIT = range(6)
N_INTERN = 6
KERN_D, KERN_P, KERN_T, SCAN_D, SCAN_P, SCAN_T, PRED_D, PRED_P, PRED_T = range(9)
SELF_D, SELF_P, SELF_T, ORIG_D, ORIG_P, ORIG_T, WAIT_D, WAIT_P, WAIT_T = range(9, 18)
# per-id values
SCAN_VAL = 18  # scanned item set -> configuration
PRED_VAL = 19  # predicting state set -> predicted (self) set
ORIG_VAL = 20  # (origin, rule) -> representative origin
WAIT_VAL = 21  # (rule, waiting items) -> first origin with them
SELF_NSCAN = 22  # self set -> how many of its states (stored first) scan a byte
# per configuration
CAN_END = 23
SELF_ID = 24
MAIN_T = 25  # target of the largest byte group (UNKNOWN until computed, DEAD if none)
TABLE = 26  # 256 per configuration: byte transitions (UNKNOWN until computed)
ALLOW = 27  # 8 words per configuration: the bytes it can scan
MAIN_B = 28  # 8 words per configuration: the bytes of the largest group
ROOTF = 29  # parallel to the kernel interner's data: 1 at a root item's state
NALLOW = 30  # how many bytes a configuration can scan
MAIN_N = 31  # how many bytes its largest group has
META = 32  # interner counts and data lengths, then NEED_SLOT, NEED_SIZE
N_SLOTS = 33
M_NEED_SLOT = 2 * N_INTERN
M_NEED_SIZE = 2 * N_INTERN + 1
VAL_OF = (CAN_END, SCAN_VAL, PRED_VAL, SELF_NSCAN, ORIG_VAL, WAIT_VAL)  # per interner, a slot sized by id

A = types.Array(types.int32, 1, "C")  # every array of the store, the grammar's and the trie's tables
I = types.int64
ST = types.UniTuple(A, N_SLOTS)

# per slot: ints per id (0: sized by data, not by id) and the fill value of new room
_UNIT = {TABLE: 256, ALLOW: 8, MAIN_B: 8}
_FILL = {TABLE: UNKNOWN, MAIN_T: UNKNOWN}


@njit(I(A, I, I), cache=True)
def seq_hash(seq, a, n):
    h = np.int64(-3750763034362895579)
    for j in range(n):
        h = (h ^ np.int64(seq[a + j])) * np.int64(1099511628211)
    return h ^ (h >> 29)


@njit(I(A, I, I), cache=True)
def need(meta, slot, size):
    """Records that `slot` needs `size` ints and returns FULL."""
    meta[M_NEED_SLOT] = slot
    meta[M_NEED_SIZE] = size
    return FULL


@njit(I(A, A, A, A, I, I), cache=True)
def lookup(data, ptr, tab, seq, a, n):
    """The id of seq[a:a + n] in the interner (data, ptr, tab), or -1."""
    mask = len(tab) - 1
    h = seq_hash(seq, a, n) & mask
    while True:
        k = tab[h]
        if k < 0:
            return -1
        s = ptr[k]
        if ptr[k + 1] - s == n:
            same = True
            for j in range(n):
                if data[s + j] != seq[a + j]:
                    same = False
                    break
            if same:
                return k
        h = (h + 1) & mask


@njit(I(A, A, A, A, I, I, I), cache=True)
def room(data, ptr, tab, meta, i, n, val_len):
    """FULL unless interner i (data, ptr, tab) and its value array (of length val_len) can take one more
    id of n ints."""
    count, dlen = meta[2 * i], meta[2 * i + 1]
    if dlen + n > len(data):
        return need(meta, 3 * i, dlen + n)
    if count + 2 > len(ptr):
        return need(meta, 3 * i + 1, count + 2)
    if 2 * (count + 1) > len(tab):
        return need(meta, 3 * i + 2, 4 * (count + 1))
    if count + 1 > val_len:
        return need(meta, VAL_OF[i], count + 1)
    return 0


@njit(I(A, A, A, A, I, A, I, I), cache=True)
def insert(data, ptr, tab, meta, i, seq, a, n):
    """Appends seq[a:a + n] to interner i (the caller checked `room` and that it is absent); its id."""
    k = meta[2 * i]
    d = meta[2 * i + 1]
    for j in range(n):
        data[d + j] = seq[a + j]
    ptr[k + 1] = d + n
    mask = len(tab) - 1
    h = seq_hash(seq, a, n) & mask
    while tab[h] >= 0:
        h = (h + 1) & mask
    tab[h] = k
    meta[2 * i] = k + 1
    meta[2 * i + 1] = d + n
    return k


@njit(A(A, A, I, I), cache=True)
def rehash(data, ptr, count, size):
    """A hash table of `size` slots (a power of two) over the first `count` ids."""
    tab = np.full(size, -1, dtype=np.int32)
    mask = size - 1
    for k in range(count):
        s = ptr[k]
        h = seq_hash(data, s, ptr[k + 1] - s) & mask
        while tab[h] >= 0:
            h = (h + 1) & mask
        tab[h] = k
    return tab


def new_store() -> list[np.ndarray]:
    """Empty arrays for a few hundred configurations; `grow` enlarges them on demand."""
    st: list[np.ndarray] = []
    for _ in range(N_INTERN):
        st.append(np.zeros(1024, np.int32))
        st.append(np.zeros(257, np.int32))
        st.append(np.full(512, -1, np.int32))
    for slot in range(3 * N_INTERN, META):
        st.append(np.full(256 * _UNIT.get(slot, 1), _FILL.get(slot, 0), np.int32))
    st.append(np.zeros(2 * N_INTERN + 2, np.int32))
    return st


def grow(st: list[np.ndarray]) -> None:
    """Enlarges the slot a compiled call found full (at least doubling it)."""
    meta = st[META]
    slot, size = int(meta[M_NEED_SLOT]), int(meta[M_NEED_SIZE])
    old = st[slot]
    if slot < 3 * N_INTERN and slot % 3 == 2:
        i = slot // 3
        new_size = max(2 * len(old), 1 << max(size - 1, 1).bit_length())
        st[slot] = rehash(st[3 * i], st[3 * i + 1], int(meta[2 * i]), new_size)
        return
    unit = _UNIT.get(slot, 1)
    new_len = max(2 * len(old), -(-size // unit) * unit)
    new = np.full(new_len, _FILL.get(slot, 0), np.int32)
    new[: len(old)] = old
    st[slot] = new
