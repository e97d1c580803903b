"""Structured outputs and tool calling through a live `treadle serve` (default model) with the official client.

Every answer is checked against a reference we did not write: `jsonschema` for JSON, `re` for regexes, the tool's
own parameter schema for call arguments. Requests of a test run concurrently, so they share engine batches.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from test_server_openai import Server, _start, _stop

BUDGET_S = 3


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = _start("--grammar-compile-timeout", str(BUDGET_S))
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def gather(server: Server, calls: list[dict]) -> list:
    """Run chat requests concurrently; streamed ones come back as their list of chunks."""

    async def one(client: openai.AsyncOpenAI, kw: dict):
        kw = {"model": server.model, "temperature": 0, **kw}
        if kw.get("stream"):
            return [c async for c in await client.chat.completions.create(**kw)]
        return await client.chat.completions.create(**kw)

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, kw) for kw in calls))

    return asyncio.run(run())


def reassemble(chunks) -> tuple[str | None, list[dict], str]:
    """Content, tool calls and finish reason of choice 0 as a client rebuilds them from a stream."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.id is not None:
                    assert tc.index == len(calls) and tc.type == "function" and tc.function.name
                    calls.append({"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""})
                else:
                    assert tc.function.name is None and tc.index == len(calls) - 1
                    calls[tc.index]["arguments"] += tc.function.arguments
            if c.finish_reason is not None:
                assert finish is None
                finish = c.finish_reason
    return content or None, calls, finish


def answer(response) -> tuple[str | None, list[dict], str]:
    choice = response.choices[0]
    assert all(tc.type == "function" for tc in choice.message.tool_calls or [])
    calls = [{"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
             for tc in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


# ---- JSON schemas --------------------------------------------------------------------------------------------------
NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}
POINT = {"type": "object", "properties": {"x": SMALL, "y": SMALL}, "required": ["x", "y"]}
SCHEMAS = {
    "flat_object": {"type": "object", "properties": {"name": NAME, "age": SMALL}, "required": ["name", "age"]},
    "string_enum": {"enum": ["red", "green", "blue"]},
    "nested_object": {"type": "object", "properties": {"city": NAME, "address": {
        "type": "object", "properties": {"street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "zip"]}}, "required": ["city", "address"]},
    "string_array": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
    "nullable": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                                      "maxLength": 12}},
                 "required": ["ok", "note"]},
    "number_bounds": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 500},
                                                        "qty": {"type": "integer", "exclusiveMinimum": 0,
                                                                "exclusiveMaximum": 10}},
                      "required": ["price", "qty"]},
    "const": {"type": "object", "properties": {"version": {"const": "1.0"}, "name": NAME},
              "required": ["version", "name"]},
    "any_of": {"anyOf": [SMALL, {"type": "string", "maxLength": 8}]},
    "one_of_tagged": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
         "required": ["kind", "lives"]},
        {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
         "required": ["kind", "good"]}]},
    "refs": {"$defs": {"point": POINT}, "type": "object",
             "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
             "required": ["start", "end"]},
    "recursive": {"$defs": {"comment": {"type": "object", "properties": {
        "text": NAME, "replies": {"type": "array", "items": {"$ref": "#/$defs/comment"}, "maxItems": 2}},
        "required": ["text"]}}, "$ref": "#/$defs/comment"},
    "date_format": {"type": "object", "properties": {"event": NAME, "date": {"type": "string", "format": "date"}},
                    "required": ["event", "date"]},
    "email_uuid": {"type": "object", "properties": {"email": {"type": "string", "format": "email"},
                                                    "id": {"type": "string", "format": "uuid"}},
                   "required": ["email", "id"]},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
    "optional_properties": {"type": "object", "properties": {"a": SMALL, "b": NAME, "c": {"type": "boolean"}},
                            "additionalProperties": False},
    "tuple": {"type": "array", "prefixItems": [NAME, SMALL], "items": False, "minItems": 2},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": SMALL}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "string_lengths": {"type": "object", "properties": {"code": {"type": "string", "minLength": 4, "maxLength": 6}},
                       "required": ["code"]},
    "array_of_objects": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": SMALL, "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"]}},
    "boolean": {"type": "boolean"},
}


def schema_request(schema: dict, stream: bool) -> dict:
    prompt = f"Reply with a JSON value that matches this JSON schema:\n{json.dumps(schema)}"
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 96, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}


def test_twenty_schemas_validate_streaming_and_not(server: Server):
    assert len(SCHEMAS) == 20
    names = list(SCHEMAS)
    results = gather(server, [schema_request(SCHEMAS[n], stream) for stream in (False, True) for n in names])
    for i, name in enumerate(names):
        full, streamed = answer(results[i]), reassemble(results[len(names) + i])
        text, calls, finish = full
        assert finish == "stop" and not calls, (name, full)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        assert streamed == full, name


