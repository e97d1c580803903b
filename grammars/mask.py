"""Token masks: the adaptive accepted/rejected/uncertain cache plus exact resolution of the uncertain rest.

For a kernel item at state s of rule R, the vocabulary is classified once, inside R and its sub-rules only:
  accepted  - some parse consumes the whole token without R ending first (true in every context);
  uncertain - R can end partway and the next byte can follow R somewhere in the grammar (FOLLOW1);
  rejected  - everything else.
Classification keys on R's structural hash, so isomorphic sub-grammars share it across grammars, and on a
clamped repetition count, so counted repetitions far from their bounds share one entry. A configuration's
mask is the OR over its kernel items of accepted | (uncertain tokens that the full parser accepts from that
item in its real context); that last check runs only the uncertain strings, through memoized configuration
transitions.

The first walk of a fresh grammar pays for every classification, so the walks are built to stay cheap:
results are ranges of sorted strings rather than vocabulary-wide arrays, and a trie subtree whose bytes
all stay on a configuration's main byte class (a string body's loop, a counted class `[a-z]{0,60}` count
by count) is accepted whole without being visited.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from .earley import ROOT, UNKNOWN, Space
from .vocab import VocabIndex

HASH_LIMIT_STATES = 400  # rules reaching more states are keyed per grammar instead of hashed
_GRAMMAR_IDS = itertools.count()


SMALL_FRONTIER = 32  # below this many trie nodes a level is stepped in Python, above with numpy
LOOP_MIN = 32  # byte classes smaller than this are not followed to accept whole subtrees
SKIP_SPAN = 32  # subtrees of fewer strings are walked rather than checked for wholesale acceptance
FEW_CANDIDATES = 300  # up to this many uncertain strings are run one by one, more through the trie
MAX_CONTEXT_DEPTH = 64  # origin chains followed this deep to share masks; deeper ones stay exact
_ALL_BYTES = frozenset(range(256))


class Walk(NamedTuple):
    """Accepted strings as disjoint ranges [lo, hi) sorted by lo, and (when asked for) the exits: the strings
    in [ex_lo, ex_hi) pass a point where the bottom item's rule has ended and `ex_byte` comes next."""

    lo: np.ndarray
    hi: np.ndarray
    ex_lo: np.ndarray | None
    ex_hi: np.ndarray | None
    ex_byte: np.ndarray | None

    def contains(self, us: np.ndarray) -> np.ndarray:
        """Which of the string indices `us` are accepted."""
        pos = np.searchsorted(self.lo, us, side="right") - 1
        return (pos >= 0) & (us < self.hi[np.maximum(pos, 0)])


