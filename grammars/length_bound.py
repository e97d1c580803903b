"""A regular language intersected with a length range: `pattern`/`format` together with
`minLength`/`maxLength`.

Dropping the length (what xgrammar does) silently accepts invalid strings, so the intersection is
built exactly. Cheap cases first: the bounds are implied, exclude everything, or fall on a single
repetition of one character (`[a-z]+` with maxLength 64 becomes `[a-z]{1,64}`). Otherwise the
language is turned into a position automaton (Glushkov: one state per character occurrence, no
epsilon moves) and multiplied by a length counter, one rule per reachable (state, length) pair. That
product is capped; beyond the cap the combination is a GrammarError naming it, never a dropped bound.
"""

from __future__ import annotations

from collections.abc import Callable

from .charset import CharSet
from .ebnf_writer import EMPTY, NOTHING, Alt, Chars, Expr, Lit, Ref, Repeat, RuleSet, Seq, alt, repeat, seq
from .errors import GrammarError
from .regex import map_chars

MAX_POSITIONS = 2_000
MAX_PRODUCT_RULES = 4_000


def length_range(expr: Expr) -> tuple[int, int | None]:
    """Shortest and longest string length (in characters) of a character-level expression."""
    if isinstance(expr, Lit):
        return len(expr.text), len(expr.text)
    if isinstance(expr, Chars):
        return 1, 1
    if isinstance(expr, Seq):
        lo, hi = 0, 0
        for item in expr.items:
            a, b = length_range(item)
            lo += a
            hi = None if hi is None or b is None else hi + b
        return lo, hi
    if isinstance(expr, Alt):
        if not expr.options:
            return 0, 0
        ranges = [length_range(option) for option in expr.options]
        highs = [b for _, b in ranges]
        return min(a for a, _ in ranges), None if None in highs else max(highs)
    if isinstance(expr, Repeat):
        a, b = length_range(expr.body)
        return a * expr.lo, None if expr.hi is None or b is None else b * expr.hi
    raise GrammarError("internal: rule reference inside a character-level expression")


def _tighten(expr: Expr, lo: int, hi: int | None) -> Expr | None:
    """The intersection when it is a simple rewrite of `expr`, else None."""
    e_lo, e_hi = length_range(expr)
    if lo <= e_lo and (hi is None or (e_hi is not None and e_hi <= hi)):
        return expr
    if (hi is not None and e_lo > hi) or (e_hi is not None and e_hi < lo):
        return NOTHING
    if isinstance(expr, Alt):
        options = [_tighten(option, lo, hi) for option in expr.options]
        return None if any(o is None for o in options) else alt(*options)
    items = expr.items if isinstance(expr, Seq) else (expr,)
    variable = [i for i, item in enumerate(items) if length_range(item)[0] != length_range(item)[1]]
    if len(variable) != 1:
        return None
    target = items[variable[0]]
    if not isinstance(target, Repeat) or length_range(target.body) != (1, 1):
        return None
    fixed = e_lo - target.lo
    new_lo = max(target.lo, lo - fixed)
    if hi is None:
        new_hi = target.hi
    else:
        new_hi = hi - fixed if target.hi is None else min(target.hi, hi - fixed)
    replaced = list(items)
    replaced[variable[0]] = repeat(target.body, new_lo, new_hi)
    return seq(*replaced)


class _Glushkov:
    """Position automaton of a character-level expression."""

    def __init__(self, expr: Expr, what: str) -> None:
        self.what = what
        self.classes: list[CharSet] = []
        self.follow: list[set[int]] = []
        self.nullable, self.first, self.last = self.visit(expr)

    def position(self, charset: CharSet) -> int:
        if len(self.classes) >= MAX_POSITIONS:
            raise GrammarError(f"{self.what}: pattern too large to combine with minLength/maxLength")
        self.classes.append(charset)
        self.follow.append(set())
        return len(self.classes) - 1

    def visit(self, expr: Expr) -> tuple[bool, set[int], set[int]]:
        if isinstance(expr, Lit):
            if not expr.text:
                return True, set(), set()
            ps = [self.position(CharSet.of(c)) for c in expr.text]
            for a, b in zip(ps, ps[1:]):
                self.follow[a].add(b)
            return False, {ps[0]}, {ps[-1]}
        if isinstance(expr, Chars):
            p = self.position(expr.charset)
            return False, {p}, {p}
        if isinstance(expr, Seq):
            nullable, first, last = True, set(), set()
            for item in expr.items:
                n, f, l_ = self.visit(item)
                for p in last:
                    self.follow[p] |= f
                first = first | f if nullable else first
                last = last | l_ if n else l_
                nullable = nullable and n
            return nullable, first, last
        if isinstance(expr, Alt):
            nullable, first, last = False, set(), set()
            for option in expr.options:
                n, f, l_ = self.visit(option)
                nullable, first, last = nullable or n, first | f, last | l_
            return nullable, first, last
        if isinstance(expr, Repeat):
            if (expr.lo, expr.hi) == (0, None):
                _, f, l_ = self.visit(expr.body)
                for p in l_:
                    self.follow[p] |= f
                return True, f, l_
            if (expr.lo, expr.hi) == (0, 1):
                _, f, l_ = self.visit(expr.body)
                return True, f, l_
            # Unroll counts: lo copies, then (hi - lo) optional copies or a star.
            extra = [Repeat(expr.body, 0, None)] if expr.hi is None else [Repeat(expr.body, 0, 1)] * (expr.hi - expr.lo)
            return self.visit(Seq((*[expr.body] * expr.lo, *extra)))
        raise GrammarError("internal: rule reference inside a character-level expression")


def _product(expr: Expr, lo: int, hi: int | None, rules: RuleSet, spell: Callable[[CharSet], Expr], what: str) -> Expr:
    """One rule per reachable (position, characters so far); without `hi` the count saturates at lo."""
    automaton = _Glushkov(expr, what)
    start = -1

    def successors(state: int) -> set[int]:
        return automaton.first if state == start else automaton.follow[state]

    def accepting(state: int) -> bool:
        return automaton.nullable if state == start else state in automaton.last

    names: dict[tuple[int, int], str] = {}
    pending = [(start, 0)]
    names[(start, 0)] = rules.declare("len")
    bodies: dict[tuple[int, int], Expr] = {}
    while pending:
        state, count = pending.pop()
        options: list[Expr] = []
        if accepting(state) and count >= lo:
            options.append(EMPTY)
        if hi is None or count < hi:
            nxt = count + 1 if hi is not None else min(count + 1, lo)
            for p in sorted(successors(state)):
                key = (p, nxt)
                if key not in names:
                    if len(names) >= MAX_PRODUCT_RULES:
                        raise GrammarError(f"{what}: cannot enforce minLength/maxLength together with this pattern "
                                           "(the combination is too large)")
                    names[key] = rules.declare("len")
                    pending.append(key)
                options.append(seq(spell(automaton.classes[p]), Ref(names[key])))
        bodies[(state, count)] = alt(*options)
    for key, body in bodies.items():
        rules.define(names[key], body)
    return Ref(names[(start, 0)])


def bounded_length(
    expr: Expr, lo: int, hi: int | None, rules: RuleSet, spell: Callable[[CharSet], Expr], what: str
) -> Expr:
    """The spelled strings of character-level `expr` whose length (in characters) is within lo..hi."""
    simple = _tighten(expr, lo, hi)
    if simple is not None:
        return map_chars(simple, spell)
    return _product(expr, lo, hi, rules, spell, what)
