"""The vocabulary as a byte trie, for walks that run every token string from a parser configuration at once.

Token byte strings are sorted and deduplicated; a trie node at depth d is a distinct (d+1)-byte prefix and
owns the contiguous range [lo, hi) of sorted strings that start with it. Level arrays give each node's byte,
the string that ends exactly there (or -1), and the range of its children in the next level; `flat` packs
all levels into one node numbering for the compiled walk (nb_walk.py). Each node also records the set of
bytes found below it and how deep it goes, so a walk in a state that loops on all of them (for at least
that many bytes) accepts the whole subtree without visiting it (a JSON string body accepts most of the
vocabulary that way).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .nb_mask import range_words
from .nb_store import packed
from .nb_walk import COLD, HOT, TERM


@dataclass
class Level:
    byte: np.ndarray  # uint8 [n]
    lo: np.ndarray  # int64 [n]: first sorted string under the node
    hi: np.ndarray  # int64 [n]: one past the last
    term: np.ndarray  # int64 [n]: sorted string equal to the node's prefix, or -1
    child_lo: np.ndarray  # int64 [n]: children's slice in the next level
    child_hi: np.ndarray
    below: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.uint64))  # [n, 4]: bytes under it
    reach: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [n]: longest string's bytes under it


class VocabIndex:
    """Sorted unique token strings, token id <-> string index maps, and the level-ordered trie."""

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int, excluded: set[int]):
        pairs = sorted(
            (b, i) for i, b in enumerate(decoded_vocab[:vocab_size]) if b and i not in excluded
        )
        strings: list[bytes] = []
        owner: list[int] = []
        tok_u = np.full(vocab_size, -1, dtype=np.int64)
        for b, i in pairs:
            if not strings or strings[-1] != b:
                strings.append(b)
            tok_u[i] = len(strings) - 1
            owner.append(len(strings) - 1)
        self.strings = strings
        self.n = n = len(strings)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.tok_u = tok_u
        order = np.argsort(np.asarray(owner, dtype=np.int64), kind="stable")
        ids = np.asarray([i for _, i in pairs], dtype=np.int64)[order]
        counts = np.bincount(np.asarray(owner, dtype=np.int64), minlength=n)
        self.ids_start = np.concatenate([[0], np.cumsum(counts)])
        self.ids = ids
        lens = np.fromiter((len(s) for s in strings), dtype=np.int64, count=n)
        self.max_len = int(lens.max()) if n else 0
        lcp = np.zeros(n, dtype=np.int64)
        for i in range(1, n):
            a, b = strings[i - 1], strings[i]
            k, m = 0, min(len(a), len(b))
            while k < m and a[k] == b[k]:
                k += 1
            lcp[i] = k
        mat = np.zeros((n, self.max_len), dtype=np.uint8)
        flat = np.frombuffer(b"".join(strings), dtype=np.uint8)
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        mat[rows, cols] = flat
        self.levels: list[Level] = []
        prev_lo = None
        for d in range(self.max_len):
            lo = np.nonzero((lens > d) & (lcp <= d))[0]
            breaks = np.append(np.nonzero(lcp <= d)[0], n)
            hi = breaks[np.searchsorted(breaks, lo, side="right")]
            term = np.where(lens[lo] == d + 1, lo, -1)
            lvl = Level(mat[lo, d], lo, hi, term, np.zeros(0, np.int64), np.zeros(0, np.int64))
            if prev_lo is not None:
                parent = np.searchsorted(prev_lo, lo, side="right") - 1
                prev = self.levels[-1]
                prev.child_lo = np.searchsorted(parent, np.arange(len(prev_lo)), side="left")
                prev.child_hi = np.searchsorted(parent, np.arange(len(prev_lo)), side="right")
            self.levels.append(lvl)
            prev_lo = lo
        self.first_node = np.full(256, -1, dtype=np.int64)  # level-0 node of each first byte
        if self.levels:
            self.first_node[self.levels[0].byte] = np.arange(len(self.levels[0].lo))
            last = self.levels[-1]
            last.child_lo = last.child_hi = np.zeros(len(last.lo), dtype=np.int64)
        self._fill_below(lens)

    def _fill_below(self, lens: np.ndarray) -> None:
        """Per node, the 256-bit set (4 x uint64) of bytes at any depth below it, deepest level first, and
        the length of its longest string past the node (a node's strings are a contiguous run of sorted
        strings; strings between two runs are shorter than the level, so they never raise a maximum)."""
        below_next = None
        for d in range(len(self.levels) - 1, -1, -1):
            lvl = self.levels[d]
            below = np.zeros((len(lvl.lo), 4), dtype=np.uint64)
            if below_next is not None and len(below_next):
                nxt = self.levels[d + 1]
                own = below_next.copy()
                own[np.arange(len(nxt.byte)), nxt.byte >> 6] |= np.left_shift(
                    np.uint64(1), (nxt.byte & 63).astype(np.uint64))
                has = lvl.child_hi > lvl.child_lo
                if has.any():
                    below[has] = np.bitwise_or.reduceat(own, lvl.child_lo[has], axis=0)
            lvl.below = below
            lvl.reach = np.maximum.reduceat(lens, lvl.lo) - (d + 1) if len(lvl.lo) else np.zeros(0, np.int64)
            below_next = below

    @functools.cached_property
    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """The trie for nb_walk, packed: per node a hot record of HOT int32 (byte | depth << 8 | TERM when a
        string ends at the node -- it is then the node's first string, lo --, lo, hi, the index just past its
        subtree) and a cold one of COLD int32 (reach, then 8 words of the bytes below it), nodes in depth-first
        order, which is sorted string order: a walk reads the hot records front to back, skipping subtrees;
        then the max length and the sibling lists (`_siblings`). Built on first use."""
        levels = self.levels
        cols = [np.concatenate([getattr(lvl, name) for lvl in levels]) if levels else np.zeros(0, np.int64)
                for name in ("byte", "lo", "hi", "term", "reach")]
        byte, lo, hi, term, reach = cols
        depth = np.concatenate([np.full(len(lvl.lo), d) for d, lvl in enumerate(levels)]) if levels else lo
        below = np.concatenate([lvl.below for lvl in levels]).view(np.int32) if levels else np.zeros((0, 8))
        order = np.lexsort((depth, lo))
        hot = np.empty((len(order), HOT), dtype=np.int32)
        hot[:, 0] = (byte | depth << 8 | np.where(term >= 0, TERM, 0))[order]
        hot[:, 1] = lo[order]
        hot[:, 2] = hi[order]
        hot[:, 3] = np.searchsorted(lo[order], hi[order], side="left")
        cold = np.empty((len(order), COLD), dtype=np.int32)
        cold[:, 0] = reach[order]
        cold[:, 1:] = below[order]
        kb, kn, sib = self._siblings(order, byte)
        return packed([hot.reshape(-1), cold.reshape(-1), np.asarray([self.max_len]), kb, kn, sib])

    @functools.cached_property
    def all_words(self) -> np.ndarray:
        """Bitmask words (uint32) of every token that spells a string: masks accepting most strings start from
        it (nb_mask.set_words). Built on first use."""
        words = np.zeros(self.words, dtype=np.uint32)
        everything = np.asarray([0, self.n], dtype=np.int32)
        range_words(everything[:1], everything[1:], self.ids_start, self.ids, words)
        return words

    def _siblings(self, order: np.ndarray, byte: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each node's siblings side by side, for walks that pass over the siblings a configuration cannot
        scan without reading their records (which lie a whole subtree apart): nodes grouped by parent in
        byte order as (their bytes, their indices in `order`), and per node its position in that list and
        the end of its group."""
        n = len(order)
        offs = np.cumsum([0] + [len(lvl.lo) for lvl in self.levels])
        parent = np.full(n, -1, dtype=np.int64)  # in level-major numbering
        for d in range(1, len(self.levels)):
            prev = self.levels[d - 1]
            parent[offs[d]:offs[d + 1]] = offs[d - 1] + np.repeat(np.arange(len(prev.lo)), prev.child_hi - prev.child_lo)
        inv = np.empty(n, dtype=np.int64)
        inv[order] = np.arange(n)
        par = parent[order]
        par = np.where(par >= 0, inv[np.maximum(par, 0)], -1)  # parent's index in `order`
        kn = np.lexsort((np.arange(n), par))
        sib = np.empty((n, 2), dtype=np.int64)
        sib[kn, 0] = np.arange(n)
        sib[kn, 1] = np.searchsorted(par[kn], par[kn], side="right")
        return byte[order][kn], kn, sib.reshape(-1)
