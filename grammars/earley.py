"""Byte-level Earley parsing over rule automata, with hash-consed parser configurations.

An Earley item is (state, origin, count). Instead of an input position, `origin` is the id of the interned
configuration (Earley set) in which the item's rule instance started: a configuration is identified by its
kernel items alone (predictions are a static function of them), so two parses that differ only in absolute
positions share one configuration; an origin is further replaced by a representative with the same items
waiting on the item's rule (`Space.origin`), the only thing closure reads of it. That makes the parser a
lazily built DFA over configurations: every (configuration, byte) transition is computed once and memoized,
and masks are memoized per configuration.
Origin -1 marks the bottom item (the grammar's root, or the rule whose tokens are being classified); it
completing sets `can_end`.
"""

from __future__ import annotations

import threading

import numpy as np

from .automata import GrammarIR

DEAD = -1
UNKNOWN = -2
ROOT = -1
MAX_ORIGIN_DEPTH = 64  # origin chains followed this deep to find a representative; deeper ones stay as they are


class Config:
    """One interned Earley set. `scan` lists (byte->state table, origin, count) of every item that can scan."""

    __slots__ = ("id", "kernel", "roots", "selfs", "scan", "can_end", "next", "waiters", "mask", "need_apply",
                 "tok", "row_filled", "allowed", "main", "chain", "shape")

    def __init__(self, cid: int, kernel: tuple, roots: tuple, selfs: frozenset, scan: list, can_end: bool):
        self.id = cid
        self.kernel = kernel
        self.roots = roots  # kernel items not merely reached by skipping a nullable rule: they cover the rest
        self.row_filled = False
        self.main: tuple[int, int] | None = None  # (bytes as a 256-bit int, target) of the largest byte group
        self.chain = None  # mask.py's memo of where `main` leads
        self.shape: int | None = None  # mask.py's id of what the configuration can do within one token
        self.allowed: frozenset | None = None
        self.selfs = selfs
        self.scan = scan
        self.can_end = can_end
        self.next: dict[int, int] = {}
        self.waiters: dict[int, list] | None = None
        self.mask = None
        self.need_apply = True
        self.tok: dict[int, int] = {}


