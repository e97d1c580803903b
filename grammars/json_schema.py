"""JSON Schema to EBNF.

Coverage: `type` (incl. arrays of types), `enum`/`const`, `properties`/
`required`/`additionalProperties`/`unevaluatedProperties`, `items`/`prefixItems` (and the draft-4
tuple form with `additionalItems`)/`unevaluatedItems`, `minItems`/`maxItems`, `anyOf`, `oneOf` (when
its branches are provably disjoint), `allOf` (merged, see schema_merge), local `$ref`/`$defs` incl.
recursion, `minLength`/`maxLength`/`pattern`/`format` (date, time, date-time, email, uuid, uri, ipv4,
ipv6), `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`. Any other assertion keyword (`not`,
`if`, `patternProperties`, `uniqueItems: true`, non-trivial `multipleOf`, ...) raises `GrammarError`
naming it and where it is: a constraint is never silently dropped. Annotations and unknown keywords are
ignored, as the spec says.

Deliberate narrowings (the grammar accepts a subset of the valid JSON texts, never more):
- properties appear in declared order, then additional properties; duplicate keys among additional
  properties are not prevented (no context-free grammar can); an additional key is never equal to a
  declared one;
- a schema without `type` is narrowed to the types its keywords imply (e.g. `properties` -> object),
  as xgrammar does; with none, any JSON value;
- numbers are in canonical form: integers without fraction/exponent/`-0`, bounded numbers without
  exponent; constrained strings use canonical character spellings (see json_text);
- `strict_mode` (xgrammar's meaning): when an object declares `properties` (or an array
  `prefixItems`) and says nothing about extra ones, extra ones are not allowed.
Whitespace and separators follow builtin.JsonLayout (bounded whitespace by default).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .builtin import JsonLayout, json_char, json_integer, json_number, json_string, json_string_rest, json_value
from .charset import ANY_CHAR, CharSet
from .digit_ranges import decimal_range, integer_range
from .ebnf_writer import EMPTY, NOTHING, Expr, Ref, RuleSet, alt, lit, repeat, seq
from .errors import GrammarError
from .json_text import json_chars, json_literal
from .length_bound import bounded_length
from .regex import map_chars, parse_regex
from .schema_merge import ANNOTATIONS, Schema, SchemaMerger, numeric_bounds, resolve_pointer, type_set, value_key
from .string_formats import FORMATS

_UNSUPPORTED = frozenset(
    {
        "not", "if", "then", "else", "contains", "minContains", "maxContains", "patternProperties",
        "propertyNames", "dependentRequired", "dependentSchemas", "dependencies", "$dynamicRef",
        "$recursiveRef",
    }
)
_KEYWORDS_BY_TYPE = {
    "object": ("properties", "required", "additionalProperties", "unevaluatedProperties", "minProperties",
               "maxProperties"),
    "array": ("items", "prefixItems", "additionalItems", "unevaluatedItems", "minItems", "maxItems", "uniqueItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}
_TYPE_ORDER = ("object", "array", "string", "integer", "number", "boolean", "null")
_MAX_NESTING = 100


def _load(schema: str | dict | type) -> Schema:
    if isinstance(schema, (bool, dict)):
        return schema
    if isinstance(schema, str):
        try:
            loaded = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"JSON schema is not valid JSON: {exc}") from None
        if not isinstance(loaded, (bool, dict)):
            raise GrammarError("JSON schema must be an object or a boolean")
        return loaded
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    raise GrammarError(f"JSON schema must be a str, dict or pydantic model class, got {type(schema).__name__}")


def _child(path: str, *tokens: str | int) -> str:
    return path + "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def _count(schema: dict[str, Any], key: str, path: str) -> int | None:
    if key not in schema:
        return None
    v = schema[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GrammarError(f"'{key}' at {path} must be a non-negative integer, got {v!r}")
    return v


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass
class _BranchFacts:
    types: set[str] | None  # None: any type
    values: set[str] | None  # enum/const value keys; None: not an enumeration
    required_values: dict[str, set[str] | None]  # required property -> its enum/const values
    forbids: Callable[[str], bool]


def _values(schema: dict[str, Any]) -> set[str] | None:
    if "const" in schema:
        return {value_key(schema["const"])}
    if "enum" in schema and isinstance(schema["enum"], list):
        return {value_key(v) for v in schema["enum"]}
    return None


def _types(schema: dict[str, Any], path: str) -> set[str] | None:
    types = type_set(schema, path)
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list):
        from_values = {_json_type(v) for v in values}
        if "integer" in from_values:
            from_values.add("number")
        types = from_values if types is None else types & from_values
    return types


def _disjoint(a: _BranchFacts | None, b: _BranchFacts | None) -> bool:
    if a is None or b is None:
        return False
    if a.types is not None and b.types is not None:
        overlap = a.types & b.types
        if "integer" in a.types and "number" in b.types or "number" in a.types and "integer" in b.types:
            overlap.add("integer")
        if not overlap:
            return True
    if a.values is not None and b.values is not None and not a.values & b.values:
        return True
    if a.types == {"object"} and b.types == {"object"}:
        if any(b.forbids(n) for n in a.required_values) or any(a.forbids(n) for n in b.required_values):
            return True
        for name in a.required_values.keys() & b.required_values.keys():
            va, vb = a.required_values[name], b.required_values[name]
            if va is not None and vb is not None and not va & vb:
                return True
    return False


def _string_trie(strings: list[str]) -> Expr:
    """Alternatives of string bodies, left-factored on shared prefixes (an enum of hundreds of values
    becomes a trie, so a matcher never keeps hundreds of parallel items alive)."""
    groups: dict[str, list[str]] = {}
    for text in strings:
        if text:
            groups.setdefault(text[0], []).append(text[1:])
    options = [EMPTY] if "" in strings else []
    for first, rests in groups.items():
        # Recurse only at branch points, so the depth is bounded by the number of strings.
        shared = os.path.commonprefix(rests)
        options.append(seq(json_literal(first + shared), _string_trie([r[len(shared) :] for r in rests])))
    return alt(*options)


class _Converter:
    def __init__(self, document: Schema, layout: JsonLayout, strict_mode: bool) -> None:
        self.document = document
        self.layout = layout
        self.strict = strict_mode
        self.rules = RuleSet()
        self.merger = SchemaMerger(document)
        self.refs_in_progress: dict[tuple[str, int], str] = {}
        self.refs_done: dict[tuple[str, int], Expr] = {}
        self.self_referenced: set[str] = set()
        self.nesting = 0

    def convert(self) -> str:
        return self.rules.to_ebnf(self.value(self.document, "#", 0), "the JSON schema")

    # --- dispatch ---------------------------------------------------------------------------------

    def value(self, schema: Schema, path: str, depth: int) -> Expr:
        """The grammar of JSON values valid under `schema`, written at nesting `depth`."""
        if schema is True:
            return json_value(self.rules, self.layout.flat())
        if schema is False:
            return NOTHING
        if not isinstance(schema, dict):
            raise GrammarError(f"schema at {path} must be an object or a boolean")
        self.nesting += 1
        try:
            if self.nesting > _MAX_NESTING:
                raise GrammarError(f"schema at {path} is nested more than {_MAX_NESTING} levels deep")
            for key in schema:
                if key in _UNSUPPORTED:
                    raise GrammarError(f"JSON Schema keyword '{key}' at {path} is not supported")
            if "$ref" in schema and all(k == "$ref" or k in ANNOTATIONS for k in schema):
                return self.ref(schema["$ref"], depth)
            if "$ref" in schema or "allOf" in schema:
                return self.value(self.merger.flatten(schema, path), path, depth)
            if "anyOf" in schema or "oneOf" in schema:
                return self.union(schema, path, depth)
            if "enum" in schema or "const" in schema:
                return self.rules.add("enum", self.enum(schema, path, depth))
            return self.typed(schema, path, depth)
        finally:
            self.nesting -= 1

    def ref(self, ref: str, depth: int) -> Expr:
        """A `$ref`: converted once per layout depth; a named rule only when it is recursive."""
        key = (ref, depth if self.layout.indent is not None else 0)
        if key in self.refs_done:
            return self.refs_done[key]
        if key in self.refs_in_progress:
            name = self.refs_in_progress[key]
            self.self_referenced.add(name)
            return Ref(name)
        if self.layout.indent is not None and any(r == ref for r, _ in self.refs_in_progress):
            raise GrammarError(f"recursive $ref {ref!r} cannot be laid out with a fixed indent")
        target = resolve_pointer(self.document, ref)
        label = ref.rsplit("/", 1)[-1].lstrip("#") or "root"
        name = self.rules.declare("def_" + re.sub(r"[^A-Za-z0-9_]", "_", label))
        self.refs_in_progress[key] = name
        try:
            body = self.value(target, ref, depth)
        finally:
            del self.refs_in_progress[key]
        if name in self.self_referenced:
            self.rules.define(name, body)
            result: Expr = Ref(name)
        else:
            self.rules.discard(name)
            result = body
        self.refs_done[key] = result
        return result

    def union(self, schema: dict[str, Any], path: str, depth: int) -> Expr:
        """anyOf / oneOf, with sibling keywords distributed into every branch."""
        siblings = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        constrained = any(k not in ANNOTATIONS for k in siblings)

        def branches(key: str) -> list[Schema]:
            listed = schema.get(key)
            if listed is None:
                return [True]
            if not isinstance(listed, list) or not listed:
                raise GrammarError(f"'{key}' at {path} must be a non-empty array")
            return listed

        any_of, one_of = branches("anyOf"), branches("oneOf")
        if "oneOf" in schema:
            self.check_disjoint(one_of, siblings if constrained else True, path)
        options = []
        for i, a in enumerate(any_of):
            for j, o in enumerate(one_of):
                parts = [part for part in ((siblings if constrained else True), a, o) if part is not True]
                branch: Schema = True if not parts else parts[0] if len(parts) == 1 else {"allOf": parts}
                label = _child(path, *(("anyOf", i) if "anyOf" in schema else ()), *(("oneOf", j) if "oneOf" in schema else ()))
                options.append(self.value(branch, label, depth))
        return self.rules.add("union", alt(*options))

    # --- oneOf ------------------------------------------------------------------------------------

    def check_disjoint(self, branches: list[Schema], siblings: Schema, path: str) -> None:
        """oneOf means exactly one branch matches; as a grammar it is an alternation, which is only the
        same thing when no value matches two branches. Prove that (by types, enum/const values, or a
        required property one branch forbids or fixes differently) or refuse."""
        facts = [
            self.branch_facts(self.merger.flatten(b if siblings is True else {"allOf": [siblings, b]}, _child(path, "oneOf", i)), path)
            for i, b in enumerate(branches)
        ]
        for i in range(len(facts)):
            for j in range(i + 1, len(facts)):
                if not _disjoint(facts[i], facts[j]):
                    raise GrammarError(
                        f"oneOf at {path}: branches {i} and {j} may both match the same value, so "
                        "'exactly one' cannot be enforced; use anyOf if overlap is acceptable"
                    )

    def branch_facts(self, schema: Schema, path: str) -> _BranchFacts | None:
        """What the disjointness proof needs from one flattened branch (None: the branch is `true`)."""
        if schema is True:
            return None
        if schema is False:
            return _BranchFacts(set(), set(), {}, lambda name: True)
        types = _types(schema, path)
        props = schema.get("properties", {})
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        fixed = {}
        for name in required:
            sub = props.get(name)
            flat = self.merger.flatten(sub, path) if isinstance(sub, dict) else None
            fixed[name] = _values(flat) if isinstance(flat, dict) else None
        extra = schema.get("additionalProperties", schema.get("unevaluatedProperties"))
        if extra is None:
            extra = not (self.strict and "properties" in schema)

        def forbids(name: str) -> bool:
            return props[name] is False if name in props else extra is False

        return _BranchFacts(types, _values(schema), fixed, forbids)

    # --- enum / const -----------------------------------------------------------------------------

    def enum(self, schema: dict[str, Any], path: str, depth: int) -> Expr:
        if "enum" in schema and not isinstance(schema["enum"], list):
            raise GrammarError(f"'enum' at {path} must be an array")
        values = list(schema.get("enum", [schema.get("const")]))
        if "const" in schema:
            values = [v for v in values if value_key(v) == value_key(schema["const"])]
        types = type_set(schema, path)
        kept = []
        seen = set()
        for v in values:
            key = value_key(v)
            if key not in seen and self.satisfies(v, schema, types, path):
                seen.add(key)
                kept.append(v)
        strings = [v for v in kept if isinstance(v, str)]
        others = [self.literal(v, path, depth) for v in kept if not isinstance(v, str)]
        if len(strings) < 2:
            return alt(*(self.literal(v, path, depth) for v in kept))
        return alt(seq(lit('"'), _string_trie(strings), lit('"')), *others)

    def satisfies(self, v: Any, schema: dict[str, Any], types: set[str] | None, path: str) -> bool:
        """Whether an enum/const value also meets the sibling keywords that apply to its type."""
        kind = _json_type(v)
        if types is not None and kind not in types and not (kind == "integer" and "number" in types):
            return False
        family = {"integer": "number", "number": "number"}.get(kind, kind)
        for key in _KEYWORDS_BY_TYPE.get(family, ()):
            if key not in schema:
                continue
            if family in ("object", "array"):
                raise GrammarError(f"enum/const at {path} together with '{key}' is not supported")
        if family == "string":
            min_len, max_len = _count(schema, "minLength", path) or 0, _count(schema, "maxLength", path)
            if len(v) < min_len or max_len is not None and len(v) > max_len:
                return False
            if "pattern" in schema and not re.search(schema["pattern"], v, re.ASCII):
                return False
            if "format" in schema:
                if schema["format"] not in FORMATS:
                    raise GrammarError(f"string format {schema['format']!r} at {path} is not supported")
                if not re.fullmatch(FORMATS[schema["format"]], v, re.ASCII):
                    return False
        if family == "number":
            d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
            low, low_excl, high, high_excl = numeric_bounds(schema, path)
            if low is not None and (d < low or low_excl and d == low):
                return False
            if high is not None and (d > high or high_excl and d == high):
                return False
            if "multipleOf" in schema and d % self._multiple_of(schema, path) != 0:
                return False
        return True

    def literal(self, v: Any, path: str, depth: int) -> Expr:
        """One JSON value, exactly (object keys in the given order)."""
        if v is None or isinstance(v, bool):
            return lit(json.dumps(v))
        if isinstance(v, int):
            return lit(str(v))
        if isinstance(v, float):
            if not math.isfinite(v):
                raise GrammarError(f"enum/const at {path} contains a non-finite number")
            return alt(lit(str(int(v))), lit(json.dumps(v))) if v.is_integer() else lit(json.dumps(v))
        if isinstance(v, str):
            return seq(lit('"'), json_literal(v), lit('"'))
        layout, rules = self.layout, self.rules
        if isinstance(v, list):
            if not v:
                return layout.empty(rules, "[]")
            members = [self.literal(x, path, depth + 1) for x in v]
            brackets = "[]"
        elif isinstance(v, dict):
            if not v:
                return layout.empty(rules, "{}")
            members = [
                seq(lit('"'), json_literal(k), lit('"'), layout.colon(rules), self.literal(x, path, depth + 1))
                for k, x in v.items()
            ]
            brackets = "{}"
        else:
            raise GrammarError(f"enum/const at {path} contains a non-JSON value {v!r}")
        body: list[Expr] = [layout.open(rules, brackets[0], depth), members[0]]
        for member in members[1:]:
            body += [layout.comma(rules, depth), member]
        return seq(*body, layout.close(rules, brackets[1], depth))

    # --- typed values -----------------------------------------------------------------------------

    def typed(self, schema: dict[str, Any], path: str, depth: int) -> Expr:
        types = type_set(schema, path)
        if types is None:
            implied = {t for t, keys in _KEYWORDS_BY_TYPE.items() if any(k in schema for k in keys)}
            if not implied:
                return json_value(self.rules, self.layout.flat())
            types = implied
        if "number" in types:
            types.discard("integer")
        options = []
        for kind in _TYPE_ORDER:
            if kind not in types:
                continue
            if kind == "null":
                options.append(lit("null"))
            elif kind == "boolean":
                options.append(alt(lit("true"), lit("false")))
            elif kind == "integer":
                options.append(self.integer(schema, path))
            elif kind == "number":
                options.append(self.number(schema, path))
            elif kind == "string":
                options.append(self.string(schema, path))
            elif kind == "array":
                options.append(self.array(schema, path, depth))
            else:
                options.append(self.object(schema, path, depth))
        return self.rules.add("value", alt(*options))

    def _multiple_of(self, schema: dict[str, Any], path: str) -> Decimal:
        m = schema["multipleOf"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise GrammarError(f"'multipleOf' at {path} must be a positive number")
        return Decimal(repr(m)) if isinstance(m, float) else Decimal(m)

    def integer(self, schema: dict[str, Any], path: str) -> Expr:
        if "multipleOf" in schema and (1 / self._multiple_of(schema, path)) % 1 != 0:
            raise GrammarError(f"'multipleOf' {schema['multipleOf']!r} at {path} is not supported")
        low, low_excl, high, high_excl = numeric_bounds(schema, path)
        lo = None if low is None else (math.floor(low) + 1 if low_excl else math.ceil(low))
        hi = None if high is None else (math.ceil(high) - 1 if high_excl else math.floor(high))
        if lo is None and hi is None:
            return json_integer(self.rules)
        return self.rules.add("int", integer_range(lo, hi))

    def number(self, schema: dict[str, Any], path: str) -> Expr:
        if "multipleOf" in schema:
            raise GrammarError(f"'multipleOf' at {path} is not supported for type number")
        low, low_excl, high, high_excl = numeric_bounds(schema, path)
        if low is None and high is None:
            return json_number(self.rules)
        return self.rules.add("num", decimal_range(low, low_excl, high, high_excl))

    def string(self, schema: dict[str, Any], path: str) -> Expr:
        min_len = _count(schema, "minLength", path) or 0
        max_len = _count(schema, "maxLength", path)
        pattern, fmt = schema.get("pattern"), schema.get("format")
        if pattern is not None and fmt is not None:
            raise GrammarError(f"string at {path}: 'pattern' together with 'format' is not supported")
        if fmt is not None and fmt not in FORMATS:
            raise GrammarError(f"string format {fmt!r} at {path} is not supported")
        if pattern is not None and not isinstance(pattern, str):
            raise GrammarError(f"'pattern' at {path} must be a string")
        if fmt is None and pattern is None:
            if min_len == 0 and max_len is None:
                return json_string(self.rules)
            return self.rules.add("str", seq(lit('"'), repeat(json_char(self.rules), min_len, max_len), lit('"')))
        text = parse_regex(FORMATS[fmt]) if fmt is not None else parse_regex(pattern, search=True)

        def spell(cs: CharSet) -> Expr:
            return self.rules.add("char", json_chars(cs, canonical=True))

        if min_len or max_len is not None:
            body = bounded_length(text, min_len, max_len, self.rules, spell, f"string at {path}")
        else:
            body = map_chars(text, spell)
        return self.rules.add("str", seq(lit('"'), body, lit('"')))

    def array(self, schema: dict[str, Any], path: str, depth: int) -> Expr:
        items = schema.get("items")
        if isinstance(items, list):
            prefix, rest, rest_key = items, schema.get("additionalItems"), "additionalItems"
        else:
            prefix, rest, rest_key = schema.get("prefixItems", []), items, "items"
        if not isinstance(prefix, list):
            raise GrammarError(f"'prefixItems' at {path} must be an array")
        if rest is None and "unevaluatedItems" in schema:
            rest, rest_key = schema["unevaluatedItems"], "unevaluatedItems"
        if rest is None:
            rest = not (self.strict and prefix)
        lo = _count(schema, "minItems", path) or 0
        hi = _count(schema, "maxItems", path)
        if schema.get("uniqueItems") is True and (hi is None or hi > 1):
            raise GrammarError(f"'uniqueItems' at {path} is not supported")
        k = len(prefix)
        elements = [self.value(p, _child(path, "prefixItems", i), depth + 1) for i, p in enumerate(prefix)]
        rest_value = self.value(rest, _child(path, rest_key), depth + 1)
        if rest_value == NOTHING:
            hi = k if hi is None else min(hi, k)
        if hi is not None and lo > hi:
            return NOTHING
        rules, layout = self.rules, self.layout
        comma = layout.comma(rules, depth)
        # tails[i]: the rest of the array once i elements are written (i >= 1).
        extra_lo = max(0, lo - max(k, 1))
        extra_hi = None if hi is None else hi - max(k, 1)
        tail = rules.add("items", repeat(seq(comma, rest_value), extra_lo, extra_hi)) if extra_hi is None or extra_hi >= 0 else NOTHING
        for i in range(k - 1, 0, -1):
            if hi is not None and i >= hi:
                tail = EMPTY if i >= lo else NOTHING
                continue
            tail = rules.add("items", alt(*([EMPTY] if i >= lo else []), seq(comma, elements[i], tail)))
        first = elements[0] if k else rest_value
        options = []
        if lo == 0:
            options.append(layout.empty(rules, "[]"))
        if hi is None or hi >= 1:
            options.append(seq(layout.open(rules, "[", depth), first, tail, layout.close(rules, "]", depth)))
        return rules.add("array", alt(*options))

    def object(self, schema: dict[str, Any], path: str, depth: int) -> Expr:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise GrammarError(f"'properties' at {path} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError(f"'required' at {path} must be an array of strings")
        extra: Schema | None = schema.get("additionalProperties", schema.get("unevaluatedProperties"))
        extra_explicit = extra is not None
        if extra is None:
            extra = not (self.strict and "properties" in schema)
        names = list(props) + [r for r in dict.fromkeys(required) if r not in props]
        rules, layout = self.rules, self.layout
        colon, comma = layout.colon(rules), layout.comma(rules, depth)
        entries: list[tuple[Expr, bool]] = []
        for name in names:
            if name in props:
                value_schema = props[name]
            else:
                # A required name without a schema: under strict mode's implicit `false` it still
                # counts as specified, so it may appear with any value.
                value_schema = extra if extra_explicit else True
            value = self.value(value_schema, _child(path, "properties", name), depth + 1)
            is_required = name in required
            if value == NOTHING:
                if is_required:
                    return NOTHING
                continue
            entries.append((seq(lit('"'), json_literal(name), lit('"'), colon, value), is_required))
        extra_value = self.value(extra, _child(path, "additionalProperties"), depth + 1)
        extra_pair = NOTHING if extra_value == NOTHING else seq(self.other_key(names), colon, extra_value)
        self.check_property_counts(schema, path, entries, extra_pair)
        # after[i]: the rest once some entry is written, from property i on; first[i]: same, none yet.
        after = rules.add("props", repeat(seq(comma, extra_pair), 0, None))
        first = rules.add("props", seq(extra_pair, after))
        for pair, is_required in reversed(entries):
            with_pair = seq(comma, pair, after)
            first_pair = seq(pair, after)
            if is_required:
                after, first = rules.add("props", with_pair), rules.add("props", first_pair)
            else:
                after, first = rules.add("props", alt(with_pair, after)), rules.add("props", alt(first_pair, first))
        options = []
        if not any(is_required for _, is_required in entries):
            options.append(layout.empty(rules, "{}"))
        options.append(seq(layout.open(rules, "{", depth), first, layout.close(rules, "}", depth)))
        return rules.add("object", alt(*options))

    @staticmethod
    def check_property_counts(schema: dict[str, Any], path: str, entries: list[tuple[Expr, bool]], extra: Expr) -> None:
        """min/maxProperties are accepted only when the other keywords already imply them."""
        fewest = sum(1 for _, is_required in entries if is_required)
        most = None if extra != NOTHING else len(entries)
        low = _count(schema, "minProperties", path)
        high = _count(schema, "maxProperties", path)
        if low is not None and low > fewest:
            raise GrammarError(f"'minProperties' at {path} is not supported (not implied by 'required')")
        if high is not None and (most is None or most > high):
            raise GrammarError(f"'maxProperties' at {path} is not supported (not implied by 'properties')")

    def other_key(self, names: list[str]) -> Expr:
        """A JSON string key equal to none of `names`, in any spelling: a trie over the names whose
        every node may also leave the trie (then any rest) or close the string (if not a name)."""
        rules = self.rules
        if not names:
            return json_string(rules)
        rest = json_string_rest(rules)
        prefixes = sorted({n[:i] for n in names for i in range(len(n) + 1)}, key=len, reverse=True)
        nodes: dict[str, Expr] = {}
        for p in prefixes:
            children = sorted({n[len(p)] for n in names if len(n) > len(p) and n.startswith(p)})
            options: list[Expr] = [] if p in names else [lit('"')]
            for c in children:
                options.append(seq(json_chars(CharSet.of(c), canonical=False), nodes[p + c]))
            others = ANY_CHAR - CharSet.of(*children)
            options.append(seq(rules.add("char", json_chars(others, canonical=False)), rest))
            nodes[p] = rules.add("key", alt(*options))
        return seq(lit('"'), nodes[""])


def json_schema_to_ebnf(
    schema: str | dict | type,
    *,
    any_whitespace: bool = True,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    strict_mode: bool = True,
    max_whitespace_cnt: int | None = None,
) -> str:
    """EBNF (root rule `root`) for the JSON texts valid under `schema` (a JSON string, a dict or a
    pydantic model class). Raises GrammarError for invalid or unsupported schemas."""
    document = _load(schema)
    layout = JsonLayout.create(any_whitespace, indent, separators, max_whitespace_cnt)
    try:
        return _Converter(document, layout, strict_mode).convert()
    except RecursionError:
        raise GrammarError("JSON schema is nested too deeply") from None
