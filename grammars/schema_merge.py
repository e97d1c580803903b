"""`$ref` resolution and `allOf` intersection for JSON schemas.

The converter emits one grammar per schema node, so `allOf` (and `$ref` with sibling keywords, which
2019-09+ treat as a conjunction) must first become a single equivalent schema. Merging is exact or it
raises: keywords with a known intersection (types, bounds, enums, properties with their
`additionalProperties` fall-through, items, required, unions by distribution) are combined; two
different values of a keyword with no grammar-level intersection (two `pattern`s, two `format`s) are a
`GrammarError` naming the keyword, never a silently dropped branch.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from .errors import GrammarError

Schema = bool | dict[str, Any]

# Keywords that never constrain an instance.
ANNOTATIONS = frozenset(
    {
        "title", "description", "examples", "example", "default", "$schema", "$id", "$anchor",
        "$dynamicAnchor", "$comment", "$vocabulary", "deprecated", "readOnly", "writeOnly",
        "contentMediaType", "contentEncoding", "contentSchema", "$defs", "definitions", "discriminator",
        "externalDocs", "xml",
    }
)

NUMBER_TYPES = ("integer", "number")


def _normalize_value(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return ["#number", str(Decimal(repr(v) if isinstance(v, float) else v).normalize())]
    if isinstance(v, list):
        return [_normalize_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalize_value(x) for k, x in v.items()}
    raise GrammarError(f"not a JSON value: {v!r}")


def value_key(value: Any) -> str:
    """A key under which JSON-equal values collide (1 == 1.0, but true != 1), for enum sets."""
    return json.dumps(_normalize_value(value), sort_keys=True)


def resolve_pointer(document: Schema, ref: str) -> Schema:
    """The schema a local `$ref` ("#", "#/$defs/x", JSON-pointer escapes) points to."""
    if not isinstance(ref, str):
        raise GrammarError(f"$ref must be a string, got {ref!r}")
    if not ref.startswith("#"):
        raise GrammarError(f"$ref {ref!r}: only local references ('#/...') are supported")
    fragment = unquote(ref[1:])
    if fragment and not fragment.startswith("/"):
        raise GrammarError(f"$ref {ref!r}: anchor references are not supported")
    node: Any = document
    for token in fragment.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise GrammarError(f"$ref {ref!r} does not resolve")
    if not isinstance(node, (bool, dict)):
        raise GrammarError(f"$ref {ref!r} does not point to a schema")
    return node


def type_set(schema: dict[str, Any], path: str) -> set[str] | None:
    """The declared types (None when `type` is absent)."""
    if "type" not in schema:
        return None
    declared = schema["type"]
    names = [declared] if isinstance(declared, str) else declared
    valid = {"null", "boolean", "object", "array", "number", "string", "integer"}
    if not isinstance(names, list) or not names or any(n not in valid for n in names):
        raise GrammarError(f"invalid 'type' {declared!r} at {path}")
    return set(names)


def _intersect_types(a: set[str], b: set[str]) -> set[str]:
    out = a & b
    if "integer" in a and "number" in b or "number" in a and "integer" in b:
        out.add("integer")
    return out


def numeric_bounds(schema: dict[str, Any], path: str) -> tuple[Decimal | None, bool, Decimal | None, bool]:
    """(low, low exclusive, high, high exclusive), reading both draft-4 boolean and numeric exclusives."""

    def number(key: str) -> Decimal | None:
        if key not in schema:
            return None
        v = schema[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GrammarError(f"'{key}' at {path} must be a number, got {v!r}")
        if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
            raise GrammarError(f"'{key}' at {path} must be finite")
        return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)

    low, high = number("minimum"), number("maximum")
    low_excl = high_excl = False
    for key, is_low in (("exclusiveMinimum", True), ("exclusiveMaximum", False)):
        if key not in schema:
            continue
        v = schema[key]
        if isinstance(v, bool):  # draft 4: modifies minimum/maximum
            if is_low:
                low_excl = v and low is not None
            else:
                high_excl = v and high is not None
            continue
        bound = number(key)
        if is_low and (low is None or bound >= low):
            low, low_excl = bound, True
        elif not is_low and (high is None or bound <= high):
            high, high_excl = bound, True
    return low, low_excl, high, high_excl


def _bounds_schema(low: Decimal | None, low_excl: bool, high: Decimal | None, high_excl: bool) -> dict[str, Any]:
    def num(d: Decimal) -> int | float:
        return int(d) if d == d.to_integral_value() else float(d)

    out: dict[str, Any] = {}
    if low is not None:
        out["exclusiveMinimum" if low_excl else "minimum"] = num(low)
    if high is not None:
        out["exclusiveMaximum" if high_excl else "maximum"] = num(high)
    return out


def _all_of(a: Schema, b: Schema) -> Schema:
    """A lazy conjunction (merged when the converter reaches it)."""
    if a is True or b is False:
        return b
    if b is True or a is False:
        return a
    if a == b:
        return a
    return {"allOf": [a, b]}


_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MIN_KEYS = ("minLength", "minItems", "minProperties")
_MAX_KEYS = ("maxLength", "maxItems", "maxProperties")


class SchemaMerger:
    """Flattens `$ref`-with-siblings and `allOf` into one schema, resolving refs in `document`."""

    def __init__(self, document: Schema) -> None:
        self.document = document

    def flatten(self, schema: Schema, path: str, active: tuple[str, ...] = ()) -> Schema:
        """`schema` without `$ref` or `allOf` at its top level (nested schemas are left as they are)."""
        if isinstance(schema, bool):
            return schema
        if not isinstance(schema, dict):
            raise GrammarError(f"schema at {path} must be an object or a boolean")
        result: Schema = {k: v for k, v in schema.items() if k not in ("$ref", "allOf")}
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in active:
                raise GrammarError(f"$ref {ref!r} at {path} includes itself through allOf/$ref (infinite schema)")
            target = resolve_pointer(self.document, ref)
            result = self.merge(result, self.flatten(target, ref, (*active, ref)), path)
        if "allOf" in schema:
            branches = schema["allOf"]
            if not isinstance(branches, list) or not branches:
                raise GrammarError(f"'allOf' at {path} must be a non-empty array")
            for i, branch in enumerate(branches):
                result = self.merge(result, self.flatten(branch, f"{path}/allOf/{i}", active), path)
        return result

    def merge(self, a: Schema, b: Schema, path: str) -> Schema:
        """The conjunction of two flattened schemas as one schema (or False when provably empty)."""
        if a is False or b is False:
            return False
        if a is True:
            return b
        if b is True:
            return a
        out: dict[str, Any] = {}
        handled: set[str] = set()

        def both(key: str) -> bool:
            return key in a and key in b

        # type
        ta, tb = type_set(a, path), type_set(b, path)
        if ta is not None or tb is not None:
            types = _intersect_types(ta, tb) if ta is not None and tb is not None else (ta or tb)
            if not types:
                return False
            out["type"] = sorted(types)
        handled.add("type")

        # enum / const as one value set
        values = None
        for side in (a, b):
            side_values = None
            if "enum" in side:
                if not isinstance(side["enum"], list):
                    raise GrammarError(f"'enum' at {path} must be an array")
                side_values = list(side["enum"])
            if "const" in side:
                side_values = [v for v in (side_values or [side["const"]]) if value_key(v) == value_key(side["const"])]
            if side_values is not None:
                if values is None:
                    values = side_values
                else:
                    keys = {value_key(v) for v in side_values}
                    values = [v for v in values if value_key(v) in keys]
        if values is not None:
            out["enum"] = values
        handled |= {"enum", "const"}

        # numeric bounds
        if any(k in a or k in b for k in _BOUND_KEYS):
            la, lae, ha, hae = numeric_bounds(a, path)
            lb, lbe, hb, hbe = numeric_bounds(b, path)
            low, low_excl = la, lae
            if lb is not None and (low is None or lb > low or lb == low and lbe):
                low, low_excl = lb, lbe
            high, high_excl = ha, hae
            if hb is not None and (high is None or hb < high or hb == high and hbe):
                high, high_excl = hb, hbe
            out.update(_bounds_schema(low, low_excl, high, high_excl))
        handled |= set(_BOUND_KEYS)

        for key in _MIN_KEYS:
            if key in a or key in b:
                out[key] = max(a.get(key, 0), b.get(key, 0))
        for key in _MAX_KEYS:
            if key in a or key in b:
                out[key] = min(x[key] for x in (a, b) if key in x)
        handled |= set(_MIN_KEYS) | set(_MAX_KEYS)

        if "required" in a or "required" in b:
            out["required"] = list(dict.fromkeys([*a.get("required", []), *b.get("required", [])]))
        handled.add("required")

        self._merge_properties(a, b, out)
        handled |= {"properties", "additionalProperties", "unevaluatedProperties"}
        self._merge_items(a, b, out, path)
        handled |= {"prefixItems", "items", "additionalItems", "unevaluatedItems"}

        # Unions: distribute one over the other so the result stays a single schema.
        for key in ("anyOf", "oneOf"):
            if both(key):
                out[key] = [_all_of(x, y) for x in a[key] for y in b[key]]
            elif key in a or key in b:
                out[key] = (a if key in a else b)[key]
            handled.add(key)

        for key in dict.fromkeys([*a, *b]):
            if key in handled or key in ANNOTATIONS:
                continue
            if both(key) and a[key] != b[key]:
                raise GrammarError(f"allOf at {path}: cannot intersect two different '{key}' values")
            out[key] = a[key] if key in a else b[key]
        return out

    @staticmethod
    def _merge_properties(a: dict[str, Any], b: dict[str, Any], out: dict[str, Any]) -> None:
        """A property must satisfy each side's `properties` entry, or that side's additionalProperties."""
        pa, pb = a.get("properties", {}), b.get("properties", {})
        if "properties" in a or "properties" in b:
            merged = {}
            for name in dict.fromkeys([*pa, *pb]):
                parts = []
                for props, side in ((pa, a), (pb, b)):
                    if name in props:
                        parts.append(props[name])
                    elif "additionalProperties" in side:
                        parts.append(side["additionalProperties"])
                merged[name] = parts[0] if len(parts) == 1 else _all_of(parts[0], parts[1])
            out["properties"] = merged
        for key in ("additionalProperties", "unevaluatedProperties"):
            if key in a and key in b:
                out[key] = _all_of(a[key], b[key])
            elif key in a or key in b:
                out[key] = a[key] if key in a else b[key]

    @staticmethod
    def _merge_items(a: dict[str, Any], b: dict[str, Any], out: dict[str, Any], path: str) -> None:
        """Element i must satisfy each side's prefix entry i, or that side's `items` past its prefix."""

        def normalized(side: dict[str, Any]) -> tuple[list[Schema], Schema | None]:
            items = side.get("items")
            if isinstance(items, list):  # draft 4-2019 tuple form
                return list(items), side.get("additionalItems")
            return list(side.get("prefixItems", [])), items

        prefix_a, rest_a = normalized(a)
        prefix_b, rest_b = normalized(b)
        if prefix_a or prefix_b:
            prefix = []
            for i in range(max(len(prefix_a), len(prefix_b))):
                parts = []
                for prefix_side, rest_side in ((prefix_a, rest_a), (prefix_b, rest_b)):
                    if i < len(prefix_side):
                        parts.append(prefix_side[i])
                    elif rest_side is not None:
                        parts.append(rest_side)
                prefix.append(parts[0] if len(parts) == 1 else _all_of(parts[0], parts[1]))
            out["prefixItems"] = prefix
        if rest_a is not None or rest_b is not None:
            out["items"] = _all_of(rest_a if rest_a is not None else True, rest_b if rest_b is not None else True)
        if "unevaluatedItems" in a or "unevaluatedItems" in b:
            ua, ub = a.get("unevaluatedItems", True), b.get("unevaluatedItems", True)
            out["unevaluatedItems"] = _all_of(ua, ub)
