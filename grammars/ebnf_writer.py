"""Expression trees for the EBNF the front-ends emit, and a rule set that renders them.

Front-ends build grammars as small immutable trees instead of concatenating strings so that
(a) identical sub-grammars become one rule (a body is hashed, and a rule's name is derived from its
body, so the same sub-schema yields the same rule text in every grammar: the core's cross-grammar cache
hits), (b) rules that can derive no string are pruned before emission (a recursive `$ref` without a
base case must not leave the matcher a dead end to walk into), and (c) the output is always in the one
dialect the core parses (xgrammar's GBNF style: `name ::= ...`, `|`, `( )`, `* + ?`, `{m}`, `{m,}`,
`{m,n}`, `[...]` classes, `"..."` literals).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields

from .charset import CharSet
from .errors import GrammarError


def _cached_hash(self) -> int:
    """Composite expressions are hashed again and again as dict keys (rule deduplication), and a
    frozen dataclass rehashes its whole subtree each time; compute each node's hash once."""
    cached = self.__dict__.get("_hash")
    if cached is None:
        cached = hash((type(self).__name__, *(getattr(self, f.name) for f in fields(self))))
        object.__setattr__(self, "_hash", cached)
    return cached


@dataclass(frozen=True)
class Lit:
    """A literal string (code points, not bytes)."""

    text: str


@dataclass(frozen=True)
class Chars:
    """One code point from a non-empty set."""

    charset: CharSet


@dataclass(frozen=True)
class Ref:
    """A reference to a named rule."""

    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple[Expr, ...]
    __hash__ = _cached_hash


@dataclass(frozen=True)
class Alt:
    """Alternatives; `Alt(())` is the empty language (nothing matches)."""

    options: tuple[Expr, ...]
    __hash__ = _cached_hash


@dataclass(frozen=True)
class Repeat:
    """`body` repeated lo..hi times (hi None = unbounded); kept as a counter, never unrolled."""

    body: Expr
    lo: int
    hi: int | None
    __hash__ = _cached_hash


Expr = Lit | Chars | Ref | Seq | Alt | Repeat

EMPTY = Lit("")
NOTHING = Alt(())


def lit(text: str) -> Expr:
    return Lit(text)


def chars(charset: CharSet) -> Expr:
    if not charset:
        return NOTHING
    single = charset.single()
    return Lit(chr(single)) if single is not None else Chars(charset)


def seq(*items: Expr) -> Expr:
    """Concatenation; flattens, merges adjacent literals, and is NOTHING if any part is."""
    out: list[Expr] = []
    for item in items:
        parts = item.items if isinstance(item, Seq) else (item,)
        for part in parts:
            if part == NOTHING:
                return NOTHING
            if isinstance(part, Lit):
                if not part.text:
                    continue
                if out and isinstance(out[-1], Lit):
                    out[-1] = Lit(out[-1].text + part.text)
                    continue
            out.append(part)
    if not out:
        return EMPTY
    return out[0] if len(out) == 1 else Seq(tuple(out))


def alt(*options: Expr) -> Expr:
    """Alternation; flattens, drops NOTHING and duplicates (first occurrence wins, order kept)."""
    out: list[Expr] = []
    seen: set[Expr] = set()
    for option in options:
        parts = option.options if isinstance(option, Alt) else (option,)
        for part in parts:
            if part not in seen:
                seen.add(part)
                out.append(part)
    return out[0] if len(out) == 1 else Alt(tuple(out))


def repeat(body: Expr, lo: int, hi: int | None) -> Expr:
    if hi is not None and hi < lo:
        return NOTHING
    if hi == 0 or body == EMPTY:
        return EMPTY
    if body == NOTHING:
        return EMPTY if lo == 0 else NOTHING
    if lo == hi == 1:
        return body
    return Repeat(body, lo, hi)


def opt(body: Expr) -> Expr:
    return repeat(body, 0, 1)


def _prune(expr: Expr, productive: set[str]) -> Expr:
    """Replace references to rules that derive nothing by NOTHING, simplifying upward."""
    if isinstance(expr, Ref):
        return expr if expr.name in productive else NOTHING
    if isinstance(expr, Seq):
        return seq(*(_prune(item, productive) for item in expr.items))
    if isinstance(expr, Alt):
        return alt(*(_prune(option, productive) for option in expr.options))
    if isinstance(expr, Repeat):
        return repeat(_prune(expr.body, productive), expr.lo, expr.hi)
    return expr


def _refs(expr: Expr) -> list[str]:
    if isinstance(expr, Ref):
        return [expr.name]
    if isinstance(expr, Seq):
        return [name for item in expr.items for name in _refs(item)]
    if isinstance(expr, Alt):
        return [name for option in expr.options for name in _refs(option)]
    if isinstance(expr, Repeat):
        return _refs(expr.body)
    return []


def _escape_char(cp: int, in_class: bool) -> str:
    special = '\\]-^[' if in_class else '\\"'
    c = chr(cp)
    if c in special:
        return "\\" + c
    if c == "\n":
        return "\\n"
    if c == "\r":
        return "\\r"
    if c == "\t":
        return "\\t"
    if cp < 0x20 or 0x7F <= cp < 0xA0 or not c.isprintable():
        return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"
    return c


