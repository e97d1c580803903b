"""Structured outputs: the one output constraint a request asks for, from whichever surface the client used, and
its compilation into a grammar for the engine.

Surfaces: OpenAI's `response_format` (json_object, json_schema; plus structural_tag as SGLang and vLLM accept it),
vLLM's `structured_outputs` {json | json_object | regex | choice | grammar | structural_tag}, and vLLM's older
`guided_json / guided_regex / guided_choice / guided_grammar`. At most one constraint per request: two would
have to be intersected, which no client expects. JSON schemas are checked against their metaschema first (the
`jsonschema` package), so an invalid schema gets the validator's precise complaint rather than the compiler's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from treadle.engine.guided import GrammarCompileTimeout, GrammarSpec, GuidedDecoder
from treadle.grammars import CompiledGrammar, GrammarError

from .errors import APIError, bad_request
from .protocol import JSONObjectFormat, JSONSchemaFormat, StructuralTagFormat, _GenerationRequest


@dataclass
class OutputConstraint:
    """A request's constraint, standalone (`spec`) and as a structural-tag format that composes with tools."""

    param: str  # the request field it came from, for error messages
    spec: GrammarSpec
    format: dict[str, Any]
    schemas: list[tuple[str, Any]]  # (param, JSON schema) pairs to check before compiling


def structural_tag(fmt: dict[str, Any]) -> GrammarSpec:
    return GrammarSpec("structural_tag", {"type": "structural_tag", "format": fmt})


def output_constraint(body: _GenerationRequest) -> OutputConstraint | None:
    """The request's output constraint, or None; 400 when several are given or one is malformed."""
    found: list[tuple[str, str, Any]] = []  # (param, kind, value)
    rf = body.response_format
    if isinstance(rf, JSONObjectFormat):
        found.append(("response_format", "json_object", True))
    elif isinstance(rf, JSONSchemaFormat):
        found.append(("response_format.json_schema.schema", "json", rf.json_schema.json_schema))
    elif isinstance(rf, StructuralTagFormat):
        found.append(("response_format", "structural_tag", {"type": "structural_tag", "format": rf.format}))
    so = body.structured_outputs
    if so is not None:
        for kind, value in (("json", so.json_schema), ("json_object", so.json_object), ("regex", so.regex),
                            ("choice", so.choice), ("grammar", so.grammar), ("structural_tag", so.structural_tag)):
            if value is not None and value is not False:
                found.append((f"structured_outputs.{kind}", kind, value))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            found.append((f"guided_{kind}", kind, value))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request("only one structured-output constraint can be given per request; got "
                          + " and ".join(p for p, _, _ in found), found[1][0])
    param, kind, value = found[0]
    return _constraint(param, kind, value)


def _constraint(param: str, kind: str, value: Any) -> OutputConstraint:
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else _json_value(value, param)
        if not isinstance(schema, (dict, bool)):
            raise bad_request(f"{param} must be a JSON schema (an object), got {type(schema).__name__}", param)
        checks = [(param, schema)] if kind == "json" else []
        return OutputConstraint(param, GrammarSpec("json_schema", schema),
                                {"type": "json_schema", "json_schema": schema}, checks)
    if kind == "regex":
        return OutputConstraint(param, GrammarSpec("regex", value), {"type": "regex", "pattern": value}, [])
    if kind == "grammar":
        return OutputConstraint(param, GrammarSpec("grammar", value), {"type": "grammar", "grammar": value}, [])
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request("choice must be a non-empty list of non-empty strings", param)
        fmt = {"type": "or", "elements": [{"type": "const_string", "value": c} for c in value]}
        return OutputConstraint(param, structural_tag(fmt), fmt, [])
    tag = _json_value(value, param)
    if not isinstance(tag, dict) or not isinstance(tag.get("format"), dict):
        raise bad_request('a structural tag must be an object {"type": "structural_tag", "format": {...}}', param)
    return OutputConstraint(param, GrammarSpec("structural_tag", tag), tag["format"], [])


def _json_value(value: Any, param: str) -> Any:
    """Schemas and tags may be sent as JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise bad_request(f"{param} is not valid JSON: {exc}", param) from None


def check_json_schemas(schemas: list[tuple[str, Any]]) -> None:
    """400 naming the offending location when a schema is not valid by its own `$schema` dialect (default
    2020-12). Slow on huge schemas, so it runs on the grammar worker, inside the compile budget."""
    for param, schema in schemas:
        try:
            validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise bad_request(f"{param} is not a valid JSON schema: at {exc.json_path}: {exc.message}",
                              param) from None


async def compile_constraint(
    guided: GuidedDecoder, spec: GrammarSpec, param: str, budget_s: float, schemas: list[tuple[str, Any]]
) -> CompiledGrammar:
    """Check the schemas and compile, off the event loop within `budget_s`; bad input is a 400."""
    try:
        return await guided.compile(spec, budget_s, lambda: check_json_schemas(schemas))
    except GrammarError as exc:
        raise bad_request(f"cannot enforce {param}: {exc}", param) from None
    except GrammarCompileTimeout as exc:
        raise APIError(400, f"{param} is too complex to enforce: {exc} (the server's --grammar-compile-timeout)",
                       param=param, code="grammar_too_complex") from None
    except RecursionError:
        raise bad_request(f"{param} is nested too deeply to enforce", param) from None