def test_other_constraint_surfaces(server: Server, client: openai.OpenAI):
    ask = [{"role": "user", "content": "Is the sky blue? Then give a product code."}]
    regex = r"(yes|no), code [A-Z]{2}[0-9]{2}"
    results = gather(server, [
        {"messages": ask, "max_tokens": 20, "extra_body": {"structured_outputs": {"regex": regex}}},
        {"messages": ask, "max_tokens": 20, "extra_body": {"guided_regex": regex}},
        {"messages": ask, "max_tokens": 5, "extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}},
        {"messages": ask, "max_tokens": 5, "extra_body": {"guided_choice": ["Yes!", "No."]}},
        {"messages": ask, "max_tokens": 20,
         "extra_body": {"structured_outputs": {"grammar": 'root ::= "answer: " ("yes" | "no") "."'}}},
        {"messages": ask, "max_tokens": 48, "response_format": {"type": "json_object"}},
        {"messages": ask, "max_tokens": 48, "extra_body": {"guided_json": json.dumps(SCHEMAS["flat_object"])}},
    ])
    texts = [r.choices[0].message.content for r in results]
    assert all(r.choices[0].finish_reason == "stop" for r in results), texts
    assert re.fullmatch(regex, texts[0]) and re.fullmatch(regex, texts[1])
    assert texts[2] in ("yes", "no") and texts[3] in ("Yes!", "No.")
    assert re.fullmatch(r"answer: (yes|no)\.", texts[4])
    assert isinstance(json.loads(texts[5]), dict)
    jsonschema.validate(json.loads(texts[6]), SCHEMAS["flat_object"])
    completion = client.completions.create(model=server.model, prompt="The colors of the flag are", max_tokens=6,
                                           temperature=0, extra_body={"guided_choice": ["red", "blue"]})
    assert completion.choices[0].text in ("red", "blue") and completion.choices[0].finish_reason == "stop"


def test_n_choices_each_follow_the_schema(client: openai.OpenAI, server: Server):
    out = client.chat.completions.create(model=server.model, n=3, temperature=0.8, seed=11,
                                         **schema_request(SCHEMAS["flat_object"], False))
    assert len(out.choices) == 3
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMAS["flat_object"])


