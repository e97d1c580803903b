"""Byte-level Earley parsing over rule automata, with hash-consed parser configurations.

An Earley item is (state, origin, count). Instead of an input position, `origin` is the id of the interned
configuration (Earley set) in which the item's rule instance started: a configuration is identified by its
kernel items alone (predictions are a static function of them), so two parses that differ only in absolute
positions share one configuration; an origin is further replaced by a representative with the same items
waiting on the item's rule, the only thing closure reads of it. That makes the parser a lazily built DFA
over configurations: every (configuration, byte) transition is computed once and memoized, and masks are
memoized per configuration.
Origin -1 marks the bottom item (the grammar's root, or the rule whose tokens are being classified); it
completing sets `can_end`.

The configurations themselves live in compiled code (nb_earley.py, nb_walk.py, over nb_store.py's arrays):
closing a configuration costs about a microsecond there, and a whole vocabulary walk is one call. `Space`
is the Python face of that memo, plus what Python keeps per configuration (masks, token transitions).
"""

from __future__ import annotations

import threading

import numpy as np

from . import nb_earley, nb_shape, nb_walk
from .nb_earley import R_BNEXT
from .automata import GrammarIR
from .nb_store import (BITS, CFG, DATA, DEAD, F_CAN_END, F_KERN, F_ROOTS, FULL, M_NCFG, META, NCF, PTR, TABLE, UNKNOWN,
                       grow, new_store)

ROOT = -1


class Config:
    """What Python memoizes per configuration: its token transitions and mask (mask.py)."""

    __slots__ = ("can_end", "tok", "mask", "need_apply")

    def __init__(self, can_end: bool):
        self.can_end = can_end
        self.tok: dict[int, int] = {}
        self.mask: np.ndarray | None = None
        self.need_apply = True


class Space:
    """The configurations of one grammar and their memoized byte transitions.

    Callers hold `lock` around every call that may build configurations (all but `config`, `kernel`,
    `roots` on a configuration already built).
    """

    def __init__(self, ir: GrammarIR):
        self.ir = ir
        self.irt = nb_earley.ir_arrays(ir)
        data, offs = self.irt
        ir.share_byte_table(data[offs[R_BNEXT]: offs[R_BNEXT + 1]].reshape(-1, 256))
        self.st = new_store()
        self.configs: list[Config | None] = []  # by id, None until `config` creates it
        self.contrib: dict = {}
        # mask.py: per shape (index in its shape record's value), words and whether they mask anything
        self.shape_masks: list[tuple[np.ndarray, bool]] = []
        self.lock = threading.RLock()
        self.walk_cap = 1024  # result ranges a walk may return (doubled when one needs more)

    def _call(self, fn, *args):
        """Calls a compiled function until it no longer finds the memo's arrays full."""
        while True:
            r = fn(self.irt, tuple(self.st), *args)
            if (r if isinstance(r, int) else r[0]) != FULL:
                return r
            grow(self.st)

    @property
    def n_configs(self) -> int:
        return int(self.st[META][M_NCFG])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.st)

    def initial(self, state: int, count: int = 0, origin: int = ROOT) -> int:
        """The configuration whose only kernel item is (state, origin, count), closed."""
        return int(self._call(nb_earley.initial, state, count, origin))

    def step(self, cid: int, byte: int) -> int:
        return self.run(cid, bytes((byte,)))

    def run(self, cid: int, data: bytes) -> int:
        """Configuration after `data` from `cid`, or DEAD. Transitions already memoized are read here (a mask's
        walk has usually built the path of the token accepted next; entering a compiled call costs more than a
        token's few lookups); the first unknown one hands the rest to compiled code."""
        table = memoryview(self.st[TABLE])
        for i, b in enumerate(data):
            nxt = table[256 * cid + b]
            if nxt == UNKNOWN:
                return int(self._call(nb_earley.run, cid, np.frombuffer(data, dtype=np.uint8, offset=i)))
            if nxt == DEAD:
                return DEAD
            cid = nxt
        return cid

    def run_many(self, start: int, strings: list[bytes]) -> np.ndarray:
        """The configuration after each string from `start` (DEAD where it dies)."""
        offs = np.zeros(len(strings) + 1, dtype=np.int32)
        np.cumsum([len(s) for s in strings], out=offs[1:])
        data = np.frombuffer(b"".join(strings), dtype=np.uint8)
        out = np.zeros(len(strings), dtype=np.int32)
        self._call(nb_earley.run_many, start, data, offs, out)
        return out

    def _walk(self, fn, *args):
        """Calls a compiled walk until neither the memo nor its result buffer (`walk_cap`) is found too small."""
        while True:
            r = self._call(fn, *args, self.walk_cap)
            if r[0] != nb_walk.SHORT:
                return r
            self.walk_cap *= 2

    def walk(self, vt: tuple, start: int, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """nb_walk.walk over the flat trie `vt`, without exits: the accepted strings' ranges (lo, hi)."""
        return self._walk(nb_walk.walk, vt, start, False, cum)[1:3]

    def classify(self, vocab, s: int, c: int, words: np.ndarray, follow: np.ndarray):
        """nb_walk.classify over `vocab` (a VocabIndex): (uncertain strings, lo, hi, ex_lo, ex_hi, ex_byte),
        tokens accepted set in `words`."""
        return self._walk(nb_walk.classify, vocab.flat, s, c, vocab.ids_start, vocab.ids, vocab.all_words, words,
                          follow)[1:]

    def config_words(self, vocab, cid: int, horizon: int, words: np.ndarray) -> tuple[int, int]:
        """nb_walk.config_words over `vocab` (a VocabIndex): (shape id, how), the walked tokens set in `words`."""
        r = self._walk(nb_walk.config_words, vocab.flat, cid, horizon, vocab.ids_start, vocab.ids, vocab.all_words,
                       words)
        return r[1], r[2]

    def context(self, o: int, r: int, horizon: int) -> int:
        """nb_shape.context: the id of what rule r, started at configuration o, completes into."""
        return int(self._call(nb_shape.context, o, r, horizon))

    def config(self, cid: int) -> Config:
        cfgs = self.configs
        if cid >= len(cfgs):
            cfgs.extend([None] * (self.n_configs - len(cfgs)))
        c = cfgs[cid]
        if c is None:
            c = cfgs[cid] = Config(self.can_end(cid))
        return c

    def can_end(self, cid: int) -> bool:
        return bool(self.st[CFG][NCF * cid + F_CAN_END])

    def _record(self, cid: int, field: int) -> np.ndarray:
        """The payload of one of a configuration's interned records (its kernel, its root flags)."""
        st = self.st
        k = int(st[CFG][NCF * cid + field])
        a, b = st[PTR][k: k + 2].tolist()
        return st[DATA][a + 1: b]

    def kernel(self, cid: int) -> list[tuple[int, int, int]]:
        """The kernel items (state, origin, count) of a configuration."""
        items = self._record(cid, F_KERN).tolist()
        return list(zip(items[0::3], items[1::3], items[2::3]))

    def roots(self, cid: int) -> list[tuple[int, int, int]]:
        """Kernel items not merely reached by skipping a nullable rule: they cover the rest."""
        flags = self._record(cid, F_ROOTS).tolist()
        return [it for it, f in zip(self.kernel(cid), flags[1:]) if f]

    def allowed(self, cid: int) -> list[int]:
        """The bytes that can come next from a configuration."""
        bits = np.unpackbits(self.st[BITS][16 * cid: 16 * cid + 8].view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).tolist()
