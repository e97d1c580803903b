"""Numeric ranges and string formats, checked against Decimal arithmetic and the standard library's
own parsers (ipaddress, datetime, uuid) and jsonschema's format checkers."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grammars_frontend_testing import accepts, validator
from treadle.grammars.errors import GrammarError
from treadle.grammars.json_schema import json_schema_to_ebnf
from treadle.grammars.string_formats import FORMATS

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")

bounds = st.one_of(
    st.none(),
    st.integers(-2000, 2000),
    st.decimals(-300, 300, places=3, allow_nan=False, allow_infinity=False).map(lambda d: float(d)),
)


def numerals(low, high) -> st.SearchStrategy[str]:
    """Numerals near and between the bounds, in canonical and non-canonical spellings."""
    anchors = [Decimal(repr(b)) for b in (low, high) if b is not None] or [Decimal(0)]
    near = st.sampled_from(anchors).flatmap(lambda b: st.decimals(b - 3, b + 3, places=3))
    return st.one_of(
        near.map(lambda d: format(d, "f")),
        near.map(lambda d: format(d.quantize(Decimal(1)), "f")),
        st.integers(-5000, 5000).map(str),
        st.sampled_from(["-0", "0.0", "-0.0", "01", "1.", ".5", "1e2", "0.10", "-"]),
    )


@SETTINGS
@given(bounds, bounds, st.booleans(), st.booleans(), st.data())
def test_number_bounds_are_exact(low, high, low_excl, high_excl, data):
    schema = {"type": "number"}
    if low is not None:
        schema["exclusiveMinimum" if low_excl else "minimum"] = low
    if high is not None:
        schema["exclusiveMaximum" if high_excl else "maximum"] = high
    if low is not None and high is not None and (low > high or low == high and (low_excl or high_excl)):
        return
    ebnf = json_schema_to_ebnf(schema)
    lo, hi = (Decimal(repr(b)) if b is not None else None for b in (low, high))
    for _ in range(25):
        text = data.draw(numerals(low, high))
        canonical = DECIMAL.fullmatch(text) is not None and re.fullmatch(r"-0(\.0*)?", text) is None
        if lo is None and hi is None:
            # Unbounded numbers are any JSON number.
            expected = re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", text) is not None
        else:
            value = Decimal(text) if canonical else None
            expected = canonical and (lo is None or (value > lo if low_excl else value >= lo)) and (
                hi is None or (value < hi if high_excl else value <= hi)
            )
        assert accepts(ebnf, text) == expected, (schema, text)


@SETTINGS
@given(bounds, bounds, st.data())
def test_integer_bounds_are_exact(low, high, data):
    schema = {"type": "integer"}
    if low is not None:
        schema["minimum"] = low
    if high is not None:
        schema["maximum"] = high
    if low is not None and high is not None and math.ceil(low) > math.floor(high):
        with pytest.raises(GrammarError, match="matches no value"):
            json_schema_to_ebnf(schema)
        return
    ebnf = json_schema_to_ebnf(schema)
    for _ in range(25):
        text = data.draw(numerals(low, high))
        expected = INTEGER.fullmatch(text) is not None and text != "-0" and validator(schema).is_valid(int(text))
        assert accepts(ebnf, text) == expected, (schema, text)


def test_huge_bounds_stay_small():
    ebnf = json_schema_to_ebnf({"type": "integer", "minimum": -(10**40), "maximum": 10**60 + 7})
    assert len(ebnf) < 3000
    assert accepts(ebnf, str(10**60 + 7)) and not accepts(ebnf, str(10**60 + 8))
    assert accepts(ebnf, str(-(10**40))) and not accepts(ebnf, str(-(10**40) - 1))


FORMAT_EBNF = {name: json_schema_to_ebnf({"type": "string", "format": name}) for name in FORMATS}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_strings_generated_by_the_grammar_are_valid(name):
    """Every string of the format's language passes the reference checker."""
    check = validator({"format": name})

    def valid(text: str) -> bool:
        if name == "ipv6":  # jsonschema's ipv6 check is ipaddress; call it directly for the message
            try:
                return not ipaddress.IPv6Address(text).scope_id
            except ValueError:
                return False
        if name == "uri":  # no uri checker is installed; the scheme is the part urllib can confirm
            from urllib.parse import urlsplit

            return bool(urlsplit(text).scheme)
        return check.is_valid(text)

    @SETTINGS
    @given(st.from_regex(re.compile(FORMATS[name], re.ASCII), fullmatch=True))
    def run(text):
        assert valid(text), text
        assert accepts(FORMAT_EBNF[name], json.dumps(text))

    run()


VALID_FORMAT_VALUES = {
    "date": st.dates().map(lambda d: d.isoformat()),
    "date-time": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()).filter(
        lambda s: re.search(r"([+-]\d\d:\d\d|Z)$", s) is not None
    ),
    "time": st.times(timezones=st.timezones()).map(lambda t: t.isoformat()).filter(
        lambda s: re.search(r"^\d\d:\d\d:\d\d.*([+-]\d\d:\d\d)$", s) is not None
    ),
    "uuid": st.uuids().map(str),
    "ipv4": st.ip_addresses(v=4).map(str),
    "ipv6": st.one_of(
        st.ip_addresses(v=6).map(str), st.ip_addresses(v=6).map(lambda a: a.exploded), st.ip_addresses(v=6).map(lambda a: str(a).upper())
    ),
    "email": st.emails().filter(lambda e: re.fullmatch(FORMATS["email"], e, re.ASCII) is not None or "@[" in e),
}


@pytest.mark.parametrize("name", sorted(VALID_FORMAT_VALUES))
def test_independently_produced_format_values_are_accepted(name):
    @SETTINGS
    @given(VALID_FORMAT_VALUES[name])
    def run(text):
        if name == "email" and "@[" in text:
            return  # address literals other than IPv4 are outside the documented subset
        assert accepts(FORMAT_EBNF[name], json.dumps(text)), text

    run()


def test_calendar_and_leap_years():
    ebnf = FORMAT_EBNF["date"]
    for text, ok in [("2000-02-29", True), ("1900-02-29", False), ("2024-02-29", True), ("2023-02-29", False), ("2023-04-31", False), ("0000-01-01", False)]:
        assert accepts(ebnf, json.dumps(text)) == ok, text
