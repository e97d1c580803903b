"""Grammar AST -> byte-level rule automata: the IR the Earley matcher runs on.

Each rule becomes a DFA over bytes and rule references (subset construction over a Thompson NFA), so one
Earley item per rule instance suffices and `*`/`+` inside a rule are loops, not recursion (which keeps the
matcher's configurations finite and memoizable). Char classes become UTF-8 byte sequences. Bounded repetition
`x{m,n}` is unrolled when small; larger bounds become a counted REP rule (the Earley item carries the count),
so `maxLength: 10000` costs one rule, not ten thousand states.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import pickle
from dataclasses import dataclass

import numpy as np

from .ebnf import Alt, Chars, Grammar, Lit, Ref, Rep, Seq, TagDispatch
from .errors import GrammarError

UNROLL_LIMIT = 16  # repetitions with a larger (finite) upper bound, or larger lower bound, use a counter
_SURROGATES = (0xD800, 0xDFFF)
_MAX_CP = 0x10FFFF


def utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """Splits a code point range (surrogates excluded by the caller) into byte-range sequences."""
    out = []
    stack = [(lo, hi)]
    while stack:
        lo, hi = stack.pop()
        for b in (0x7F, 0x7FF, 0xFFFF):
            if lo <= b < hi:
                stack.append((b + 1, hi))
                stack.append((lo, b))
                break
        else:
            if hi < 0x80:
                out.append(((lo, hi),))
                continue
            n = 2 if hi <= 0x7FF else 3 if hi <= 0xFFFF else 4
            for i in range(1, n):
                m = (1 << (6 * i)) - 1
                if lo & ~m != hi & ~m:
                    if lo & m:
                        stack.append(((lo | m) + 1, hi))
                        stack.append((lo, lo | m))
                        break
                    if hi & m != m:
                        stack.append((hi & ~m, hi))
                        stack.append((lo, (hi & ~m) - 1))
                        break
            else:
                a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
                out.append(tuple(zip(a, b)))
    return out


def _class_codepoint_ranges(c: Chars) -> list[tuple[int, int]]:
    ranges = list(c.ranges)
    if c.negated:
        comp, prev = [], 0
        for a, b in ranges:
            if a > prev:
                comp.append((prev, a - 1))
            prev = max(prev, b + 1)
        if prev <= _MAX_CP:
            comp.append((prev, _MAX_CP))
        ranges = comp
    out = []
    for a, b in ranges:  # drop surrogates: they have no UTF-8 encoding
        if b < _SURROGATES[0] or a > _SURROGATES[1]:
            out.append((a, b))
        else:
            if a < _SURROGATES[0]:
                out.append((a, _SURROGATES[0] - 1))
            if b > _SURROGATES[1]:
                out.append((_SURROGATES[1] + 1, b))
    return out


@dataclass
class RuleDFA:
    """One rule's automaton: per state, byte -> state, rule -> state, and whether the rule may end there."""

    bnext: list[dict[int, int]]
    rnext: list[dict[int, int]]
    final: list[bool]


class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = [[], []]
        self.edges: list[list[tuple[int, int, int]]] = [[], []]
        self.refs: list[list[tuple[int, int]]] = [[], []]

    def new(self) -> int:
        self.eps.append([])
        self.edges.append([])
        self.refs.append([])
        return len(self.eps) - 1