def walk(space: Space, vocab: VocabIndex, start: int, exits: bool, cand: np.ndarray | None = None) -> Walk:
    """Runs every vocabulary string (or only those flagged in the boolean array `cand`) from `start`.

    The trie is walked level by level; wide levels (string bodies) go through numpy gathers, narrow ones
    (literals, keys) through Python, which only visits children whose byte the configuration allows. A
    subtree whose bytes all loop on the configuration reached is accepted without visiting it, so walks
    through string bodies touch only the tokens that leave them; exits inside it need no record, since
    exits only matter for strings that are not accepted.
    """
    acc_lo: list = []
    acc_hi: list = []
    singles: list[int] = []
    ex: list[tuple[int, int, int]] = []
    ex_arr: list = []
    levels = vocab.levels
    cum = None if cand is None else np.concatenate([[0], np.cumsum(cand, dtype=np.int64)])
    first = space.allowed(start)
    if len(first) <= SMALL_FRONTIER:
        nodes = vocab.first_node[sorted(first)]
        nodes = nodes[nodes >= 0]
    else:
        nodes = np.arange(len(levels[0].lo))
    if cum is not None:
        lvl = levels[0]
        nodes = nodes[cum[lvl.hi[nodes]] > cum[lvl.lo[nodes]]]
    pc = np.full(len(nodes), start, dtype=np.int64)
    depth = 0
    while len(nodes):
        lvl = levels[depth]
        last = depth + 1 >= len(levels)
        if len(nodes) <= SMALL_FRONTIER:  # stay in Python lists while the frontier stays narrow
            nl, pl = nodes.tolist(), pc.tolist()
            while nl and len(nl) <= SMALL_FRONTIER:
                nl, pl = _narrow_level(space, vocab, depth, nl, pl, exits, cum, singles, acc_lo, acc_hi, ex)
                depth += 1
            nodes, pc = np.asarray(nl, dtype=np.int64), np.asarray(pl, dtype=np.int64)
            continue
        byt = lvl.byte[nodes]
        if depth and exits:
            ended = space.can_end_arr[pc]
            if ended.any():
                e = nodes[ended]
                ex_arr.append((lvl.lo[e], lvl.hi[e], lvl.byte[e]))
        cfg = space.table[pc, byt]
        unk = cfg == UNKNOWN
        if unk.any():
            todo = pc[unk]
            if len(todo) <= 64:  # few missing transitions: compute just those
                for k, b in set(zip(todo.tolist(), byt[unk].tolist())):
                    space.step(k, b)
            else:  # many: fill whole rows, each distinct outcome closed once
                for k in np.unique(todo).tolist():
                    space.fill_row(k)
            cfg = space.table[pc, byt]
        alive = cfg >= 0
        nodes = nodes[alive]
        cfg = cfg[alive]
        if last or not len(nodes):
            term = lvl.term[nodes]
            singles.extend(term[term >= 0].tolist())
            break
        whole = np.zeros(len(nodes), dtype=bool)
        reach = lvl.reach[nodes]
        span = lvl.hi[nodes] - lvl.lo[nodes]
        for k in np.unique(cfg[span >= SKIP_SPAN]).tolist():
            if len(space.allowed(k)) < LOOP_MIN:
                continue
            sel = np.flatnonzero(cfg == k)
            if space.configs[k].chain is None and (
                    lvl.below[nodes[sel]] & ~_rows([space.main(k)[0]])[0]).any(axis=1).all():
                continue  # no subtree lies within the main class, so none within the chain
            ints, closed = chain(space, k, vocab.max_len)
            if not ints:
                continue
            arr = chain_rows(space, k)
            d = reach[sel]
            ok = (d >= 1) & ((d <= len(ints)) | closed)
            at = arr[np.clip(d, 1, len(ints)) - 1]
            whole[sel] = ok & ~(lvl.below[nodes[sel]] & ~at).any(axis=1)
        if whole.any():
            acc_lo.append(lvl.lo[nodes[whole]])
            acc_hi.append(lvl.hi[nodes[whole]])
            part = ~whole
            nodes, cfg = nodes[part], cfg[part]
        term = lvl.term[nodes]
        singles.extend(term[term >= 0].tolist())
        clo, chi = lvl.child_lo[nodes], lvl.child_hi[nodes]
        cnt = chi - clo
        total = int(cnt.sum())
        pc = np.repeat(cfg.astype(np.int64), cnt)
        offsets = np.cumsum(cnt) - cnt
        nodes = np.repeat(clo - offsets, cnt) + np.arange(total)
        depth += 1
        if cum is not None:
            nxt = levels[depth]
            keep = cum[nxt.hi[nodes]] > cum[nxt.lo[nodes]]
            nodes, pc = nodes[keep], pc[keep]
    lo = np.concatenate(acc_lo + [np.asarray(singles, dtype=np.int64)]) if acc_lo else np.asarray(singles, np.int64)
    hi = np.concatenate(acc_hi + [np.asarray(singles, dtype=np.int64) + 1]) if acc_hi else lo + 1
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    if not exits:
        return Walk(lo, hi, None, None, None)
    if ex:
        e = np.asarray(ex, dtype=np.int64)
        ex_arr.append((e[:, 0], e[:, 1], e[:, 2]))
    if not ex_arr:
        z = np.zeros(0, np.int64)
        return Walk(lo, hi, z, z, z.astype(np.uint8))
    return Walk(lo, hi, *(np.concatenate([x[i] for x in ex_arr]).astype(t)
                          for i, t in ((0, np.int64), (1, np.int64), (2, np.uint8))))


