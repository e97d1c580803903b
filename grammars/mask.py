"""Token masks of parser configurations: a walk from the configuration, or classified items resolved in context.

A configuration's mask is memoized by its shape (nb_shape.py), so configurations that differ only in counts
out of one token's reach share one. A new shape's mask is usually one compiled walk of the vocabulary trie
from the configuration itself (nb_walk.config_words): exact, and the configurations it builds are the real
ones that the next accept and mask step through. A configuration with a counted item far from its upper
bound (a string body of maxLength 10000, the 7th of 500 array items) takes the adaptive cache instead, whose
classification serves every such count:

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
each is one compiled call (nb_walk.classify: the walk, its tokens' mask words and its uncertain strings)
that builds the configurations it meets without leaving compiled code, results are ranges of sorted strings
rather than vocabulary-wide arrays, siblings a configuration cannot scan are passed over without reading
their records, and a trie subtree whose
bytes all stay on a configuration's main byte group (a string body's loop, a counted class `[a-z]{0,60}`
count by count) is accepted whole without being visited.
"""

from __future__ import annotations

import itertools
import numpy as np

from . import nb_mask, nb_walk
from .earley import Space
from .nb_store import VAL
from .vocab import VocabIndex

HASH_LIMIT_STATES = 400  # rules reaching more states are keyed per grammar instead of hashed
_GRAMMAR_IDS = itertools.count()


FEW_CANDIDATES = 300  # up to this many uncertain strings are run one by one, more through the trie


def accepted_among(space: Space, vocab: VocabIndex, start: int, us: np.ndarray) -> np.ndarray:
    """The strings among the sorted string indices `us` that run from `start`: one compiled walk of the trie
    (nb_walk.py) that enters only subtrees holding some of them."""
    cand = np.zeros(vocab.n, dtype=bool)
    cand[us] = True
    cum = np.zeros(vocab.n + 1, dtype=np.int32)
    np.cumsum(cand, out=cum[1:])
    lo, hi = space.walk(vocab.flat, start, cum)
    pos = np.searchsorted(lo, us, side="right") - 1
    return us[(pos >= 0) & (us < hi[np.maximum(pos, 0)])]


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
        self._hashable: set[int] = set()  # rules known to reach at most HASH_LIMIT_STATES states
        full = np.zeros(vocab.words * 32, dtype=bool)
        full[: vocab.vocab_size] = True
        self.full = np.packbits(full, bitorder="little").view(np.int32)
        self.full_bytes = self.full.tobytes()  # a bytes compare is the cheapest "masks nothing" test
        self.empty = np.zeros(vocab.words, dtype=np.int32)

    def prepare(self) -> None:
        """The grammar-wide work of the first masks, done by the compiler (where xgrammar does its own): FOLLOW1
        of every rule and the root's classification key, which hashes every rule the root reaches (at most
        HASH_LIMIT_STATES states; a larger grammar is keyed per grammar and hashes nothing up front)."""
        self.ir.follow_tables()
        self.rule_key(self.ir.root)

    def rule_key(self, r: int):
        """Rule r's part of a classification key: its structural hash, or a per-grammar id for a rule that
        reaches too many states to be worth hashing."""
        ir = self.ir
        if r not in self._hashable:  # a rule reached from a hashable one is hashable: no walk of its own
            reach = ir.reach_within(r, HASH_LIMIT_STATES)
            if reach is None:
                k = self.rule_keys[r] = (next(_GRAMMAR_IDS), r)
                return k
            self._hashable |= reach
        k = self.rule_keys[r] = ir.rule_hash(r)
        return k

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
        rk = self.rule_keys.get(r)
        if rk is None:
            rk = self.rule_key(r)
        base_key = (rk, s - ir.rule_base[r], ckey)
        key = (base_key, follow)
        hit = self.cache.get(key)
        if hit is None:
            base = self.cache.get(base_key)
            fol = np.frombuffer(follow, dtype=np.uint8)
            if base is None:  # walk, token words and uncertain strings in one compiled call
                vocab = self.vocab
                words = np.zeros(vocab.words, dtype=np.uint32)
                unc, *w = self.space.classify(vocab, s, c, words, fol)
                base = (words.view(np.int32), *w)  # a flat tuple of arrays (sized by the compiler)
                self.cache[base_key] = base
            else:
                unc = nb_mask.uncertain(*base[1:], fol, self.vocab.n)
            hit = (base[0], unc)
            self.cache[key] = hit
        return hit

    def _words(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Bitmask words of the tokens spelling the strings in the int32 ranges [lo, hi)."""
        words = np.zeros(self.vocab.words, dtype=np.uint32)
        nb_mask.range_words(lo, hi, self.vocab.ids_start, self.vocab.ids, words)
        return words.view(np.int32)

    def contribution(self, s: int, o: int, c: int):
        key = (s, self._ckey(s, c), self.space.context(o, self.ir.rule_of[s], self.horizon))
        w = self.space.contrib.get(key)
        if w is None:
            acc_words, unc = self.classification(s, c)
            w = acc_words
            if len(unc):
                init = self.space.initial(s, c, o)
                if len(unc) <= FEW_CANDIDATES:
                    strings = self.vocab.strings
                    ok = unc[self.space.run_many(init, [strings[u] for u in unc.tolist()]) >= 0]
                else:
                    ok = accepted_among(self.space, self.vocab, init, unc)
                if len(ok):
                    w = acc_words | self._words(ok, ok + 1)
            self.space.contrib[key] = w
        return w

    def config_mask(self, cid: int) -> np.ndarray:
        """A configuration's mask, memoized by its shape (nb_shape.py): configurations that differ only in
        counts out of one token's reach of their bounds (the 7th vs the 8th element of `minItems: 200`) share
        it. A new shape's mask is a walk from the configuration (one compiled call with the shape), or its
        items' classifications when one is a counted repetition far from its upper bound."""
        cfg = self.space.config(cid)
        if cfg.mask is not None:
            return cfg.mask
        space, vocab = self.space, self.vocab
        words = np.zeros(vocab.words, dtype=np.uint32)
        sid, how = space.config_words(vocab, cid, self.horizon, words)
        if how == nb_walk.SHAPED:
            hit = space.shape_masks[space.st[VAL][sid]]
        else:
            if how == nb_walk.WALKED:
                mask = words.view(np.int32)
                if space.can_end(cid):
                    mask |= self.stop_words
            else:
                mask = self._roots_mask(cid)
            hit = (mask, mask.tobytes() != self.full_bytes)
            space.st[VAL][sid] = len(space.shape_masks)
            space.shape_masks.append(hit)
        cfg.mask, cfg.need_apply = hit
        return cfg.mask

    def _roots_mask(self, cid: int) -> np.ndarray:
        """The OR of a configuration's kernel items' contributions (its roots cover the other items)."""
        ir = self.ir
        words = None
        owned = False
        for s, o, c in self.space.roots(cid):
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
        if self.space.can_end(cid):
            words = words | self.stop_words
        return words