class Space:
    """The configurations of one grammar and their memoized byte transitions.

    `table` mirrors `Config.next` as a dense int32 array (UNKNOWN where not computed yet) so the vocabulary
    walks in mask.py can step thousands of tokens per numpy call.
    """

    def __init__(self, ir: GrammarIR):
        self.ir = ir
        self.configs: list[Config] = []
        self.index: dict[frozenset, int] = {}
        self.closed: dict[frozenset, int] = {}
        self._partitions: dict[tuple, list] = {}  # keyed by id()s of bnext dicts, which live as long as ir
        self._mains: dict[tuple, tuple] = {}  # the same keys: the largest live byte group, for `main`
        self.table = np.full((64, 256), UNKNOWN, dtype=np.int32)
        self.can_end_arr = np.zeros(64, dtype=bool)
        self.contrib: dict = {}
        self.shapes: dict[frozenset, int] = {}  # mask.py's interned configuration shapes and contexts
        self.contexts: dict[tuple[int, int], object] = {}
        self.origins: dict[tuple[int, int], int] = {}  # (origin, rule) -> representative origin
        self.waiting: dict[tuple[int, frozenset], int] = {}
        self.shape_masks: dict[int, np.ndarray] = {}
        self.chain_rows: dict[int, np.ndarray] = {}  # mask.py's chains as arrays, for the configurations that need them
        self.lock = threading.RLock()  # held by callers while they extend the memo

    def initial(self, state: int, count: int = 0, origin: int = ROOT) -> int:
        """The configuration whose only kernel item is (state, origin, count), closed."""
        return self._close([(state, origin, count)])

    def step(self, cid: int, byte: int) -> int:
        cfg = self.configs[cid]
        r = cfg.next.get(byte)
        if r is not None:
            return r
        r = int(self.table[cid, byte])
        if r != UNKNOWN:
            cfg.next[byte] = r
            return r
        new = []
        for bn, o, c in cfg.scan:
            t = bn.get(byte)
            if t is not None:
                new.append((t, o, c))
        r = self._close(new) if new else DEAD
        cfg.next[byte] = r
        self.table[cid, byte] = r
        return r

    def _groups(self, cid: int) -> list[tuple[np.ndarray, list]]:
        """A configuration's bytes grouped by the items they scan to: [(bytes, items)], items empty for
        bytes that lead nowhere. The partition depends only on the scanning states, so it is memoized by
        them (a counted repetition repeats its states at every count, with other counts and origins)."""
        scan = self.configs[cid].scan
        key = tuple(id(bn) for bn, _, _ in scan)
        part = self._partitions.get(key)
        if part is None:
            part = self._partitions[key] = self._partition([bn for bn, _, _ in scan])
        return [(byts, [(t, o, c) for t, (_, o, c) in zip(targets, scan) if t >= 0]) for byts, targets in part]

    def _partition(self, bnexts: list[dict]) -> list[tuple[np.ndarray, tuple]]:
        """Bytes grouped by their tuple of per-state targets (-1: none), by sorting those tuples."""
        if not bnexts:
            return [(np.arange(256), ())]
        targets = np.stack([self.ir.byte_targets(bn) for bn in bnexts], axis=1)
        order = np.lexsort(targets.T)
        rows = targets[order]
        starts = np.flatnonzero(np.concatenate([[True], (rows[1:] != rows[:-1]).any(axis=1)]))
        bounds = np.append(starts, 256).tolist()
        return [(order[a:b], tuple(rows[a].tolist())) for a, b in zip(bounds, bounds[1:])]

    def fill_row(self, cid: int) -> None:
        """Computes all of a configuration's byte transitions into `table`, closing each distinct scanned
        item set once (a string-body configuration has ~250 bytes but only a few distinct outcomes)."""
        cfg = self.configs[cid]
        if cfg.row_filled:
            return
        row = self.table[cid].copy()
        for byts, items in self._groups(cid):
            known = row[byts]
            known = known[known != UNKNOWN]
            if len(known):  # one byte of the group was stepped before: they all share its outcome
                row[byts] = known[0]
            else:
                row[byts] = self._close(items) if items else DEAD
        self.table[cid] = row
        cfg.row_filled = True

    def main(self, cid: int) -> tuple[int, int]:
        """The largest group of bytes that lead from a configuration to one configuration:
        (bytes as a 256-bit int, target), or (0, DEAD). Only that group is closed; which group it is
        depends only on the scanning states, so it is memoized by them (a counted repetition repeats
        them at every count)."""
        cfg = self.configs[cid]
        if cfg.main is None:
            scan = cfg.scan
            key = tuple(id(bn) for bn, _, _ in scan)
            m = self._mains.get(key)
            if m is None:
                part = self._partitions.get(key)
                if part is None:
                    part = self._partitions[key] = self._partition([bn for bn, _, _ in scan])
                groups = [(byts, targets) for byts, targets in part if any(t >= 0 for t in targets)]
                if groups:
                    byts, targets = max(groups, key=lambda g: len(g[0]))
                    bits = np.zeros(256, dtype=bool)
                    bits[byts] = True
                    m = (int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little"), byts, targets)
                else:
                    m = (0, None, None)
                self._mains[key] = m
            bits, byts, targets = m
            if byts is None:
                cfg.main = (0, DEAD)
            else:
                known = self.table[cid, byts[0]]
                target = int(known) if known != UNKNOWN else self._close(
                    [(t, o, c) for t, (_, o, c) in zip(targets, scan) if t >= 0])
                self.table[cid, byts] = target
                cfg.main = (bits, target)
        return cfg.main

    def run(self, cid: int, data: bytes) -> int:
        """Configuration after `data` from `cid`, or DEAD."""
        configs = self.configs
        for byte in data:
            r = configs[cid].next.get(byte)
            cid = self.step(cid, byte) if r is None else r
            if cid < 0:
                return DEAD
        return cid

    def origin(self, o: int, r: int, depth: int = 0, busy: set | None = None) -> int:
        """The representative of origin o for items of rule r: the first configuration whose items waiting
        on r are the same (their own origins represented in turn). Closure reads nothing else of an origin,
        so items that differ only there (an object started after 1 or after 2 spaces of a counted
        whitespace run) are the same item, and configurations nested in them are built once. A cycle (left
        recursion) or a chain deeper than MAX_ORIGIN_DEPTH keeps o itself."""
        if o < 0:
            return o
        key = (o, r)
        rep = self.origins.get(key)
        if rep is not None:
            return rep
        busy = set() if busy is None else busy
        if depth > MAX_ORIGIN_DEPTH or key in busy:
            return o
        busy.add(key)
        rule_of = self.ir.rule_of
        waiting = frozenset((t, self.origin(o2, rule_of[t], depth + 1, busy), c)
                            for t, o2, c in self.waiters(o).get(r, ()))
        busy.discard(key)
        rep = self.origins[key] = self.waiting.setdefault((r, waiting), o)
        return rep

    def waiters(self, cid: int) -> dict[int, list]:
        cfg = self.configs[cid]
        return cfg.waiters if cfg.waiters is not None else self._waiters(cfg)

    def _waiters(self, cfg: Config) -> dict[int, list]:
        """Items of cfg that wait on each rule, already advanced over it."""
        ir = self.ir
        w: dict[int, list] = {}
        for s, o, c in cfg.kernel:
            rep = ir.rep_of[s]
            if rep is not None:
                body, lo, hi = rep
                if hi is None:
                    w.setdefault(body, []).append((s, o, min(c + 1, lo)))
                elif c < hi:
                    w.setdefault(body, []).append((s, o, c + 1))
            else:
                for r, t in ir.rnext[s].items():
                    w.setdefault(r, []).append((t, o, c))
        for s in cfg.selfs:
            rep = ir.rep_of[s]
            if rep is not None:
                w.setdefault(rep[0], []).append((s, cfg.id, min(1, rep[1]) if rep[2] is None else 1))
            else:
                for r, t in ir.rnext[s].items():
                    w.setdefault(r, []).append((t, cfg.id, 0))
        cfg.waiters = w
        return w

    def _close(self, items: list) -> int:
        """Completes and expands scanned items into a kernel, interns it, and returns its id.

        Memoized by the scanned item set: half of all closures repeat one (another byte of the same class,
        another configuration scanning the same items)."""
        scanned = frozenset(items)
        cid = self.closed.get(scanned)
        if cid is None:
            cid = self.closed[scanned] = self._closure(items)
        return cid

    def _closure(self, items: list) -> int:
        info = self.ir.item_info
        configs = self.configs
        if len(items) == 1:  # the common case of one item that neither ends nor skips a rule: itself
            it = items[0]
            others, fin, keep, _, rep = info(it[0])
            if rep is None and keep and not fin and not others:
                return self._intern({it}, {it}, False)
        seen: set = set()
        kernel: set = set()
        can_end = False
        direct = list(items)
        stack = list(items)
        while stack:
            it = stack.pop()
            if it in seen:
                continue
            seen.add(it)
            s, o, c = it
            others, fin, keep, rule, rep = info(s)
            if rep is None:
                for s2 in others:
                    stack.append((s2, o, c))
            else:
                fin = c >= rep[1]
                keep = rep[2] is None or c < rep[2]
            if keep:
                kernel.add(it)
            if fin:
                if o < 0:
                    can_end = True
                else:
                    oc = configs[o]
                    w = oc.waiters if oc.waiters is not None else self._waiters(oc)
                    nxt = w.get(rule)
                    if nxt:
                        stack.extend(nxt)
                        direct.extend(nxt)
        return self._intern(kernel, kernel.intersection(direct), can_end)

    def _intern(self, kernel: set, roots: set, can_end: bool) -> int:
        """The id of the configuration with these kernel items (origins not yet represented), built if new."""
        configs = self.configs
        rule_of = self.ir.rule_of
        origin = self.origin
        reps = {it: it if it[1] < 0 else (it[0], origin(it[1], rule_of[it[0]]), it[2]) for it in kernel}
        roots = {reps[it] for it in roots}
        kernel = set(reps.values())
        key = frozenset(kernel)
        cid = self.index.get(key)
        if cid is not None:
            return cid
        cid = len(configs)
        self.index[key] = cid
        ir = self.ir
        rep_of = ir.rep_of
        predicting = frozenset(s for s, _, c in kernel if rep_of[s] is None or rep_of[s][2] is None or c < rep_of[s][2])
        selfs = ir.predicted(predicting)
        bnext = ir.bnext
        scan = [(bnext[s], o, c) for s, o, c in kernel if bnext[s]]
        scan.extend((bnext[s], cid, 0) for s in ir.scanning(selfs))
        configs.append(Config(cid, tuple(kernel), tuple(roots), selfs, scan, can_end))
        if cid >= len(self.can_end_arr):
            grow = np.full((len(self.table), 256), UNKNOWN, dtype=np.int32)
            self.table = np.concatenate([self.table, grow])
            self.can_end_arr = np.concatenate([self.can_end_arr, np.zeros(len(grow), dtype=bool)])
        self.can_end_arr[cid] = can_end
        return cid

    def allowed(self, cid: int) -> frozenset:
        """The bytes that can come next from a configuration."""
        cfg = self.configs[cid]
        if cfg.allowed is None:
            scan = cfg.scan
            cfg.allowed = frozenset(scan[0][0]) if len(scan) == 1 else frozenset().union(*(bn for bn, _, _ in scan))
        return cfg.allowed
