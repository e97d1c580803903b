"""Regular expressions to EBNF.

The pattern is parsed by Python's own `re` parser (`re._parser`, `sre_parse` before 3.11) rather than by
a parser of ours, so our grammar and the `re` module can never disagree about what a pattern means
syntactically. Semantics are those of `re.fullmatch(pattern, s, re.ASCII)`: `\\d \\w \\s` and
case-insensitive matching are ASCII (as in JSON Schema's ECMA-262 regexes), `.` excludes only `\\n`.

Supported: literals and escapes, `.`, classes (ranges, negation, `\\d \\w \\s` and their negations),
groups (capturing, non-capturing, named), alternation, quantifiers `* + ? {m} {m,} {m,n}` (lazy forms
are treated as greedy: same language), inline flags `i s x`, and the anchors `^ $ \\A \\Z` at the start
or end of a top-level alternative. Anything else (backreferences, lookaround, word boundaries,
possessive or atomic groups, conditionals, multiline mode) is a `GrammarError` naming the construct.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from .charset import ANY_CHAR, CharSet
from .ebnf_writer import EMPTY, Alt, Chars, Expr, Lit, Ref, Repeat, RuleSet, Seq, alt, chars, repeat, seq
from .errors import GrammarError

try:
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_MAXREPEAT = _sre_parse.MAXREPEAT

_DIGIT = CharSet.of(("0", "9"))
_SPACE = CharSet.of(*" \t\n\r\f\v")
_WORD = CharSet.of(("a", "z"), ("A", "Z"), ("0", "9"), "_")
_CATEGORIES = {
    "CATEGORY_DIGIT": _DIGIT,
    "CATEGORY_NOT_DIGIT": _DIGIT.complement(),
    "CATEGORY_SPACE": _SPACE,
    "CATEGORY_NOT_SPACE": _SPACE.complement(),
    "CATEGORY_WORD": _WORD,
    "CATEGORY_NOT_WORD": _WORD.complement(),
}
_UNSUPPORTED = {
    "GROUPREF": "backreference",
    "GROUPREF_EXISTS": "conditional group (?(...)...)",
    "POSSESSIVE_REPEAT": "possessive quantifier",
    "ATOMIC_GROUP": "atomic group (?>...)",
}
_LOWER = CharSet.of(("a", "z"))
_UPPER = CharSet.of(("A", "Z"))


def _fold_case(charset: CharSet) -> CharSet:
    """Add the other ASCII case of every ASCII letter (re.IGNORECASE under re.ASCII)."""
    lower = [(lo - 32, hi - 32) for lo, hi in (charset & _LOWER).ranges]
    upper = [(lo + 32, hi + 32) for lo, hi in (charset & _UPPER).ranges]
    return charset | CharSet.from_ranges(lower + upper)


def _flags_check(flags: int, pattern: str) -> None:
    if flags & re.MULTILINE:
        raise GrammarError(f"regex {pattern!r}: multiline mode (?m) is not supported")


class _Converter:
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def fail(self, what: str) -> GrammarError:
        return GrammarError(f"regex {self.pattern!r}: {what} is not supported")

    def charset(self, cs: CharSet, flags: int) -> CharSet:
        return _fold_case(cs) if flags & re.IGNORECASE else cs

    def klass(self, items: list, flags: int) -> CharSet:
        negate = False
        members = CharSet()
        for op, av in items:
            name = op.name
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                members |= CharSet.of(av)
            elif name == "RANGE":
                members |= CharSet.of(av)
            elif name == "CATEGORY":
                if av.name not in _CATEGORIES:
                    raise self.fail(f"class escape {av.name}")
                members |= _CATEGORIES[av.name]
            else:
                raise self.fail(f"class item {name}")
        members = self.charset(members, flags)
        return members.complement() if negate else members

    def items(self, items: list, flags: int) -> Expr:
        return seq(*(self.item(op, av, flags) for op, av in items))

    def item(self, op, av, flags: int) -> Expr:
        name = op.name
        if name == "LITERAL":
            return chars(self.charset(CharSet.of(av), flags))
        if name == "NOT_LITERAL":
            return chars(self.charset(CharSet.of(av), flags).complement())
        if name == "ANY":
            return chars(ANY_CHAR if flags & re.DOTALL else ANY_CHAR - CharSet.of("\n"))
        if name == "IN":
            return chars(self.klass(av, flags))
        if name == "BRANCH":
            return alt(*(self.items(list(branch), flags) for branch in av[1]))
        if name == "SUBPATTERN":
            _, add_flags, del_flags, body = av
            _flags_check(add_flags, self.pattern)
            return self.items(list(body), (flags | add_flags) & ~del_flags)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, body = av
            return repeat(self.items(list(body), flags), lo, None if hi == _MAXREPEAT else hi)
        if name in ("ASSERT", "ASSERT_NOT"):
            direction = "lookahead" if av[0] == 1 else "lookbehind"
            raise self.fail(("negative " if name == "ASSERT_NOT" else "") + direction)
        if name == "AT":
            if av.name in ("AT_BOUNDARY", "AT_NON_BOUNDARY"):
                raise self.fail("word boundary \\b / \\B")
            raise self.fail("an anchor (^, $) that is not at the start or end of the pattern")
        raise self.fail(_UNSUPPORTED.get(name, f"construct {name}"))


def _alternatives(items: list) -> list[list]:
    """Top-level alternatives: a lone BRANCH, possibly inside plain groups, splits into its branches."""
    if len(items) == 1:
        op, av = items[0]
        if op.name == "BRANCH":
            return [alternative for branch in av[1] for alternative in _alternatives(list(branch))]
        if op.name == "SUBPATTERN" and av[1] == 0 and av[2] == 0:
            return _alternatives(list(av[3]))
    return [items]


def _is_anchor(item, names: tuple[str, ...]) -> bool:
    op, av = item
    return op.name == "AT" and av.name in names


@lru_cache(maxsize=1024)
def parse_regex(pattern: str, *, search: bool = False) -> Expr:
    """The language of `pattern` over characters (code points), before any JSON spelling.

    With `search` (JSON Schema `pattern` semantics: the regex may match anywhere), an alternative not
    anchored at the start gets any characters before it, and likewise at the end. Without it the
    whole string must match (anchors at the ends are then no-ops).
    """
    try:
        re.compile(pattern)
        parsed = _sre_parse.parse(pattern, 0)
    except (re.error, OverflowError, RecursionError) as exc:
        raise GrammarError(f"invalid regex {pattern!r}: {exc}") from None
    flags = parsed.state.flags
    _flags_check(flags, pattern)
    conv = _Converter(pattern)
    anywhere = repeat(Chars(ANY_CHAR), 0, None)
    options = []
    for items in _alternatives(list(parsed)):
        start = end = 0
        while start < len(items) and _is_anchor(items[start], ("AT_BEGINNING", "AT_BEGINNING_STRING")):
            start += 1
        stop = len(items)
        while stop > start and _is_anchor(items[stop - 1], ("AT_END", "AT_END_STRING")):
            stop -= 1
            end += 1
        body = conv.items(items[start:stop], flags)
        if search:
            body = seq(anywhere if start == 0 else EMPTY, body, anywhere if end == 0 else EMPTY)
        options.append(body)
    return alt(*options)


def map_chars(expr: Expr, spell: Callable[[CharSet], Expr]) -> Expr:
    """Replace every character position by `spell(its set)` (e.g. its JSON spellings)."""
    if isinstance(expr, Lit):
        return seq(*(spell(CharSet.of(c)) for c in expr.text))
    if isinstance(expr, Chars):
        return spell(expr.charset)
    if isinstance(expr, Seq):
        return seq(*(map_chars(item, spell) for item in expr.items))
    if isinstance(expr, Alt):
        return alt(*(map_chars(option, spell) for option in expr.options))
    if isinstance(expr, Repeat):
        return repeat(map_chars(expr.body, spell), expr.lo, expr.hi)
    if isinstance(expr, Ref):
        raise GrammarError("internal: rule reference inside a character-level expression")
    return expr


def regex_to_ebnf(pattern: str) -> str:
    """EBNF (root rule `root`) for the strings `re.fullmatch(pattern, s, re.ASCII)` accepts."""
    return RuleSet().to_ebnf(parse_regex(pattern), f"regex {pattern!r}")
