"""EBNF (xgrammar's GBNF-style dialect) -> grammar AST.

The dialect is the contract between the front-ends (JSON schema, regex, structural tags) and the matcher:
rules `name ::= expr`, `|`, grouping, `* + ?`, `{m}`, `{m,}`, `{m,n}`, char classes with ranges, negation and
escapes, double-quoted string literals, `#` comments, and an optional trailing lookahead `(= expr)` per rule.
String literals and char classes are over Unicode code points; the matcher works on their UTF-8 bytes.
A rule's body may span lines; it ends where the next `name ::=` begins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import GrammarError


@dataclass(frozen=True, slots=True)
class Lit:
    """A byte string (UTF-8 of the literal); b"" is the empty string."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Chars:
    """One code point from sorted, merged inclusive ranges; `negated` means any valid code point outside them."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Ref:
    name: str


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple


@dataclass(frozen=True, slots=True)
class Alt:
    items: tuple


@dataclass(frozen=True, slots=True)
class Rep:
    """`item{lo,hi}`; hi None means unbounded."""

    item: object
    lo: int
    hi: int | None


@dataclass(frozen=True, slots=True)
class TagDispatch:
    """Free text until a trigger, then the paired rule must complete; then free text again (`loop`) or the end.

    `excludes` are strings that may not appear in the free text (so an enclosing end tag can stop the loop).
    """

    pairs: tuple[tuple[bytes, str], ...]
    loop: bool = True
    excludes: tuple[bytes, ...] = ()


@dataclass
class Grammar:
    """Rules by name, the root rule's name, and parsed (advisory) lookahead assertions."""

    rules: dict[str, object]
    root: str
    lookaheads: dict[str, object]

    def __str__(self) -> str:
        lines = []
        for name, expr in self.rules.items():
            la = f" (={_fmt(self.lookaheads[name])})" if name in self.lookaheads else ""
            lines.append(f"{name} ::= {_fmt(expr)}{la}")
        return "\n".join(lines) + "\n"


def _fmt_cp(cp: int, in_class: bool) -> str:
    ch = chr(cp)
    specials = '\\]-^"' if in_class else '\\"'
    if ch in specials:
        return "\\" + ch
    if cp < 0x20 or cp == 0x7F or 0xD800 <= cp <= 0xDFFF:
        return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"
    return ch


