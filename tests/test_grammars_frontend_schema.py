"""JSON Schema front-end: generated valid values are accepted, mutations are rejected where they go
wrong, whole accepted texts are valid under jsonschema, and unsupported constraints fail loudly."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from grammars_frontend_testing import (
    NEVER_IN_JSON,
    accepted_prefix,
    accepts,
    byte_grammar,
    load_suite,
    schema_values,
    spaced_json,
    validator,
)
from treadle.grammars.errors import GrammarError
from treadle.grammars.json_schema import json_schema_to_ebnf

TARGETED = {
    "escaped_strings": {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 3}, "t": {"type": "string"}}, "required": ["s"]},
    "extra_keys_excluded": {"type": "object", "properties": {"a": {"type": "integer"}, "ab": {"type": "boolean"}}, "additionalProperties": {"type": "string"}},
    "required_without_schema": {"type": "object", "required": ["k"], "properties": {"x": {"type": "null"}}},
    "draft4_exclusive": {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "minimum": -1.5, "exclusiveMinimum": True, "maximum": 2, "exclusiveMaximum": False},
    "integer_fraction_bounds": {"type": "integer", "minimum": -7.5, "maximum": 12.25},
    "pattern_and_length": {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$", "minLength": 3, "maxLength": 12},
    "unanchored_pattern": {"type": "string", "pattern": "[0-9]{2}"},
    "tuple_draft4": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array", "items": [{"type": "string"}, {"type": "integer"}], "additionalItems": {"type": "boolean"}, "maxItems": 4},
    "items_false": {"type": "array", "prefixItems": [{"const": 1}], "items": False},
    "type_array": {"type": ["integer", "string", "null"], "minimum": 3, "maxLength": 2},
    "untyped_keywords": {"properties": {"a": {"minimum": 0}}, "required": ["a"]},
    "const_object": {"const": {"k": [1, "two", None], "z": {}}},
    "nested_unions": {"anyOf": [{"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string", "format": "date"}]}}, {"type": "boolean"}]},
    "root_recursion": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}, "child": {"$ref": "#"}}, "required": ["name"]},
    "allof_additional": {"allOf": [{"properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "integer"}}, {"properties": {"b": {"type": "integer", "maximum": 5}}}]},
}
CASES = {case["name"]: case["schema"] for case in load_suite() if case["kind"] == "json_schema"} | TARGETED
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def ebnf_of(schema, **kwargs) -> str:
    ebnf = json_schema_to_ebnf(schema, **kwargs)
    byte_grammar(ebnf)  # it must compile in the reference engine
    return ebnf


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_values_are_accepted_and_mutations_rejected(name):
    schema = CASES[name]
    ebnf = ebnf_of(schema)
    check = validator(schema)

    @PROPERTY
    @given(st.data())
    def run(data):
        value = data.draw(schema_values(schema))
        text = data.draw(spaced_json(value)).encode()
        n, complete = accepted_prefix(ebnf, text)
        assert n == len(text) and complete, f"valid text rejected at byte {n}: {text[: n + 1]!r}"

        # A byte that is never valid JSON is rejected exactly where it is inserted.
        at = data.draw(st.integers(0, len(text)))
        bad = data.draw(st.sampled_from(list(NEVER_IN_JSON)))
        assert accepted_prefix(ebnf, text[:at] + bytes([bad]) + text[at:])[0] == at

        # Any other edit: everything before it is still a valid prefix, and if the grammar takes the
        # whole edited text, it must be valid JSON under the schema.
        at = data.draw(st.integers(0, len(text) - 1))
        byte = data.draw(st.sampled_from(list(b'{}[]",:0123456789-.eEtrufalsn \\a')))
        edit = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        mutated = {
            "replace": text[:at] + bytes([byte]) + text[at + 1 :],
            "insert": text[:at] + bytes([byte]) + text[at:],
            "delete": text[:at] + text[at + 1 :],
            "truncate": text[:at],
        }[edit]
        n, complete = accepted_prefix(ebnf, mutated)
        assert n >= at, f"{edit} at {at}: valid prefix rejected at byte {n}"
        if n == len(mutated) and complete:
            try:
                decoded = json.loads(mutated)
            except ValueError:
                pytest.fail(f"grammar accepted invalid JSON {mutated!r}")
            assert check.is_valid(decoded), f"grammar accepted {mutated!r}, invalid under the schema"

    run()


@pytest.mark.parametrize("name", ["flat_object", "tuple_prefix_items", "nested_order"])
def test_non_strict_mode_accepts_generated_extras(name):
    schema = CASES[name]
    ebnf = ebnf_of(schema, strict_mode=False)

    @PROPERTY
    @given(st.data())
    def run(data):
        text = data.draw(spaced_json(data.draw(schema_values(schema, strict_mode=False)))).encode()
        assert accepted_prefix(ebnf, text) == (len(text), True)

    run()


def test_whitespace_is_bounded_per_slot():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    ebnf = ebnf_of(schema)
    assert accepts(ebnf, '{"a":' + " " * 20 + "1}")
    assert not accepts(ebnf, '{"a":' + " " * 21 + "1}")
    small = ebnf_of(schema, max_whitespace_cnt=2)
    assert accepts(small, '{ "a" :\n\t1 }') and not accepts(small, '{"a":   1}')
    with pytest.raises(GrammarError, match="max_whitespace_cnt"):
        json_schema_to_ebnf(schema, max_whitespace_cnt=0)


@pytest.mark.parametrize("indent,separators", [(None, None), (2, None), (4, (",", ": ")), (None, (",", ":")), (0, None)])
def test_fixed_layout_matches_json_dumps(indent, separators):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}, "b": {"type": "object", "properties": {"c": {"type": "string"}}}, "d": {}}, "required": ["a"]}
    ebnf = ebnf_of(schema, any_whitespace=False, indent=indent, separators=separators)
    value = {"a": [1, 2], "b": {"c": "x"}, "d": {"free": [1, {"x": None}]}}
    kwargs = {} if separators is None else {"separators": separators}
    flat_separators = separators or ((",", ": ") if indent is not None else (", ", ": "))
    expected = json.dumps({k: v for k, v in value.items() if k != "d"}, indent=indent, **kwargs)
    # Free-form values cannot know their depth: they are written on one line.
    free = json.dumps(value["d"], separators=flat_separators)
    expected = expected[: expected.rindex("}")].rstrip() + flat_separators[0] + ("\n" + " " * indent if indent is not None else "") + '"d"' + flat_separators[1] + free + ("\n" if indent is not None else "") + "}"
    assert accepts(ebnf, expected), expected
    assert accepts(ebnf, json.dumps({"a": []}, indent=indent, **kwargs))
    assert not accepts(ebnf, json.dumps({"a": [1]}, indent=7, separators=(" ,", ":")))


def test_max_length_is_a_counter_not_an_expansion():
    ebnf = ebnf_of({"type": "string", "maxLength": 10000})
    assert "{0,10000}" in ebnf and len(ebnf) < 2000
    assert accepts(ebnf, json.dumps("x" * 10000)) and not accepts(ebnf, json.dumps("x" * 10001))


def test_identical_sub_schemas_share_one_rule_across_grammars():
    point = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}
    one = json_schema_to_ebnf({"type": "object", "properties": {"from": point, "to": point}})
    other = json_schema_to_ebnf({"type": "array", "items": point, "maxItems": 3})
    # The point's rules appear once in the first grammar and verbatim in the second.
    assert sum('\\"y\\"' in line for line in one.splitlines()) == 1
    shared = set(one.splitlines()) & set(other.splitlines())
    assert any('\\"x\\"' in line for line in shared) and any('\\"y\\"' in line for line in shared)


def test_strict_mode():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert not accepts(json_schema_to_ebnf(schema), '{"a": 1, "b": 2}')
    assert accepts(json_schema_to_ebnf(schema, strict_mode=False), '{"a": 1, "b": [2]}')
    # An object or array that declares nothing stays free, as in xgrammar.
    assert accepts(json_schema_to_ebnf({"type": "object"}), '{"b": [2]}')
    tuple_schema = {"type": "array", "prefixItems": [{"type": "integer"}]}
    assert not accepts(json_schema_to_ebnf(tuple_schema), "[1, 2]")
    assert accepts(json_schema_to_ebnf(tuple_schema, strict_mode=False), '[1, "x"]')


def test_additional_keys_never_equal_declared_ones():
    ebnf = ebnf_of(TARGETED["extra_keys_excluded"])
    assert accepts(ebnf, '{"a": 1, "abc": "x", "": "y"}')
    for text in ['{"a": "x"}', '{"\\u0061": "x"}', '{"ab": "x"}', '{"a\\u0062": "x"}']:
        assert not accepts(ebnf, text), text


def test_canonical_numbers_and_spellings():
    assert not accepts(ebnf_of({"type": "integer"}), "1.0")
    assert not accepts(ebnf_of({"type": "integer"}), "-0")
    assert accepts(ebnf_of({"type": "number"}), "-1.5e-3")
    bounded = ebnf_of({"type": "number", "minimum": 0})
    assert accepts(bounded, "12.50") and not accepts(bounded, "1e3") and not accepts(bounded, "-0.0")
    # Free strings take every JSON spelling; constrained ones the json.dumps spellings.
    free = ebnf_of({"type": "string"})
    assert all(accepts(free, t) for t in ['"\\/\\u0041"', '"\\ud83d\\ude00"', '"é"'])
    assert not accepts(free, '"\\ud83d"')
    enum = ebnf_of({"enum": ["a/é", 'q"\n']})
    assert all(accepts(enum, t) for t in ['"a/é"', '"a/\\u00e9"', '"a/\\u00E9"', '"q\\"\\n"'])
    assert not accepts(enum, '"\\u0061/é"') and not accepts(enum, '"a\\/é"')


def test_pydantic_model_and_string_input():
    class Item(BaseModel):
        name: str
        price: float
        tags: list[str] = []

    ebnf = ebnf_of(Item)
    assert accepts(ebnf, '{"name": "pen", "price": 1.5, "tags": ["a"]}')
    assert ebnf == json_schema_to_ebnf(json.dumps(Item.model_json_schema()))


@pytest.mark.parametrize(
    "schema,message",
    [
        ({"not": {"type": "string"}}, "'not'"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "'if'"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "number", "multipleOf": 0.5}, "'multipleOf'"),
        ({"type": "integer", "multipleOf": 3}, "'multipleOf'"),
        ({"type": "object", "minProperties": 2}, "'minProperties'"),
        ({"type": "string", "format": "hostname"}, "format 'hostname'"),
        ({"type": "string", "pattern": "a", "format": "date"}, "'pattern' together with 'format'"),
        ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
        ({"type": "string", "pattern": "(?=a)"}, "lookahead"),
        ({"$ref": "other.json#/x"}, "only local references"),
        ({"$ref": "#/$defs/missing"}, "does not resolve"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
        ({"allOf": [{"pattern": "a"}, {"pattern": "b"}]}, "'pattern'"),
        ({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}}, "$ref": "#/$defs/n"}, "matches no value"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"], "additionalProperties": False}, "matches no value"),
        ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "includes itself"),
        ({"type": "bogus"}, "invalid 'type'"),
        ({"type": "string", "maxLength": -1}, "'maxLength'"),
        ("{not json", "not valid JSON"),
        (42, "must be a str, dict"),
    ],
)
def test_unsupported_or_invalid_schemas_raise_naming_the_problem(schema, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        json_schema_to_ebnf(schema)


def test_recursion_with_indent_is_refused_not_truncated():
    schema = {"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"}
    assert accepts(ebnf_of(schema), "[[], [[]]]")
    with pytest.raises(GrammarError, match="recursive"):
        json_schema_to_ebnf(schema, any_whitespace=False, indent=2)


def test_disjoint_one_of_and_annotations_are_accepted():
    schema = {
        "title": "T",
        "description": "annotations are ignored",
        "oneOf": [
            {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"], "examples": [{}]},
            {"type": "object", "properties": {"kind": {"const": "b"}, "n": {"type": "integer"}}, "required": ["kind"]},
            {"type": "string", "default": "x"},
        ],
    }
    ebnf = ebnf_of(schema)
    assert accepts(ebnf, '{"kind": "b", "n": 2}') and accepts(ebnf, '"s"') and not accepts(ebnf, '{"kind": "c"}')
