"""The built-in "any JSON" grammar, and the JSON layout (whitespace and separators) shared with schemas.

Whitespace is always bounded: with `any_whitespace`, each slot between tokens takes at most
`max_whitespace` characters of `[ \\n\\r\\t]` (default `DEFAULT_MAX_WHITESPACE` = 20, enough for a
newline plus indentation nine levels deep at two spaces), so a model cannot run on in whitespace until
`max_tokens` (a common production failure). The bound is a counted repetition, so it costs nothing to
compile. Without `any_whitespace` the layout is exact, as `json.dumps(indent=..., separators=...)`
prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .charset import ANY_CHAR, CharSet
from .digit_ranges import integer_range
from .ebnf_writer import Expr, Ref, RuleSet, alt, chars, lit, opt, repeat, seq
from .errors import GrammarError
from .json_text import json_chars

DEFAULT_MAX_WHITESPACE = 20
_WHITESPACE = CharSet.of(*" \n\r\t")


@dataclass(frozen=True)
class JsonLayout:
    """Where whitespace may go between JSON tokens and what the separators are."""

    any_whitespace: bool = True
    max_whitespace: int = DEFAULT_MAX_WHITESPACE
    indent: int | None = None
    item_separator: str = ", "
    key_separator: str = ": "

    @staticmethod
    def create(
        any_whitespace: bool = True,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        max_whitespace_cnt: int | None = None,
    ) -> JsonLayout:
        """Validate options with xgrammar's meaning: `any_whitespace` ignores indent and separators;
        default separators are `(",", ": ")` with an indent and `(", ", ": ")` without."""
        if max_whitespace_cnt is None:
            max_whitespace_cnt = DEFAULT_MAX_WHITESPACE
        if isinstance(max_whitespace_cnt, bool) or not isinstance(max_whitespace_cnt, int) or max_whitespace_cnt < 1:
            raise GrammarError(f"max_whitespace_cnt must be a positive integer, got {max_whitespace_cnt!r}")
        if any_whitespace:
            return JsonLayout(True, max_whitespace_cnt)
        if indent is not None and (isinstance(indent, bool) or not isinstance(indent, int) or indent < 0):
            raise GrammarError(f"indent must be a non-negative integer or None, got {indent!r}")
        if separators is None:
            separators = (",", ": ") if indent is not None else (", ", ": ")
        if (
            not isinstance(separators, (tuple, list))
            or len(separators) != 2
            or not all(isinstance(s, str) for s in separators)
            or separators[0].strip() != ","
            or separators[1].strip() != ":"
            or any(c not in " \n\r\t,:" for c in "".join(separators))
        ):
            raise GrammarError(f"separators must be (item, key) like (', ', ': '), got {separators!r}")
        return JsonLayout(False, max_whitespace_cnt, indent, separators[0], separators[1])

    def flat(self) -> JsonLayout:
        """The layout for free-form JSON values, which have no fixed depth to indent to: one line, same
        separators."""
        if self.indent is None:
            return self
        return JsonLayout(False, self.max_whitespace, None, self.item_separator, self.key_separator)

    def _ws(self, rules: RuleSet) -> Expr:
        return rules.named("ws", lambda: repeat(chars(_WHITESPACE), 0, self.max_whitespace))

    def _newline(self, depth: int) -> str:
        return "" if self.indent is None else "\n" + " " * (self.indent * depth)

    def open(self, rules: RuleSet, bracket: str, depth: int) -> Expr:
        """An opening bracket and what precedes the first member (at nesting `depth` of the container)."""
        if self.any_whitespace:
            return seq(lit(bracket), self._ws(rules))
        return lit(bracket + self._newline(depth + 1))

    def close(self, rules: RuleSet, bracket: str, depth: int) -> Expr:
        if self.any_whitespace:
            return seq(self._ws(rules), lit(bracket))
        return lit(self._newline(depth) + bracket)

    def empty(self, rules: RuleSet, brackets: str) -> Expr:
        """An empty container."""
        if self.any_whitespace:
            return seq(lit(brackets[0]), self._ws(rules), lit(brackets[1]))
        return lit(brackets)

    def comma(self, rules: RuleSet, depth: int) -> Expr:
        """The separator between members of a container at nesting `depth`."""
        if self.any_whitespace:
            return seq(self._ws(rules), lit(","), self._ws(rules))
        return lit(self.item_separator + self._newline(depth + 1))

    def colon(self, rules: RuleSet) -> Expr:
        if self.any_whitespace:
            return seq(self._ws(rules), lit(":"), self._ws(rules))
        return lit(self.key_separator)


def json_string(rules: RuleSet) -> Ref:
    """Any JSON string, every valid spelling of its characters accepted."""
    return rules.named("json_string", lambda: seq(lit('"'), json_string_rest(rules)))


def json_char(rules: RuleSet) -> Ref:
    """One character of a JSON string, in any valid spelling."""
    return rules.named("json_char", lambda: json_chars(ANY_CHAR, canonical=False))


def json_string_rest(rules: RuleSet) -> Ref:
    """The rest of any JSON string after its opening quote."""
    return rules.named("json_string_rest", lambda: seq(repeat(json_char(rules), 0, None), lit('"')))


def json_integer(rules: RuleSet) -> Ref:
    """Any integer in canonical form (no fraction, exponent, leading zeros or negative zero)."""
    return rules.named("json_integer", lambda: integer_range(None, None))


def json_number(rules: RuleSet) -> Ref:
    """Any JSON number."""

    def build() -> Expr:
        digits = chars(CharSet.of(("0", "9")))
        return seq(
            opt(lit("-")),
            alt(lit("0"), seq(chars(CharSet.of(("1", "9"))), repeat(digits, 0, None))),
            opt(seq(lit("."), repeat(digits, 1, None))),
            opt(seq(chars(CharSet.of("e", "E")), opt(chars(CharSet.of("+", "-"))), repeat(digits, 1, None))),
        )

    return rules.named("json_number", build)


def json_value(rules: RuleSet, layout: JsonLayout) -> Ref:
    """Any JSON value under a depth-free layout (`layout.flat()`)."""

    def build() -> Expr:
        value = Ref("json_value")
        pair = seq(json_string(rules), layout.colon(rules), value)
        obj = alt(
            layout.empty(rules, "{}"),
            seq(layout.open(rules, "{", 0), pair, repeat(seq(layout.comma(rules, 0), pair), 0, None), layout.close(rules, "}", 0)),
        )
        arr = alt(
            layout.empty(rules, "[]"),
            seq(layout.open(rules, "[", 0), value, repeat(seq(layout.comma(rules, 0), value), 0, None), layout.close(rules, "]", 0)),
        )
        return alt(
            rules.named("json_object", lambda: obj),
            rules.named("json_array", lambda: arr),
            json_string(rules),
            json_number(rules),
            lit("true"),
            lit("false"),
            lit("null"),
        )

    return rules.named("json_value", build)


def builtin_json_ebnf(max_whitespace_cnt: int | None = None) -> str:
    """EBNF for any JSON object or array (xgrammar's built-in JSON grammar), whitespace bounded."""
    rules = RuleSet()
    json_value(rules, JsonLayout.create(max_whitespace_cnt=max_whitespace_cnt))
    return rules.to_ebnf(alt(Ref("json_object"), Ref("json_array")), "the built-in JSON grammar")