# ---- tools ---------------------------------------------------------------------------------------------------------
CITY = {"type": "string", "minLength": 2, "maxLength": 20}
UNIT = {"enum": ["celsius", "fahrenheit"]}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": CITY, "unit": UNIT}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_forecast", "description": "Weather forecast for the coming days",
        "parameters": {"type": "object", "properties": {"city": CITY, "unit": UNIT, "days": {
            "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}}},
    {"type": "function", "function": {
        "name": "convert", "description": "Convert a temperature",
        "parameters": {"type": "object", "properties": {"value": {"type": "number", "minimum": -100, "maximum": 100},
                                                        "to": UNIT}, "required": ["value", "to"]}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["name"] in names and re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"])
        jsonschema.validate(json.loads(call["arguments"]), SCHEMA_OF[call["name"]])


def without_ids(a: tuple) -> tuple:
    content, calls, finish = a
    return content, [{k: v for k, v in c.items() if k != "id"} for c in calls], finish


def test_required_and_named_calls_validate_and_streams_reassemble(server: Server):
    kinds = [
        {"tool_choice": "required", "parallel_tool_calls": False},
        {"tool_choice": {"type": "function", "function": {"name": "get_forecast"}}},
        {"tool_choice": {"type": "function", "function": {"name": "convert"}}},
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": True},
    ]
    calls = [{"messages": WEATHER, "tools": TOOLS, "max_tokens": 120, "stream": stream, **kw}
             for stream in (False, True) for kw in kinds]
    results = gather(server, calls)
    for i, kw in enumerate(kinds):
        full, streamed = answer(results[i]), reassemble(results[len(kinds) + i])
        content, got, finish = full
        assert finish == "tool_calls" and content is None, full
        if isinstance(kw["tool_choice"], dict):
            check_calls(got, {kw["tool_choice"]["function"]["name"]})
            assert len(got) == 1
        else:
            check_calls(got, set(SCHEMA_OF))
        if kw.get("parallel_tool_calls") is False:
            assert len(got) == 1
        assert without_ids(streamed) == without_ids(full), kw


def call(name: str, args: dict, i: int) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


# Two earlier turns in which the assistant answered with calls: a 135M model then follows the pattern.
HISTORY = [
    {"role": "user", "content": "What's the weather in Rome?"}, call("get_weather", {"city": "Rome", "unit": "celsius"}, 1),
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    {"role": "assistant", "content": "It is 21 C and sunny in Rome."},
    {"role": "user", "content": "What's the weather in Oslo?"}, call("get_weather", {"city": "Oslo", "unit": "celsius"}, 2),
]


def test_auto_calls_a_tool_when_asked_and_answers_in_text_otherwise(server: Server):
    asks = [HISTORY[:4] + [{"role": "user", "content": "What's the weather in Madrid?"}],
            [{"role": "user", "content": "What's the weather in Paris?"},
             call("get_weather", {"city": "Paris", "unit": "celsius"}, 1),
             {"role": "user", "content": "What's the weather in Tokyo?"},
             call("get_weather", {"city": "Tokyo", "unit": "celsius"}, 2),
             {"role": "user", "content": "What's the weather in Berlin?"}],
            [{"role": "user", "content": "Write one sentence about cats."}]]
    results = gather(server, [{"messages": m, "tools": TOOLS, "max_tokens": 60, "stream": s}
                              for s in (False, True) for m in asks])
    tool_call = answer(results[1])
    assert tool_call[2] == "tool_calls", tool_call
    check_calls(tool_call[1], set(SCHEMA_OF))
    text = answer(results[2])
    assert text[2] in ("stop", "length") and text[0] and not text[1]
    for i in range(len(asks)):
        calls = answer(results[i])[1]
        if calls:
            check_calls(calls, set(SCHEMA_OF))
        assert without_ids(reassemble(results[len(asks) + i])) == without_ids(answer(results[i]))


def test_response_format_and_auto_tools_compose(server: Server):
    schema = SCHEMAS["flat_object"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    results = gather(server, [
        {"messages": [{"role": "user", "content": "Describe a person named Ada, aged 36, as JSON."}],
         "tools": TOOLS, "response_format": fmt, "max_tokens": 60, "parallel_tool_calls": False},
        {"messages": HISTORY[:2] + [{"role": "user", "content": "What's the weather in Lima?"}],
         "tools": TOOLS, "response_format": fmt, "max_tokens": 60, "parallel_tool_calls": False},
    ])
    for r in results:
        content, calls, finish = answer(r)
        if calls:
            assert finish == "tool_calls" and content is None
            check_calls(calls, set(SCHEMA_OF))
        else:
            assert finish == "stop"
            jsonschema.validate(json.loads(content), schema)


# ---- bad input -----------------------------------------------------------------------------------------------------
def error_of(client: openai.OpenAI, server: Server, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=WEATHER, max_tokens=4, **kw)
    return e.value.response.json()["error"]


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_bad_inputs_are_400_with_clear_messages(server: Server, client: openai.OpenAI):
    err = error_of(client, server, response_format=schema_format({"type": "object", "properties": {"a": 5}}))
    assert err["param"] == "response_format.json_schema.schema"
    assert "not a valid JSON schema" in err["message"] and "$.properties.a" in err["message"]
    err = error_of(client, server, response_format=schema_format({"type": "array", "uniqueItems": True}))
    assert "uniqueItems" in err["message"] and "not supported" in err["message"]
    err = error_of(client, server, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert err["param"] == "tool_choice" and "get_time" in err["message"] and "get_weather" in err["message"]
    err = error_of(client, server, extra_body={"guided_regex": "(unclosed"})
    assert err["param"] == "guided_regex" and "regex" in err["message"]
    err = error_of(client, server, extra_body={"guided_regex": "a+", "guided_choice": ["a"]})
    assert "only one" in err["message"]
    err = error_of(client, server, tool_choice="required")
    assert err["param"] == "tool_choice"
    err = error_of(client, server, tools=TOOLS + TOOLS[:1])
    assert "get_weather" in err["message"]
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    err = error_of(client, server, tools=bad_tool)
    assert err["param"] == "tools.0.function.parameters" and "objekt" in err["message"]
    err = error_of(client, server, extra_body={"structured_outputs": {"json": {}, "whitespace_pattern": " "}})
    assert "whitespace_pattern" in err["message"]


def test_grammar_over_budget_fails_fast_and_server_stays_healthy(server: Server, client: openai.OpenAI):
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(40000)}}
    for _ in range(2):  # the second attempt is refused without compiling again
        err = error_of(client, server, response_format=schema_format(huge))
        assert err["code"] == "grammar_too_complex" and f"{BUDGET_S} s" in err["message"]
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    ok = client.chat.completions.create(model=server.model, messages=WEATHER, max_tokens=40, temperature=0,
                                        response_format=schema_format(SCHEMAS["flat_object"]))
    jsonschema.validate(json.loads(ok.choices[0].message.content), SCHEMAS["flat_object"])
