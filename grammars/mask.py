"""Token masks: the adaptive accepted/rejected/uncertain cache plus exact resolution of the uncertain rest.

For a kernel item at state s of rule R, the vocabulary is classified once, inside R and its sub-rules only:
  accepted  - some parse consumes the whole token without R ending first (true in every context);
  uncertain - R can end partway and the next byte can follow R somewhere in the grammar (FOLLOW1);
  rejected  - everything else.
Classification keys on R's structural hash, so isomorphic sub-grammars share it across grammars, and on a
clamped repetition count, so counted repetitions far from their bounds share one entry. A configuration's
mask is the OR over its kernel items of accepted | (uncertain tokens that the full parser accepts from that
item in its real context); that last check walks only the trie branches holding uncertain tokens, through
memoized configuration transitions.
"""

from __future__ import annotations

import itertools

import numpy as np

from .earley import ROOT, UNKNOWN, Space
from .vocab import VocabIndex

HASH_LIMIT_STATES = 4000  # rules reaching more states are keyed per grammar instead of hashed
_GRAMMAR_IDS = itertools.count()


SMALL_FRONTIER = 12  # below this many trie nodes a level is stepped in Python, above with numpy


def walk(space: Space, vocab: VocabIndex, start: int, exits: bool, cand: np.ndarray | None = None):
    """Runs every vocabulary string (or only those flagged in `cand`) from configuration `start`.

    Returns a boolean array over sorted strings (accepted: all bytes consumed) and, when `exits`, the
    exits as arrays (lo, hi, byte): the strings in [lo, hi) pass a point where the bottom item's rule has
    ended and `byte` comes next.
    The trie is walked level by level; wide levels (string bodies) go through numpy gathers, narrow ones
    (literals, keys) through Python, which only visits children whose byte the configuration allows.
    """
    n = vocab.n
    acc = np.zeros(n + 1, dtype=bool)
    ex_lo: list = []
    ex_hi: list = []
    ex_b: list = []
    levels = vocab.levels
    configs = space.configs
    cum = None if cand is None else np.concatenate([[0], np.cumsum(cand)])
    all_bytes = frozenset(range(256))
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
        if len(nodes) <= SMALL_FRONTIER:
            nxt_nodes: list[int] = []
            nxt_pc: list[int] = []
            nxt = None if last else levels[depth + 1]
            for node, p in zip(nodes.tolist(), pc.tolist()):
                b = int(lvl.byte[node])
                if depth and exits and configs[p].can_end:
                    ex_lo.append(lvl.lo[node : node + 1])
                    ex_hi.append(lvl.hi[node : node + 1])
                    ex_b.append(lvl.byte[node : node + 1])
                r = configs[p].next.get(b)
                c = space.step(p, b) if r is None else r
                if c < 0:
                    continue
                t = lvl.term[node]
                if t >= 0:
                    acc[t] = True
                if last:
                    continue
                clo, chi = int(lvl.child_lo[node]), int(lvl.child_hi[node])
                if clo == chi:
                    continue
                need = all_bytes if exits and configs[c].can_end else space.allowed(c)
                if len(need) * 4 < chi - clo:
                    kids = nxt.byte[clo:chi].tobytes()
                    picked = [clo + i for i in (kids.find(bytes((x,))) for x in need) if i >= 0]
                else:
                    picked = range(clo, chi)
                for k in picked:
                    if cum is None or cum[nxt.hi[k]] > cum[nxt.lo[k]]:
                        nxt_nodes.append(k)
                        nxt_pc.append(c)
            nodes = np.asarray(nxt_nodes, dtype=np.int64)
            pc = np.asarray(nxt_pc, dtype=np.int64)
            depth += 1
            continue
        byt = lvl.byte[nodes]
        if depth and exits:
            ended = space.can_end_arr[pc]
            if ended.any():
                ex = nodes[ended]
                ex_lo.append(lvl.lo[ex])
                ex_hi.append(lvl.hi[ex])
                ex_b.append(lvl.byte[ex])
        cfg = space.table[pc, byt]
        unk = cfg == UNKNOWN
        if unk.any():
            todo = pc[unk]
            if len(todo) <= 64:  # few missing transitions: compute just those
                for k, b in set(zip(todo.tolist(), byt[unk].tolist())):
                    space.step(k, b)
            else:  # many: fill whole rows, each distinct outcome closed once
                if (todo == todo[0]).all():
                    todo = todo[:1]
                else:
                    todo = np.sort(todo)
                    todo = todo[np.concatenate([[True], todo[1:] != todo[:-1]])]
                for k in todo.tolist():
                    space.fill_row(k)
            cfg = space.table[pc, byt]
        alive = cfg >= 0
        nodes = nodes[alive]
        cfg = cfg[alive]
        term = lvl.term[nodes]
        acc[term[term >= 0]] = True
        if last or not len(nodes):
            break
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
    if not exits:
        return acc[:n], None
    return acc[:n], tuple(
        np.concatenate(xs).astype(t) if xs else np.zeros(0, t)
        for xs, t in ((ex_lo, np.int64), (ex_hi, np.int64), (ex_b, np.uint8))
    )


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
        if ckey and ckey[0] == 0 and (ckey[1] is None or ckey[1] >= self.horizon):
            s, c, ckey = ir.free_rep.get(s, s), 0, "free"  # no bound is reachable within one token
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
                acc, (lo, hi, byt) = walk(self.space, self.vocab, self.space.initial(s, c, ROOT), True)
                base = (self.vocab.token_words(acc), np.packbits(acc), lo, hi, byt)
                self.cache[base_key] = base
            words, acc_bits, lo, hi, byt = base
            sel = np.frombuffer(follow, dtype=np.uint8).astype(bool)[byt]
            if sel.any():
                n = self.vocab.n
                diff = np.zeros(n + 1, dtype=np.int32)
                np.add.at(diff, lo[sel], 1)
                np.add.at(diff, hi[sel], -1)
                unc = (np.cumsum(diff[:n]) > 0) & ~np.unpackbits(acc_bits, count=n).astype(bool)
                hit = (words, np.nonzero(unc)[0].astype(np.int32))
            else:
                hit = (words, np.zeros(0, dtype=np.int32))
            self.cache[key] = hit
        return hit

    def contribution(self, s: int, o: int, c: int):
        key = (s, self._ckey(s, c), o)
        w = self.space.contrib.get(key)
        if w is None:
            acc_words, unc = self.classification(s, c)
            w = acc_words
            if len(unc):
                cand = np.zeros(self.vocab.n, dtype=bool)
                cand[unc] = True
                ok, _ = walk(self.space, self.vocab, self.space.initial(s, c, o), False, cand)
                if ok.any():
                    w = acc_words | self.vocab.token_words(ok & cand)
            self.space.contrib[key] = w
        return w

    def config_mask(self, cid: int) -> np.ndarray:
        cfg = self.space.configs[cid]
        if cfg.mask is not None:
            return cfg.mask
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
        cfg.mask = words
        cfg.need_apply = not np.array_equal(words, self.full)
        return words