class _Builder:
    """Turns named AST rules into rule DFAs, adding synthetic rules for counted repetition bodies."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.exprs: list = []
        self.rep: list[tuple[int, int, int | None] | None] = []
        self.rep_memo: dict = {}
        self.body_memo: dict = {}

    def rule(self, name: str) -> int:
        r = self.index.get(name)
        if r is None:
            r = self.index[name] = len(self.names)
            self.names.append(name)
            self.exprs.append(self.grammar.rules[name])
            self.rep.append(None)
        return r

    def synthetic(self, expr, rep=None) -> int:
        r = len(self.names)
        self.names.append(f"{'rep' if rep else 'body'}#{r}")
        self.exprs.append(expr)
        self.rep.append(rep)
        return r

    def build(self, nfa: _NFA, e, a: int, b: int) -> None:
        if isinstance(e, Lit):
            if not e.data:
                nfa.eps[a].append(b)
                return
            cur = a
            for i, byte in enumerate(e.data):
                nxt = b if i == len(e.data) - 1 else nfa.new()
                nfa.edges[cur].append((byte, byte, nxt))
                cur = nxt
        elif isinstance(e, Chars):
            for cps in _class_codepoint_ranges(e):
                for seq in utf8_sequences(*cps):
                    cur = a
                    for i, (lo, hi) in enumerate(seq):
                        nxt = b if i == len(seq) - 1 else nfa.new()
                        nfa.edges[cur].append((lo, hi, nxt))
                        cur = nxt
        elif isinstance(e, Ref):
            nfa.refs[a].append((self.rule(e.name), b))
        elif isinstance(e, Seq):
            cur = a
            for i, item in enumerate(e.items):
                nxt = b if i == len(e.items) - 1 else nfa.new()
                self.build(nfa, item, cur, nxt)
                cur = nxt
        elif isinstance(e, Alt):
            for item in e.items:
                self.build(nfa, item, a, b)
        elif isinstance(e, Rep):
            self.build_rep(nfa, e, a, b)
        elif isinstance(e, TagDispatch):
            raise GrammarError("TagDispatch(...) must be the whole body of a rule")
        else:  # pragma: no cover - the parser only produces the node types above
            raise TypeError(f"unknown grammar node {e!r}")

    def build_rep(self, nfa: _NFA, e: Rep, a: int, b: int) -> None:
        lo, hi = e.lo, e.hi
        if hi == 0:
            nfa.eps[a].append(b)
            return
        small = lo <= UNROLL_LIMIT and (hi is None or hi <= UNROLL_LIMIT)
        if small:
            cur = a
            for _ in range(lo):
                nxt = nfa.new()
                self.build(nfa, e.item, cur, nxt)
                cur = nxt
            if hi is None:
                loop = nfa.new()
                nfa.eps[cur].append(loop)
                self.build(nfa, e.item, loop, loop)
                nfa.eps[loop].append(b)
            else:
                for _ in range(hi - lo):
                    nxt = nfa.new()
                    nfa.eps[cur].append(b)
                    self.build(nfa, e.item, cur, nxt)
                    cur = nxt
                nfa.eps[cur].append(b)
            return
        body = self.body_memo.get(e.item)
        if body is None:
            body = self.rule(e.item.name) if isinstance(e.item, Ref) else self.synthetic(e.item)
            self.body_memo[e.item] = body
        key = (body, lo, hi)
        r = self.rep_memo.get(key)
        if r is None:
            r = self.rep_memo[key] = self.synthetic(None, key)
        nfa.refs[a].append((r, b))

    def dfa(self, r: int) -> RuleDFA:
        e = self.exprs[r]
        if self.rep[r] is not None:
            body = self.rep[r][0]
            return RuleDFA([{}], [{body: 0}], [False])
        if isinstance(e, TagDispatch):
            return self.tag_dispatch_dfa(e)
        nfa = _NFA()
        self.build(nfa, e, 0, 1)
        return _determinize(nfa)

    def tag_dispatch_dfa(self, td: TagDispatch) -> RuleDFA:
        """Aho-Corasick automaton over triggers and excludes; a completed trigger takes the paired rule."""
        patterns = [(t, self.rule(name)) for t, name in td.pairs] + [(x, -1) for x in td.excludes]
        goto: list[dict[int, int]] = [{}]
        out: list[int | None] = [None]  # per trie node: rule to dispatch, -1 exclude, None nothing
        for text, rule in patterns:
            node = 0
            for byte in text:
                nxt = goto[node].get(byte)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][byte] = nxt
                    goto.append({})
                    out.append(None)
                node = nxt
            if out[node] is None or rule == -1:
                out[node] = rule
        fail = [0] * len(goto)
        order, queue = [], [0]
        while queue:
            node = queue.pop(0)
            order.append(node)
            for byte, child in goto[node].items():
                if node:
                    f = fail[node]
                    while f and byte not in goto[f]:
                        f = fail[f]
                    fail[child] = goto[f].get(byte, 0)
                    if out[child] is None:
                        out[child] = out[fail[child]]
                queue.append(child)
        n = len(goto)
        delta: list[dict[int, int]] = [None] * n
        for node in order:
            row = dict(delta[fail[node]]) if node else {byte: 0 for byte in range(256)}
            row.update(goto[node])
            delta[node] = row
        # states: trie nodes 0..n-1 (free text, final), then per dispatch rule a "take rule" state, then end
        take: dict[int, int] = {}
        end = None if td.loop else n
        base = n + (0 if td.loop else 1)
        bnext: list[dict[int, int]] = []
        for node in range(n):
            row = {}
            for byte, nxt in delta[node].items():
                o = out[nxt]
                if o is None:
                    row[byte] = nxt
                elif o >= 0:
                    if o not in take:
                        take[o] = base + len(take)
                    row[byte] = take[o]
            bnext.append(row)
        after = 0 if td.loop else end
        rnext: list[dict[int, int]] = [{} for _ in range(n)]
        final = [True] * n
        if not td.loop:
            bnext.append({})
            rnext.append({})
            final.append(True)
        for rule, _state in sorted(take.items(), key=lambda kv: kv[1]):
            bnext.append({})
            rnext.append({rule: after})
            final.append(False)
        return RuleDFA(bnext, rnext, final)


def _determinize(nfa: _NFA) -> RuleDFA:
    eps = nfa.eps

    def closure(states) -> frozenset:
        seen = set(states)
        stack = list(states)
        while stack:
            for t in eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    start = closure([0])
    ids = {start: 0}
    sets = [start]
    bnext: list[dict[int, int]] = []
    rnext: list[dict[int, int]] = []
    final: list[bool] = []
    i = 0
    while i < len(sets):
        d = sets[i]
        i += 1
        final.append(1 in d)
        edges = [e for s in d for e in nfa.edges[s]]
        row: dict[int, int] = {}
        if edges:
            points = sorted({lo for lo, _, _ in edges} | {hi + 1 for _, hi, _ in edges})
            targets: list[set] = [set() for _ in points]
            for lo, hi, t in edges:
                for k in range(bisect.bisect_left(points, lo), bisect.bisect_left(points, hi + 1)):
                    targets[k].add(t)
            for k in range(len(points) - 1):
                if targets[k]:
                    tset = closure(targets[k])
                    tid = ids.get(tset)
                    if tid is None:
                        tid = ids[tset] = len(sets)
                        sets.append(tset)
                    for byte in range(points[k], points[k + 1]):
                        row[byte] = tid
        bnext.append(row)
        rrow: dict[int, int] = {}
        by_rule: dict[int, set] = {}
        for s in d:
            for r, t in nfa.refs[s]:
                by_rule.setdefault(r, set()).add(t)
        for r in sorted(by_rule):
            tset = closure(by_rule[r])
            tid = ids.get(tset)
            if tid is None:
                tid = ids[tset] = len(sets)
                sets.append(tset)
            rrow[r] = tid
        rnext.append(rrow)
    return RuleDFA(bnext, rnext, final)


class GrammarIR:
    """All rules' automata with global state ids, plus the static facts the Earley matcher precomputes.

    State s belongs to rule `rule_of[s]`; `rep_of[s]` is (body, lo, hi) for the single state of a counted
    REP rule (its Earley items carry the count), else None.
    """

    def __init__(self, grammar: Grammar):
        b = _Builder(grammar)
        self.root = b.rule(grammar.root)
        dfas: list[RuleDFA] = []
        r = 0
        while r < len(b.names):
            dfas.append(b.dfa(r))
            r += 1
        self.rule_names = b.names
        self.rule_base: list[int] = []
        self.bnext: list[dict[int, int]] = []
        self.rnext: list[dict[int, int]] = []
        self.final: list[bool] = []
        self.rule_of: list[int] = []
        self.rep_of: list = []
        for r, d in enumerate(dfas):
            base = len(self.bnext)
            self.rule_base.append(base)
            self.bnext.extend({k: v + base for k, v in row.items()} for row in d.bnext)
            self.rnext.extend({k: v + base for k, v in row.items()} for row in d.rnext)
            self.final.extend(d.final)
            self.rule_of.extend([r] * len(d.final))
            self.rep_of.extend([b.rep[r]] * len(d.final))
        # per counted rule, twins over the same body without the upper bound: an unbounded one (far from
        # both bounds a counted item classifies exactly like it) and, for rules with a lower bound, one that
        # keeps it (far from the upper bound only); walks from a twin do not multiply configurations by
        # the count, since its count stops growing once the lower bound is met
        self.free_rep: dict[int, int] = {}
        self.open_rep: dict[int, int] = {}
        for r in range(len(dfas)):
            rep = b.rep[r]
            if rep is None:
                continue
            twins = []
            if (rep[1], rep[2]) != (0, None):
                twins.append((self.free_rep, "free", (rep[0], 0, None)))
            if rep[1] > 0 and rep[2] is not None:
                twins.append((self.open_rep, "open", (rep[0], rep[1], None)))
            for table, kind, twin_rep in twins:
                twin = len(self.bnext)
                self.rule_base.append(twin)
                self.rule_names.append(f"{kind}#{r}")
                self.bnext.append({})
                self.rnext.append({})
                self.final.append(False)
                self.rule_of.append(len(self.rule_names) - 1)
                self.rep_of.append(twin_rep)
                table[self.rule_base[r]] = twin
        self.rule_base.append(len(self.bnext))
        self.n_states = len(self.bnext)
        self.nullable = self._nullable()
        for s, rep in enumerate(self.rep_of):
            if rep is not None and self.nullable[rep[0]] and rep[1] > 0:
                # a nullable body can always be matched empty, so the lower bound is vacuous
                self.rep_of[s] = (rep[0], 0, rep[2])
        self.nullable = self._nullable()
        self._check_productive()
        # a final state with no way on: its item only matters for the completion it triggers
        self.dead_end = [not self.bnext[s] and not self.rnext[s] and self.rep_of[s] is None
                         for s in range(self.n_states)]
        self._expand: list = [None] * self.n_states
        self._pred: list = [None] * self.n_states
        self._follow: list | None = None
        self._root_ref: bool | None = None
        self._hash: list = [None] * len(self.rule_names)
        self._kids: list = [None] * len(self.rule_names)
        self._owned: list = [None] * len(self.rule_names)
        self._dense: np.ndarray | None = None  # share_byte_table
        self._trans: tuple | None = None  # _transitions
        self._cyclic: list[bool] | None = None
        self._info: list = [None] * self.n_states
        self._scanning: dict[frozenset, tuple] = {}
        self._predicted: dict[frozenset, frozenset] = {}
        self._groups: dict[int, list] = {}  # keyed by id() of a bnext dict, which lives as long as self
        self._targets: dict[int, np.ndarray] = {}

    def byte_table(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The byte transitions of states [lo, hi) as a dense int32 [states, 256] table (-1: none), built with
        numpy, not kept (a 500-tool grammar's is ~17 MB): the compiled parser's table (nb_earley.ir_arrays)
        and the rule hashes read it."""
        ds = self.bnext[lo:hi]
        lens = np.fromiter(map(len, ds), dtype=np.int64, count=len(ds))
        table = np.full((len(ds), 256), -1, dtype=np.int32)
        if lens.sum():
            rows = np.repeat(np.arange(len(ds)), lens)
            table[rows, np.fromiter(itertools.chain.from_iterable(ds), dtype=np.int64)] = np.fromiter(
                itertools.chain.from_iterable(d.values() for d in ds), dtype=np.int32)
        return table

    def byte_groups(self, bnext: dict[int, int]) -> list[tuple[int, np.ndarray]]:
        """A state's byte transitions grouped by target: [(target, bytes as an index array)]."""
        key = id(bnext)
        g = self._groups.get(key)
        if g is None:
            by_t: dict[int, list[int]] = {}
            for byte, t in bnext.items():
                by_t.setdefault(t, []).append(byte)
            g = self._groups[key] = [(t, np.array(bs, dtype=np.intp)) for t, bs in by_t.items()]
        return g

    def byte_targets(self, bnext: dict[int, int]) -> np.ndarray:
        """A state's byte transitions as a dense array (-1 where there is none)."""
        key = id(bnext)
        a = self._targets.get(key)
        if a is None:
            a = np.full(256, -1, dtype=np.int64)
            if bnext:
                a[np.fromiter(bnext.keys(), dtype=np.intp)] = np.fromiter(bnext.values(), dtype=np.int64)
            self._targets[key] = a
        return a

    def item_info(self, s: int) -> tuple:
        """(other states reached by skipping nullable rules, final, kept in a kernel, rule, rep bounds)."""
        i = self._info[s]
        if i is None:
            rep = self.rep_of[s]
            others = () if rep is not None else tuple(x for x in self.expand(s) if x != s)
            i = self._info[s] = (others, self.final[s], not self.dead_end[s], self.rule_of[s], rep)
        return i

    def scanning(self, states: frozenset) -> tuple[int, ...]:
        """The states among a prediction set that can scan a byte (memoized per set)."""
        t = self._scanning.get(states)
        if t is None:
            t = self._scanning[states] = tuple(x for x in states if self.bnext[x])
        return t

    def start(self, r: int) -> int:
        return self.rule_base[r]

    def _nullable(self) -> list[bool]:
        n_rules = len(self.rule_names)
        nullable = [False] * n_rules
        changed = True
        while changed:
            changed = False
            for r in reversed(range(n_rules)):  # children are mostly discovered after parents
                if nullable[r]:
                    continue
                s0 = self.rule_base[r]
                rep = self.rep_of[s0]
                if rep is not None:
                    ok = rep[1] == 0 or nullable[rep[0]]
                else:
                    ok, seen, stack = False, {s0}, [s0]
                    while stack:
                        s = stack.pop()
                        if self.final[s]:
                            ok = True
                            break
                        for rr, t in self.rnext[s].items():
                            if nullable[rr] and t not in seen:
                                seen.add(t)
                                stack.append(t)
                if ok:
                    nullable[r] = changed = True
        return nullable

    def _check_productive(self) -> None:
        """Rejects grammars with a rule that can derive no finite string (its language is empty)."""
        n_rules = len(self.rule_names)
        productive = [False] * n_rules
        changed = True
        while changed:
            changed = False
            for r in reversed(range(n_rules)):
                if productive[r]:
                    continue
                s0 = self.rule_base[r]
                rep = self.rep_of[s0]
                if rep is not None:
                    ok = rep[1] == 0 or productive[rep[0]]
                else:
                    ok, seen, stack = False, {s0}, [s0]
                    while stack and not ok:
                        s = stack.pop()
                        if self.final[s]:
                            ok = True
                        nxt = list(self.bnext[s].values()) + [t for rr, t in self.rnext[s].items() if productive[rr]]
                        for t in nxt:
                            if t not in seen:
                                seen.add(t)
                                stack.append(t)
                if ok:
                    productive[r] = changed = True
        bad = [self.rule_names[r] for r in range(n_rules) if not productive[r]]
        if bad:
            raise GrammarError(f"rule {bad[0]!r} matches no finite string (its language is empty)")

    def is_final(self, s: int, c: int) -> bool:
        rep = self.rep_of[s]
        return self.final[s] if rep is None else c >= rep[1]

    def expand(self, s: int) -> tuple[int, ...]:
        """States of s's rule reachable from s over references to nullable rules (s included)."""
        e = self._expand[s]
        if e is None:
            if self.rep_of[s] is not None:
                e = (s,)
            else:
                seen, stack = {s}, [s]
                while stack:
                    x = stack.pop()
                    for r, t in self.rnext[x].items():
                        if self.nullable[r] and t not in seen:
                            seen.add(t)
                            stack.append(t)
                e = tuple(sorted(seen))
            self._expand[s] = e
        return e

    def pred(self, s: int) -> frozenset:
        """States predicted (fresh rule instances starting here) by an item at s, transitively."""
        p = self._pred[s]
        if p is None:
            out: set[int] = set()
            stack = [s]
            while stack:
                x = stack.pop()
                rep = self.rep_of[x]
                refs = (rep[0],) if rep is not None else [r for y in self.expand(x) for r in self.rnext[y]]
                for r in refs:
                    for y in self.expand(self.rule_base[r]):
                        if y not in out:
                            out.add(y)
                            stack.append(y)
            p = self._pred[s] = frozenset(out)
        return p

    def predicted(self, states: frozenset) -> frozenset:
        """The union of pred(s) over a set of states (memoized: configurations repeat their state sets
        with other origins)."""
        p = self._predicted.get(states)
        if p is None:
            p = frozenset()
            for s in states:
                q = self.pred(s)
                if q:
                    p = p | q if p else q
            self._predicted[states] = p
        return p

    def follow_bytes(self, r: int) -> bytes:
        """FOLLOW1 of rule r: a 256-byte 0/1 table of bytes that can come right after r ends anywhere.

        The root rule, when nothing refers to it, is followed by nothing: its first mask (a structural
        tag's free text) does not wait for the grammar-wide fixpoint."""
        if self._follow is None:
            if r == self.root and not self._root_referenced():
                return bytes(256)
            self._follow = self._compute_follow()
        return self._follow[r]

    def follow_tables(self) -> list[bytes]:
        """`follow_bytes` of every rule, computed once."""
        if self._follow is None:
            self._follow = self._compute_follow()
        return self._follow

    def _root_referenced(self) -> bool:
        if self._root_ref is None:
            self._root_ref = any(self.root in refs for refs in self.rnext) or any(
                rep is not None and rep[0] == self.root for rep in self.rep_of)
        return self._root_ref

    def _compute_follow(self) -> list[bytes]:
        n_rules = len(self.rule_names)
        first_rule: list[set[int]] = [set() for _ in range(n_rules)]

        def first_of_state(s: int, fr: list[set[int]]) -> set[int]:
            out = set()
            for y in self.expand(s):
                out.update(self.bnext[y])
                rep = self.rep_of[y]
                for r in ((rep[0],) if rep is not None else self.rnext[y]):
                    out |= fr[r]
            return out

        changed = True
        while changed:
            changed = False
            for r in reversed(range(n_rules)):
                f = first_of_state(self.rule_base[r], first_rule)
                if not f <= first_rule[r]:
                    first_rule[r] |= f
                    changed = True
        follow: list[set[int]] = [set() for _ in range(n_rules)]
        # edges: follow[child] |= first(after); and if after can end the parent, follow[child] |= follow[parent]
        links: list[tuple[int, int]] = []
        for s in range(self.n_states):
            parent = self.rule_of[s]
            rep = self.rep_of[s]
            if rep is not None:
                body = rep[0]
                if rep[2] is None or rep[2] > 1:
                    follow[body] |= first_rule[body]
                links.append((body, parent))
                continue
            for r, t in self.rnext[s].items():
                follow[r] |= first_of_state(t, first_rule)
                if any(self.final[y] for y in self.expand(t)):
                    links.append((r, parent))
        changed = True
        while changed:
            changed = False
            for child, parent in links:
                if not follow[parent] <= follow[child]:
                    follow[child] |= follow[parent]
                    changed = True
        tables = []
        for f in follow:
            t = bytearray(256)
            for i in f:
                t[i] = 1
            tables.append(bytes(t))
        return tables

    def share_byte_table(self, table: np.ndarray) -> None:
        """Lends the rule hashes the whole grammar's dense byte table (`byte_table()`) that the compiled parser
        already holds, rather than building it again from the state dicts."""
        self._dense = table

    def _transitions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every byte transition of the grammar, relative to its rule: (at, target, first), with at =
        (state - rule base) * 256 + byte, target - rule base, and rule r's transitions at [first[r],
        first[r + 1]). One numpy pass over the dense table on the first hash, so hashing a rule is two slices."""
        if self._trans is None:
            table = (self.byte_table() if self._dense is None else self._dense).ravel()
            at = np.flatnonzero(table >= 0)
            rule_base = np.asarray(self.rule_base, dtype=np.int64)
            base = rule_base[np.asarray(self.rule_of, dtype=np.int64)][at >> 8]
            self._trans = ((at - base * 256).astype(np.int32), (table[at] - base).astype(np.int32),
                           np.searchsorted(at, rule_base * 256))
        return self._trans

    def _own(self, r: int) -> tuple:
        """Rule r's automaton with states renumbered from 0 (byte transitions as one digest, `_transitions`);
        references keep global rule ids. Memoized: the hash of a rule on a cycle reads every rule it reaches."""
        own = self._owned[r]
        if own is not None:
            return own
        base, end = self.rule_base[r], self.rule_base[r + 1]
        rep = self.rep_of[base]
        if rep is not None:
            return ("rep", rep)  # cheap: not memoized
        at, target, first = self._transitions()
        a, b = first[r], first[r + 1]
        rows = hashlib.blake2b(at[a:b].tobytes(), digest_size=16)
        rows.update(target[a:b].tobytes())
        rnext = self.rnext
        refs = tuple((s - base, tuple(sorted((r2, t - base) for r2, t in rnext[s].items())))
                     for s in range(base, end) if rnext[s])
        own = self._owned[r] = ("dfa", rows.digest(), tuple(self.final[base:end]), refs)
        return own

    def _children(self, own: tuple) -> list[int]:
        if own[0] == "rep":
            return [own[1][0]]
        return sorted({r2 for _, refs in own[3] for r2, _ in refs})

    def kids(self, r: int) -> list[int]:
        """The rules rule r refers to (sorted), memoized per rule: a reach check stops early, so it lists only
        the rules it visits."""
        k = self._kids[r]
        if k is None:
            base, end = self.rule_base[r], self.rule_base[r + 1]
            rep = self.rep_of[base]
            k = self._kids[r] = [rep[0]] if rep is not None else sorted(
                {r2 for s in range(base, end) for r2 in self.rnext[s]})
        return k

    def reach_within(self, r: int, limit: int) -> set[int] | None:
        """The rules reachable from r (r included) if they have at most `limit` states in all, else None
        (hashing them would cost more than the cross-grammar sharing of their classifications is likely to
        save); the walk stops as soon as the limit is passed."""
        seen, stack, total = {r}, [r], 0
        while stack:
            x = stack.pop()
            total += self.rule_base[x + 1] - self.rule_base[x]
            if total > limit:
                return None
            for k in self.kids(x):
                if k not in seen:
                    seen.add(k)
                    stack.append(k)
        return seen

    def rule_hash(self, r: int) -> bytes:
        """Digest of the sub-grammar reachable from r, independent of rule names and numbering.

        Equal digests mean isomorphic sub-grammars, so token classifications keyed by it are shared across
        grammars (the same tool schema inside many tool sets is classified once). Rules outside a cycle
        hash their own automaton with their children's digests (Merkle style); a rule on a cycle hashes
        everything reachable from it, numbered in discovery order.
        """
        h = self._hash[r]
        if h is not None:
            return h
        if self._cyclic is None:
            self._cyclic = self._find_cyclic()
        own = self._own(r)
        if not self._cyclic[r]:
            kids = {c: self.rule_hash(c) for c in self._children(own)}
            parts = (_relabel(own, kids), )
        else:
            order, index, parts_l = [r], {r: 0}, []
            i = 0
            while i < len(order):
                o = own if order[i] == r else self._own(order[i])
                i += 1
                for c in self._children(o):
                    if c not in index:
                        index[c] = len(order)
                        order.append(c)
                parts_l.append(_relabel(o, index))
            parts = tuple(parts_l)
        h = self._hash[r] = hashlib.blake2b(pickle.dumps(parts, protocol=5), digest_size=16).digest()
        return h

    def _find_cyclic(self) -> list[bool]:
        """Marks rules that can reach themselves through references (Tarjan's SCC, iteratively)."""
        n = len(self.rule_names)
        kids = [self.kids(r) for r in range(n)]
        index = [-1] * n
        low = [0] * n
        on = [False] * n
        stack: list[int] = []
        cyclic = [False] * n
        counter = 0
        for root in range(n):
            if index[root] >= 0:
                continue
            work = [(root, 0)]
            while work:
                v, i = work.pop()
                if i == 0:
                    index[v] = low[v] = counter
                    counter += 1
                    stack.append(v)
                    on[v] = True
                if i < len(kids[v]):
                    work.append((v, i + 1))
                    w = kids[v][i]
                    if index[w] < 0:
                        work.append((w, 0))
                    elif on[w]:
                        low[v] = min(low[v], index[w])
                    continue
                for w in kids[v]:
                    if on[w] and index[w] > index[v]:
                        low[v] = min(low[v], low[w])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on[w] = False
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in kids[v]:
                        for w in comp:
                            cyclic[w] = True
        return cyclic


def _relabel(own: tuple, label: dict) -> tuple:
    if own[0] == "rep":
        body, lo, hi = own[1]
        return ("rep", label[body], lo, hi)
    return ("dfa", own[1], own[2], tuple((i, tuple((label[r2], t) for r2, t in refs)) for i, refs in own[3]))