def _render_class(charset: CharSet) -> str:
    negated = charset.complement()
    # Print whichever of the set and its complement is shorter; any-character prints as a full range.
    if negated and len(negated.ranges) < len(charset.ranges):
        body, prefix = negated, "^"
    else:
        body, prefix = charset, ""
    parts = []
    for lo, hi in body.ranges:
        if lo == hi:
            parts.append(_escape_char(lo, True))
        elif hi == lo + 1:
            parts.append(_escape_char(lo, True) + _escape_char(hi, True))
        else:
            parts.append(_escape_char(lo, True) + "-" + _escape_char(hi, True))
    return "[" + prefix + "".join(parts) + "]"


def render(expr: Expr) -> str:
    """Canonical text of an expression (a rule body)."""
    if isinstance(expr, Lit):
        return '"' + "".join(_escape_char(ord(c), False) for c in expr.text) + '"'
    if isinstance(expr, Chars):
        return _render_class(expr.charset)
    if isinstance(expr, Ref):
        return expr.name
    if isinstance(expr, Seq):
        return " ".join(f"({render(item)})" if isinstance(item, Alt) else render(item) for item in expr.items)
    if isinstance(expr, Alt):
        if not expr.options:
            raise GrammarError("internal: an empty alternation reached rendering")
        return " | ".join(render(option) for option in expr.options)
    body = render(expr.body)
    if isinstance(expr.body, (Seq, Alt, Repeat)):
        body = f"({body})"
    lo, hi = expr.lo, expr.hi
    if (lo, hi) == (0, None):
        return body + "*"
    if (lo, hi) == (1, None):
        return body + "+"
    if (lo, hi) == (0, 1):
        return body + "?"
    if hi is None:
        return f"{body}{{{lo},}}"
    if lo == hi:
        return f"{body}{{{lo}}}"
    return f"{body}{{{lo},{hi}}}"


class RuleSet:
    """Named rules under construction.

    `add` names a finished body by its content, so equal bodies share one rule. `declare`/`define` reserve
    a name first, for rules that refer to themselves (recursive `$ref`s).
    """

    def __init__(self) -> None:
        self._bodies: dict[str, Expr | None] = {}
        self._by_body: dict[Expr, str] = {}
        self._text: dict[str, str] = {}  # rendered bodies of content-named rules

    def add(self, prefix: str, body: Expr) -> Expr:
        """A reference to a rule with this body (reusing an existing one); trivial bodies are inlined."""
        if isinstance(body, (Lit, Chars, Ref)) or body == NOTHING:
            return body
        existing = self._by_body.get(body)
        if existing is not None:
            return Ref(existing)
        text = render(body)
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        for width in range(8, len(digest) + 1, 4):
            name = f"{prefix}_{digest[:width]}"
            if name not in self._bodies:
                break
        else:
            raise GrammarError("internal: rule name collision")
        self._bodies[name] = body
        self._by_body[body] = name
        self._text[name] = text
        return Ref(name)

    def named(self, name: str, build: Callable[[], Expr]) -> Ref:
        """A rule with a fixed, readable name (shared building blocks like `json_string`), built on
        first use only."""
        if name not in self._bodies:
            self._bodies[name] = None  # reserved while building, so recursive builders see it
            body = build()
            self._bodies[name] = body
            self._by_body.setdefault(body, name)
        return Ref(name)

    def declare(self, prefix: str) -> str:
        name = prefix
        suffix = 1
        while name in self._bodies:
            suffix += 1
            name = f"{prefix}_{suffix}"
        self._bodies[name] = None
        return name

    def define(self, name: str, body: Expr) -> None:
        self._bodies[name] = body

    def discard(self, name: str) -> None:
        del self._bodies[name]

    def to_ebnf(self, root: Expr, what: str) -> str:
        """Render `root ::= ...` and every rule it reaches, after pruning rules that derive nothing.

        `what` names the input in the error raised when the whole grammar matches nothing.
        """
        if "root" in self._bodies:
            raise GrammarError("internal: 'root' is reserved for the start rule")
        bodies = {name: body for name, body in self._bodies.items() if body is not None}
        reachable: list[str] = []
        seen: set[str] = set()
        queue = _refs(root)
        while queue:
            name = queue.pop()
            if name not in seen:
                seen.add(name)
                reachable.append(name)
                queue.extend(_refs(bodies[name]))
        productive: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name in reachable:
                if name not in productive and _derives(bodies[name], productive):
                    productive.add(name)
                    changed = True
        root = _prune(root, productive)
        if root == NOTHING:
            raise GrammarError(f"{what} matches no value at all")
        order = ["root"]
        lines = {"root": render(root)}
        queue = _refs(root)
        while queue:
            name = queue.pop(0)
            if name in lines:
                continue
            body = bodies[name]
            if all(ref in productive for ref in _refs(body)):
                lines[name] = self._text.get(name) or render(body)
            else:
                body = _prune(body, productive)
                lines[name] = render(body)
            order.append(name)
            queue.extend(_refs(body))
        return "".join(f"{name} ::= {lines[name]}\n" for name in order)


def _derives(expr: Expr, productive: set[str]) -> bool:
    """Whether `expr` derives some string, given which rules do."""
    if isinstance(expr, Ref):
        return expr.name in productive
    if isinstance(expr, Seq):
        return all(_derives(item, productive) for item in expr.items)
    if isinstance(expr, Alt):
        return any(_derives(option, productive) for option in expr.options)
    if isinstance(expr, Repeat):
        return expr.lo == 0 or _derives(expr.body, productive)
    return True