def _narrow_level(space: Space, vocab: VocabIndex, depth: int, nodes: list[int], pcs: list[int], exits: bool,
                  cum, singles: list, acc_lo: list, acc_hi: list, ex: list):
    """One trie level of a few nodes, stepped in Python; returns the next level's (nodes, configurations)
    as lists."""
    levels = vocab.levels
    configs = space.configs
    byte_s, lo_a, hi_a, term_a, clo_a, chi_a, reach_a = levels[depth].py
    last = depth + 1 >= len(levels)
    nxt_bytes = None if last else levels[depth + 1].py[0]
    below = levels[depth].below
    nxt_nodes: list[int] = []
    nxt_pc: list[int] = []
    for node, p in zip(nodes, pcs):
        b = byte_s[node]
        if depth and exits and configs[p].can_end:
            ex.append((lo_a[node], hi_a[node], b))
        r = configs[p].next.get(b)
        c = space.step(p, b) if r is None else r
        if c < 0:
            continue
        t = term_a[node]
        if t >= 0:
            singles.append(t)
        if last:
            continue
        clo, chi = clo_a[node], chi_a[node]
        if clo == chi:
            continue
        cc = configs[c]
        need = _ALL_BYTES if exits and cc.can_end else space.allowed(c)
        if hi_a[node] - lo_a[node] >= SKIP_SPAN and len(space.allowed(c)) >= LOOP_MIN:
            bits = int.from_bytes(below[node].tobytes(), "little")
            ints, closed = cc.chain if cc.chain is not None else (
                chain(space, c, vocab.max_len) if not bits & ~space.main(c)[0] else _NO_CHAIN)
            d = reach_a[node]
            if ints and (d <= len(ints) or closed) and not bits & ~ints[min(d, len(ints)) - 1]:
                lo, hi = lo_a[node] + (t >= 0), hi_a[node]
                if lo < hi:
                    acc_lo.append(np.asarray([lo], dtype=np.int64))
                    acc_hi.append(np.asarray([hi], dtype=np.int64))
                continue
        allowed = space.allowed(c)
        if exits and cc.can_end and len(allowed) * 4 < chi - clo:
            # children the configuration cannot scan only record their exit (walks with exits have no
            # candidate filter): stepping them leads nowhere
            nxt_lo, nxt_hi = levels[depth + 1].py[1], levels[depth + 1].py[2]
            for k in range(clo, chi):
                x = nxt_bytes[k]
                if x not in allowed:
                    ex.append((nxt_lo[k], nxt_hi[k], x))
            need = allowed
        if len(need) * 4 < chi - clo:
            picked = [clo + i for i in (nxt_bytes.find(x, clo, chi) - clo for x in need) if i >= 0]
        else:
            picked = range(clo, chi)
        for k in picked:
            if cum is None or cum[levels[depth + 1].hi[k]] > cum[levels[depth + 1].lo[k]]:
                nxt_nodes.append(k)
                nxt_pc.append(c)
    return nxt_nodes, nxt_pc


_NO_CHAIN = ([], False)


def chain(space: Space, cid: int, horizon: int) -> tuple[list[int], bool]:
    """Where a configuration's main byte class leads: (ints, closed), ints[j] being the bytes that keep
    every string of j + 1 bytes on the main path (the intersection of the first j + 1 main classes),
    closed when the path ends in a loop (ints[-1] then holds forever).

    A trie subtree whose bytes all lie in ints[depth - 1] is accepted whole: a loop (string body) and a
    counted repetition (`[a-z]{0,60}`: the count moves the path through distinct configurations) alike.
    Callers follow a chain only for a subtree within its first class, ints[0] (the main class): the rest
    cannot be accepted whole, and following a counted class `[a-z]{0,200}` builds a configuration per count
    to the vocabulary's longest token.
    """
    configs = space.configs
    path: list[tuple[int, int]] = []
    c = cid
    tail = _NO_CHAIN
    while True:
        cfg = configs[c]
        if cfg.chain is not None:
            tail = cfg.chain
            break
        if len(path) >= horizon:
            break
        if len(space.allowed(c)) < LOOP_MIN:
            cfg.chain = _NO_CHAIN
            break
        group, nxt = space.main(c)
        if nxt < 0 or group.bit_count() < LOOP_MIN:
            cfg.chain = _NO_CHAIN
            break
        if nxt == c:
            tail = cfg.chain = ([group], True)
            break
        path.append((c, group))
        c = nxt
    ints, closed = tail
    for c, group in reversed(path):
        ints = [group] + [group & x for x in ints[: horizon - 1]]
        configs[c].chain = (ints, closed)
    return configs[cid].chain if configs[cid].chain is not None else _NO_CHAIN


