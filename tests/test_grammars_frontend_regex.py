"""Regex front-end: a string is accepted iff `re.fullmatch(pattern, s, re.ASCII)` matches it."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grammars_frontend_testing import accepts, byte_grammar
from treadle.grammars.errors import GrammarError
from treadle.grammars.regex import regex_to_ebnf

PATTERNS = [
    r"^a[^b-d\d]x*?(?:y|z){2,5}\.$",
    r"(?i)ab[c-e]Z",
    r"(?s:.)+",
    r"\w+@\w+\.(com|org)",
    r"[\s\S]{0,3}",
    r"(a|bc)*d?",
    r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?",
    r'[^"\\]*',
    r"a{3}b{2,}c{,2}",
    r"x|",
    r"\D\W\S",
    r"(?P<year>\d{4})-\d\d",
    r"(?x) a b  # verbose",
    r"((ab)+|c){2}",
]


def alphabet(pattern: str) -> str:
    """Characters worth trying: those in the pattern, plus a few outsiders."""
    return "".join(sorted(set(pattern) - set("\\^$()[]{}?*+|"))) + "09aZ _\n-é"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_accepts_exactly_what_re_fullmatch_accepts(pattern):
    ebnf = regex_to_ebnf(pattern)
    compiled = re.compile(pattern, re.ASCII)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(st.from_regex(compiled, fullmatch=True), st.text(alphabet(pattern), max_size=10)))
    def run(text):
        assert accepts(ebnf, text) == (compiled.fullmatch(text) is not None), text

    run()


def test_anchors_at_the_ends_are_no_ops_and_alternatives_split():
    assert regex_to_ebnf(r"^abc$") == regex_to_ebnf("abc")
    ebnf = regex_to_ebnf(r"^a|b$|(^c$)")
    assert all(accepts(ebnf, s) for s in "abc") and not accepts(ebnf, "ab")


def test_non_ascii_classes_and_empty_language():
    # (Hypothesis' from_regex trips over non-ASCII ranges, so these are checked by hand.)
    ebnf = regex_to_ebnf("😀+|[\u00e0-\u00ff]+\t|[^a-zé]")
    for text in ["😀😀", "àÿ\t", "A", "ß", "😁"]:
        assert accepts(ebnf, text) == (re.fullmatch("😀+|[\u00e0-\u00ff]+\t|[^a-zé]", text) is not None), text
    with pytest.raises(GrammarError, match="matches no value"):
        regex_to_ebnf(r"[^\s\S]")


@pytest.mark.parametrize(
    "pattern,message",
    [
        (r"(a)\1", "backreference"),
        (r"(?=a)b", "lookahead"),
        (r"(?<!a)b", "negative lookbehind"),
        (r"\bword", "word boundary"),
        (r"a*+", "possessive"),
        (r"(?>ab)", "atomic group"),
        (r"(?m)^a", "multiline"),
        (r"a^b", "anchor"),
        (r"(a)?(?(1)b|c)", "conditional"),
        (r"[", "invalid regex"),
    ],
)
def test_unsupported_constructs_are_named(pattern, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        regex_to_ebnf(pattern)


def test_large_counts_stay_counters():
    ebnf = regex_to_ebnf(r"[a-z]{2,5000}")
    assert "{2,5000}" in ebnf
    byte_grammar(ebnf)
