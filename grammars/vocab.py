"""The vocabulary as a byte trie laid out level by level, for vectorized walks over every token at once.

Token byte strings are sorted and deduplicated; a trie node at depth d is a distinct (d+1)-byte prefix and
owns the contiguous range [lo, hi) of sorted strings that start with it. Level arrays give each node's byte,
the string that ends exactly there (or -1), and the range of its children in the next level, so a walk from
a parser configuration advances all live prefixes of one depth with a few numpy gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Level:
    byte: np.ndarray  # uint8 [n]
    lo: np.ndarray  # int64 [n]: first sorted string under the node
    hi: np.ndarray  # int64 [n]: one past the last
    term: np.ndarray  # int64 [n]: sorted string equal to the node's prefix, or -1
    child_lo: np.ndarray  # int64 [n]: children's slice in the next level
    child_hi: np.ndarray


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

    def token_words(self, u_mask: np.ndarray) -> np.ndarray:
        """Bitmask words (int32, xgrammar bit order) of all tokens whose string index is set in u_mask."""
        bits = np.zeros(self.words * 32, dtype=bool)
        bits[self.token_ids(np.flatnonzero(u_mask))] = True
        return np.packbits(bits, bitorder="little").view(np.int32)

    def token_ids(self, us: np.ndarray) -> np.ndarray:
        """Token ids of the given string indices (a string may be spelled by several ids)."""
        starts = self.ids_start[us]
        counts = self.ids_start[us + 1] - starts
        if len(us) and counts.max() == 1:
            return self.ids[starts]
        offsets = np.cumsum(counts) - counts
        return self.ids[np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))]