def chain_rows(space: Space, cid: int) -> np.ndarray:
    """A configuration's chain (already followed) as 4 x uint64 rows, built on first use: the numpy walk
    needs them, a narrow walk does not, and along a counted path each configuration has its own."""
    rows = space.chain_rows.get(cid)
    if rows is None:
        rows = space.chain_rows[cid] = _rows(space.configs[cid].chain[0])
    return rows


def _rows(ints: list[int]) -> np.ndarray:
    return np.frombuffer(b"".join(x.to_bytes(32, "little") for x in ints), dtype=np.uint64).reshape(-1, 4)


def run_sorted(space: Space, start: int, strings: list[bytes]) -> list[bool]:
    """Whether each string (sorted) runs from `start` without dying; a shared prefix is stepped once."""
    configs = space.configs
    out = []
    prev = b""
    stack = [start]  # stack[k]: configuration after prev[:k], as far as prev stayed alive
    for s in strings:
        k, m = 0, min(len(prev), len(s), len(stack) - 1)
        while k < m and prev[k] == s[k]:
            k += 1
        del stack[k + 1:]
        cid = stack[k]
        for b in s[k:]:
            r = configs[cid].next.get(b)
            cid = space.step(cid, b) if r is None else r
            if cid < 0:
                break
            stack.append(cid)
        out.append(len(stack) == len(s) + 1)
        prev = s
    return out