def _fmt(e) -> str:
    if isinstance(e, Lit):
        text = e.data.decode("utf-8", errors="surrogateescape")
        return '"' + "".join(_fmt_cp(ord(c), False) for c in text) + '"'
    if isinstance(e, Chars):
        body = "".join(_fmt_cp(a, True) + ("" if a == b else "-" + _fmt_cp(b, True)) for a, b in e.ranges)
        return "[" + ("^" if e.negated else "") + body + "]"
    if isinstance(e, Ref):
        return e.name
    if isinstance(e, Seq):
        return "(" + " ".join(_fmt(i) for i in e.items) + ")"
    if isinstance(e, Alt):
        return "(" + " | ".join(_fmt(i) for i in e.items) + ")"
    if isinstance(e, Rep):
        hi = "" if e.hi is None else str(e.hi)
        return f"{_fmt(e.item)}{{{e.lo},{hi}}}"
    pairs = ", ".join(f"({_fmt(Lit(t))}, {r})" for t, r in e.pairs)
    excl = ", ".join(_fmt(Lit(x)) for x in e.excludes)
    return f"TagDispatch({pairs}, loop_after_dispatch={str(e.loop).lower()}, excludes=({excl}))"


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_RULE_START = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*[ \t]*::=")
_INT = re.compile(r"[0-9]+")
_STRING = re.compile(r'"((?:[^"\\\n]|\\[^\n])*)"')
_SPACE = re.compile(r"(?:\s|#[^\n]*)*")
_SIMPLE_ESCAPES = {
    "n": 0x0A, "r": 0x0D, "t": 0x09, "f": 0x0C, "v": 0x0B, "0": 0x00, "b": 0x08, "a": 0x07, "e": 0x1B,
    "\\": 0x5C, '"': 0x22, "'": 0x27, "[": 0x5B, "]": 0x5D, "-": 0x2D, "^": 0x5E, "/": 0x2F, ".": 0x2E,
    "(": 0x28, ")": 0x29, "{": 0x7B, "}": 0x7D, "|": 0x7C, "*": 0x2A, "+": 0x2B, "?": 0x3F, "$": 0x24,
    " ": 0x20,
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
MAX_CODEPOINT = 0x10FFFF


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, msg: str, pos: int | None = None) -> GrammarError:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return GrammarError(f"EBNF syntax error at line {line}, column {col}: {msg}")

    def skip(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, s: str) -> None:
        self.skip()
        if not self.text.startswith(s, self.pos):
            got = self.peek() or "end of input"
            raise self.error(f"expected {s!r}, got {got!r}")
        self.pos += len(s)

    def parse(self) -> tuple[dict, dict, list[tuple[str, int]]]:
        rules: dict[str, object] = {}
        lookaheads: dict[str, object] = {}
        refs: list[tuple[str, int]] = []
        self.refs = refs
        self.skip()
        while self.pos < len(self.text):
            start = self.pos
            m = _NAME.match(self.text, self.pos)
            if not m:
                raise self.error(f"expected a rule name, got {self.peek()!r}")
            name = m.group()
            self.pos = m.end()
            self.expect("::=")
            if name in rules:
                raise self.error(f"rule {name!r} is defined twice", start)
            rules[name] = self.alternation()
            self.skip()
            if self.text.startswith("(=", self.pos):
                self.pos += 2
                lookaheads[name] = self.alternation()
                self.expect(")")
            self.skip()
        if not rules:
            raise self.error("the grammar has no rules")
        return rules, lookaheads, refs

    def alternation(self):
        items = [self.sequence()]
        while True:
            self.skip()
            if self.peek() != "|":
                break
            self.pos += 1
            items.append(self.sequence())
        return items[0] if len(items) == 1 else Alt(tuple(items))

    def at_sequence_end(self) -> bool:
        c = self.peek()
        if c in ("", "|", ")") or self.text.startswith("(=", self.pos):
            return True
        return _RULE_START.match(self.text, self.pos) is not None

    def sequence(self):
        items = []
        while True:
            self.skip()
            if self.at_sequence_end():
                break
            items.append(self.postfix())
        if not items:
            raise self.error("expected an expression")
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def postfix(self):
        e = self.primary()
        while True:
            c = self.peek()
            if c == "*":
                e, self.pos = Rep(e, 0, None), self.pos + 1
            elif c == "+":
                e, self.pos = Rep(e, 1, None), self.pos + 1
            elif c == "?":
                e, self.pos = Rep(e, 0, 1), self.pos + 1
            elif c == "{":
                start = self.pos
                self.pos += 1
                lo = self.integer()
                self.skip()
                hi: int | None = lo
                if self.peek() == ",":
                    self.pos += 1
                    self.skip()
                    hi = None if self.peek() == "}" else self.integer()
                self.expect("}")
                if hi is not None and hi < lo:
                    raise self.error(f"repetition upper bound {hi} is below lower bound {lo}", start)
                e = Rep(e, lo, hi)
            else:
                return e

    def integer(self) -> int:
        self.skip()
        m = _INT.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected an integer, got {self.peek() or 'end of input'!r}")
        self.pos = m.end()
        return int(m.group())

    def primary(self):
        c = self.peek()
        if c == '"':
            return self.string()
        if c == "[":
            return self.char_class()
        if c == "(":
            self.pos += 1
            e = self.alternation()
            self.expect(")")
            return e
        m = _NAME.match(self.text, self.pos)
        if m:
            if m.group() == "TagDispatch" and self.text.startswith("(", m.end()):
                self.pos = m.end()
                return self.tag_dispatch()
            self.refs.append((m.group(), self.pos))
            self.pos = m.end()
            return Ref(m.group())
        raise self.error(f"unexpected character {c!r}" if c else "unexpected end of input")

    def escape(self) -> int:
        """Reads the escape after a backslash (self.pos is past the backslash); returns a code point."""
        start = self.pos - 1
        c = self.peek()
        if c in _HEX_ESCAPES:
            n = _HEX_ESCAPES[c]
            digits = self.text[self.pos + 1 : self.pos + 1 + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} escape needs {n} hex digits", start)
            cp = int(digits, 16)
            if cp > MAX_CODEPOINT:
                raise self.error(f"code point {cp:#x} is out of range", start)
            self.pos += 1 + n
            return cp
        if c in _SIMPLE_ESCAPES:
            self.pos += 1
            return _SIMPLE_ESCAPES[c]
        raise self.error(f"unknown escape \\{c}" if c else "unterminated escape", start)

    def char(self, terminator: str) -> int:
        c = self.peek()
        if c == "":
            raise self.error(f"unterminated {'string literal' if terminator == chr(34) else 'character class'}")
        self.pos += 1
        if c == "\\":
            return self.escape()
        return ord(c)

    def string(self) -> Lit:
        start = self.pos
        m = _STRING.match(self.text, self.pos)
        if m is None:
            end = self.text.find("\n", start)
            self.pos = len(self.text) if end < 0 else end
            raise self.error("unterminated string literal", start)
        body = m.group(1)
        if "\\" in body:
            self.pos = start + 1
            out = []
            while self.pos < m.end() - 1:
                out.append(chr(self.char('"')))
            body = "".join(out)
        self.pos = m.end()
        try:
            return Lit(body.encode("utf-8"))
        except UnicodeEncodeError:
            raise self.error("string literal contains a surrogate code point", start) from None

    def char_class(self) -> Chars:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.peek() != "]":
            if self.peek() in ("", "\n"):
                raise self.error("unterminated character class", start)
            lo = self.char("]")
            hi = lo
            if self.peek() == "-" and self.text[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 1
                hi = self.char("]")
                if hi < lo:
                    raise self.error(f"character range is reversed: {chr(lo)!r}-{chr(hi)!r}", start)
            ranges.append((lo, hi))
        self.pos += 1
        if not ranges and not negated:
            raise self.error("empty character class matches nothing", start)
        return Chars(merge_ranges(ranges), negated)

    def tag_dispatch(self) -> TagDispatch:
        """`TagDispatch(("trigger", rule), ..., loop_after_dispatch=true, excludes=("s", ...))`."""
        start = self.pos
        self.expect("(")
        pairs, loop, excludes = [], True, []
        while True:
            self.skip()
            if self.peek() == ")":
                self.pos += 1
                break
            if self.peek() == "(":
                self.pos += 1
                self.skip()
                if self.peek() != '"':
                    raise self.error("expected a trigger string")
                trig = self.string().data
                self.expect(",")
                self.skip()
                m = _NAME.match(self.text, self.pos)
                if not m:
                    raise self.error("expected a rule name")
                self.refs.append((m.group(), self.pos))
                self.pos = m.end()
                self.expect(")")
                if not trig:
                    raise self.error("a TagDispatch trigger must be non-empty", start)
                pairs.append((trig, m.group()))
            else:
                m = _NAME.match(self.text, self.pos)
                key = m.group() if m else ""
                if key not in ("loop_after_dispatch", "excludes"):
                    raise self.error("expected (trigger, rule), loop_after_dispatch= or excludes=")
                self.pos = m.end()
                self.expect("=")
                self.skip()
                if key == "loop_after_dispatch":
                    m = re.compile(r"true|false").match(self.text, self.pos)
                    if not m:
                        raise self.error("expected true or false")
                    loop = m.group() == "true"
                    self.pos = m.end()
                else:
                    self.expect("(")
                    while True:
                        self.skip()
                        if self.peek() == ")":
                            self.pos += 1
                            break
                        excludes.append(self.string().data)
                        self.skip()
                        if self.peek() == ",":
                            self.pos += 1
            self.skip()
            if self.peek() == ",":
                self.pos += 1
        if not pairs:
            raise self.error("TagDispatch needs at least one (trigger, rule) pair", start)
        return TagDispatch(tuple(pairs), loop, tuple(x for x in excludes if x))


def merge_ranges(ranges) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def parse_ebnf(text: str, root_rule_name: str = "root") -> Grammar:
    """Parses EBNF text; raises GrammarError with line and column on bad syntax or undefined rules."""
    if not isinstance(text, str):
        raise GrammarError(f"EBNF grammar must be a string, got {type(text).__name__}")
    p = _Parser(text)
    rules, lookaheads, refs = p.parse()
    for name, pos in refs:
        if name not in rules:
            raise p.error(f"rule {name!r} is not defined", pos)
    if root_rule_name not in rules:
        raise GrammarError(f"the grammar has no root rule {root_rule_name!r}")
    return Grammar(rules, root_rule_name, lookaheads)
