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

import numpy as np

from .earley import ROOT, UNKNOWN, Space
from .vocab import VocabIndex


def walk(
    space: Space, vocab: VocabIndex, start: int, follow: np.ndarray | None, cand: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Runs every vocabulary string (or only those flagged in `cand`) from configuration `start`.

    Returns boolean arrays over sorted strings: accepted (all bytes consumed), and uncertain (the bottom
    item's rule ended before the token did, followed by a byte in `follow`; only when `follow` is given).
    """
    n = vocab.n
    acc = np.zeros(n + 1, dtype=bool)
    unc = np.zeros(n + 1, dtype=np.int32)
    levels = vocab.levels
    can_end = space.can_end_arr
    nodes = np.arange(len(levels[0].lo))
    if cand is not None:
        cum = np.concatenate([[0], np.cumsum(cand)])
        lvl = levels[0]
        nodes = nodes[cum[lvl.hi] > cum[lvl.lo]]
    pc = np.full(len(nodes), start, dtype=np.int64)
    depth = 0
    while True:
        lvl = levels[depth]
        byt = lvl.byte[nodes]
        if depth and follow is not None:
            exits = can_end[pc] & follow[byt]
            if exits.any():
                ex = nodes[exits]
                np.add.at(unc, lvl.lo[ex], 1)
                np.add.at(unc, lvl.hi[ex], -1)
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
            can_end = space.can_end_arr
        alive = cfg >= 0
        nodes = nodes[alive]
        cfg = cfg[alive]
        term = lvl.term[nodes]
        acc[term[term >= 0]] = True
        if depth + 1 >= len(levels) or not len(nodes):
            break
        clo, chi = lvl.child_lo[nodes], lvl.child_hi[nodes]
        cnt = chi - clo
        total = int(cnt.sum())
        if not total:
            break
        pc = np.repeat(cfg.astype(np.int64), cnt)
        offsets = np.cumsum(cnt) - cnt
        nodes = np.repeat(clo - offsets, cnt) + np.arange(total)
        depth += 1
        if cand is not None:
            nxt = levels[depth]
            keep = cum[nxt.hi[nodes]] > cum[nxt.lo[nodes]]
            nodes, pc = nodes[keep], pc[keep]
    if follow is None:
        return acc[:n], np.zeros(n, dtype=bool)
    uncertain = (np.cumsum(unc) > 0) & ~acc
    return acc[:n], uncertain[:n]


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
        ir = self.ir
        r = ir.rule_of[s]
        follow = ir.follow_bytes(r)
        ckey = self._ckey(s, c)
        if ckey and ckey[0] == 0 and (ckey[1] is None or ckey[1] >= self.horizon):
            s, c, ckey = ir.free_rep.get(s, s), 0, "free"  # no bound is reachable within one token
        key = (ir.rule_hash(ir.rule_of[s]), s - ir.rule_base[ir.rule_of[s]], ckey, follow)
        hit = self.cache.get(key)
        if hit is None:
            start = self.space.initial(s, c, ROOT)
            acc, unc = walk(self.space, self.vocab, start, np.frombuffer(follow, dtype=np.uint8).astype(bool))
            hit = (self.vocab.token_words(acc), np.nonzero(unc)[0].astype(np.int32))
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
                ok, _ = walk(self.space, self.vocab, self.space.initial(s, c, o), None, cand)
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