class Masker:
    """Computes and memoizes the token mask of each configuration of one grammar.

    `cache` holds classifications shared by every grammar compiled for the same tokenizer.
    """

    def __init__(self, space: Space, vocab: VocabIndex, cache: dict, stop_words: np.ndarray):
        self.space = space
        self.ir = space.ir
        self.vocab = vocab
        self.cache = cache
        self.stop_words = stop_words
        self.horizon = vocab.max_len + 1
        self.rule_keys: dict[int, object] = {}
        full = np.zeros(vocab.words * 32, dtype=bool)
        full[: vocab.vocab_size] = True
        self.full = np.packbits(full, bitorder="little").view(np.int32)
        self.empty = np.zeros(vocab.words, dtype=np.int32)

    def _ckey(self, s: int, c: int):
        rep = self.ir.rep_of[s]
        if rep is None:
            return 0
        h = self.horizon
        return (min(max(rep[1] - c, 0), h), None if rep[2] is None else min(rep[2] - c, h))

    def classification(self, s: int, c: int):
        """(accepted token words, sorted string indices of uncertain tokens) for an item at s, count c.

        The walk is cached without lookahead (exits recorded with the byte that follows them), so rules
        that differ only in what may follow them in their grammar share it; FOLLOW1 then picks the exits
        that stay uncertain, per grammar.
        """
        ir = self.ir
        follow = ir.follow_bytes(ir.rule_of[s])
        ckey = self._ckey(s, c)
        if ckey and (ckey[1] is None or ckey[1] >= self.horizon):  # the upper bound is out of one token's reach
            if ckey[0] == 0:
                s, c, ckey = ir.free_rep.get(s, s), 0, "free"
            elif s in ir.open_rep:
                s, c, ckey = ir.open_rep[s], ir.rep_of[s][1] - ckey[0], (ckey[0], None)
        r = ir.rule_of[s]
        if r not in self.rule_keys:
            big = ir.reach_exceeds(r, HASH_LIMIT_STATES)
            self.rule_keys[r] = (next(_GRAMMAR_IDS), r) if big else ir.rule_hash(r)
        base_key = (self.rule_keys[r], s - ir.rule_base[r], ckey)
        key = (base_key, follow)
        hit = self.cache.get(key)
        if hit is None:
            base = self.cache.get(base_key)
            if base is None:
                w = walk(self.space, self.vocab, self.space.initial(s, c, ROOT), True)
                base = (self.vocab.range_words(w.lo, w.hi), *w)  # a flat tuple of arrays (sized by the compiler)
                self.cache[base_key] = base
            words, w = base[0], Walk(*base[1:])
            sel = np.frombuffer(follow, dtype=np.uint8).astype(bool)[w.ex_byte]
            unc = np.zeros(0, dtype=np.int64)
            if sel.any():
                lo, hi = w.ex_lo[sel], w.ex_hi[sel]
                lens = hi - lo
                total = int(lens.sum())
                idx = np.repeat(lo - (np.cumsum(lens) - lens), lens) + np.arange(total)
                if total > 4096:
                    dense = np.zeros(self.vocab.n, dtype=bool)
                    dense[idx] = True
                    idx = np.flatnonzero(dense)
                else:
                    idx = np.unique(idx)
                unc = idx[~w.contains(idx)]
            hit = (words, unc)
            self.cache[key] = hit
        return hit

    def shape(self, cid: int) -> int:
        """An id for what a configuration can do within one token: its kernel items with counts clamped as
        in `_ckey` and origins replaced by their `context`. Configurations that differ only in counts out of
        one token's reach of their bounds (the 7th vs the 8th element of `minItems: 200`) or in what their
        origins hold besides the waiting items (the whitespace count before an object) share it, and with
        it masks and contributions, which otherwise would be recomputed for each variant."""
        cfg = self.space.configs[cid]
        if cfg.shape is None:
            rule_of = self.ir.rule_of
            key = frozenset((s, self._ckey(s, c), self.context(o, rule_of[s])) for s, o, c in cfg.kernel)
            cfg.shape = self._intern(key)
        return cfg.shape

    def context(self, o: int, r: int, depth: int = 0, busy: set | None = None):
        """What rule r, started at configuration o, completes into: the interned set of o's items waiting
        on r (clamped counts, their own contexts) -- all that closure ever reads of an origin. A cycle
        (left recursion) or a chain deeper than MAX_CONTEXT_DEPTH keeps the origin itself: exact, unshared."""
        if o < 0:
            return ROOT
        key = (o, r)
        space = self.space
        ctx = space.contexts.get(key)
        if ctx is not None:
            return ctx
        busy = set() if busy is None else busy
        if depth > MAX_CONTEXT_DEPTH or key in busy:
            return ("at", o)
        busy.add(key)
        rule_of = self.ir.rule_of
        items = frozenset((t, self._ckey(t, c), self.context(o2, rule_of[t], depth + 1, busy))
                          for t, o2, c in space.waiters(o).get(r, ()))
        busy.discard(key)
        ctx = space.contexts[key] = self._intern(items)
        return ctx

    def _intern(self, key: frozenset) -> int:
        shapes = self.space.shapes
        return shapes.setdefault(key, len(shapes))

    def contribution(self, s: int, o: int, c: int):
        key = (s, self._ckey(s, c), self.context(o, self.ir.rule_of[s]))
        w = self.space.contrib.get(key)
        if w is None:
            acc_words, unc = self.classification(s, c)
            w = acc_words
            if len(unc):
                init = self.space.initial(s, c, o)
                if len(unc) <= FEW_CANDIDATES:
                    strings = self.vocab.strings
                    ok = unc[run_sorted(self.space, init, [strings[u] for u in unc.tolist()])]
                else:
                    cand = np.zeros(self.vocab.n, dtype=bool)
                    cand[unc] = True
                    ok = unc[walk(self.space, self.vocab, init, False, cand).contains(unc)]
                if len(ok):
                    w = acc_words | self.vocab.range_words(ok, ok + 1)
            self.space.contrib[key] = w
        return w

    def config_mask(self, cid: int) -> np.ndarray:
        cfg = self.space.configs[cid]
        if cfg.mask is not None:
            return cfg.mask
        sid = self.shape(cid)
        words = self.space.shape_masks.get(sid)
        if words is None:
            words = self.space.shape_masks[sid] = self._roots_mask(cfg)
        cfg.mask = words
        cfg.need_apply = not np.array_equal(words, self.full)
        return words

    def _roots_mask(self, cfg) -> np.ndarray:
        """The OR of a configuration's kernel items' contributions (its roots cover the other items)."""
        ir = self.ir
        words = None
        owned = False
        for s, o, c in cfg.roots:
            rep = ir.rep_of[s]
            if rep is None:
                if not ir.bnext[s] and not ir.rnext[s]:
                    continue
            elif rep[2] is not None and c >= rep[2]:
                continue
            w = self.contribution(s, o, c)
            if words is None:
                words = w
            else:
                if not owned:
                    words = words.copy()
                    owned = True
                np.bitwise_or(words, w, out=words)
        if words is None:
            words = self.empty
        if cfg.can_end:
            words = words | self.stop_words
        return words
