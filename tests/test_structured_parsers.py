"""Tool-call parsers without a server: calls rendered in each family's format come back exactly (names, raw
argument JSON, surrounding text), and any split of the text into stream deltas reassembles to the one-shot parse."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle.server.tool_parsers import FORMATS, ContentDelta, ToolCallDelta, new_tool_call_id


def assemble(deltas) -> tuple[str, list[dict]]:
    """Content and calls as a client reassembles them from deltas (ids and names only on a call's first delta)."""
    content = ""
    calls: list[dict] = []
    for d in deltas:
        if isinstance(d, ContentDelta):
            content += d.text
        elif d.id is not None:
            assert d.index == len(calls) and d.name is not None and d.arguments == ""
            calls.append({"id": d.id, "name": d.name, "arguments": ""})
        else:
            assert d.name is None and d.index == len(calls) - 1
            calls[d.index]["arguments"] += d.arguments
    return content, calls


def parse(fmt_name: str, pieces: list[str]) -> tuple[str, list[dict]]:
    parser = FORMATS[fmt_name]().parser()
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    content, calls = assemble(deltas)
    assert parser.num_calls == len(calls)
    return content, [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


CASES = [
    # (format, text, content, [(name, arguments)])
    ("hermes", "The sky is blue.", "The sky is blue.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", '{"city": "Paris"}')]),
    ("hermes", ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "}]\\""}]}}\n</tool_call>\n'
                '<tool_call>{"name":"g","arguments":{}}</tool_call>\nDone.'), "Let me check.Done.",
     [("f", '{"a": [1, {"b": "}]\\""}]}'), ("g", "{}")]),
    ("hermes", '<tool_call>\n{"arguments": {"x": 1}, "name": "late"}\n</tool_call>', "", [("late", '{"x": 1}')]),
    ("hermes", '<tool_call>\n{"name": "no_args"}\n</tool_call>', "", [("no_args", "{}")]),
    ("hermes", "I like <tool_call> tags and <b>", "I like <tool_call> tags and <b>", []),
    ("hermes", '<tool_call>\n{"id": 3}\n</tool_call> x', '<tool_call>\n{"id": 3}\n</tool_call> x', []),
    ("hermes", '<tool_call>\n{"name": "cut", "arguments": {"q": "ab', "", [("cut", '{"q": "ab')]),
    ("hermes", "  spaced  ", "  spaced  ", []),
    ("llama3_json", '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}', "", [("search", '{"q": "x"}')]),
    ("llama3_json", '{"name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": {"n": -2.5e3}}', "",
     [("a", '{"n": 1}'), ("b", '{"n": -2.5e3}')]),
    ("llama3_json", 'Sure: {"name": "a", "arguments": {"n": true}} ok', "Sure:ok", [("a", '{"n": true}')]),
    ("llama3_json", 'a {"named": 1} b', 'a {"named": 1} b', []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x": "y"}}, {"name": "b", "arguments": {}}]', "",
     [("a", '{"x": "y"}'), ("b", "{}")]),
    ("mistral", "Hello [TOOL_CALLS] world", "Hello [TOOL_CALLS] world", []),
]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parse_one_shot_and_every_two_way_split(fmt, text, content, calls):
    expected = (content, [{"name": n, "arguments": a} for n, a in calls])
    assert parse(fmt, [text]) == expected
    for cut in range(len(text) + 1):
        assert parse(fmt, splits(text, [cut])) == expected, cut
    assert parse(fmt, list(text)) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,20}", fullmatch=True)
WS = " \t\r\n"
texts = st.text(alphabet=st.characters(blacklist_characters="{<[", blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    calls=st.lists(st.tuples(names, st.dictionaries(st.text(max_size=5), json_values, max_size=3)), max_size=3),
    before=texts,
    after=texts,
    indent=st.sampled_from([None, 2]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_rendered_calls_round_trip_under_any_chunking(fmt, calls, before, after, indent, cuts):
    f = FORMATS[fmt]()
    rendered = [(name, json.dumps(args, indent=indent)) for name, args in calls]
    text = before + (f.render_calls(rendered) if rendered else "") + (after if rendered else "")
    content, got = parse(fmt, splits(text, cuts))
    assert got == [{"name": n, "arguments": a} for n, a in rendered]
    assert all(json.loads(c["arguments"]) == args for c, (_, args) in zip(got, calls))
    if rendered:
        assert content == before.rstrip(WS) + after.strip(WS)
    else:
        assert content == before
    assert parse(fmt, [text]) == (content, got)


def test_call_ids_are_openai_shaped_and_unique():
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


def test_header_is_sent_before_arguments_and_fragments_follow_the_text():
    parser = FORMATS["hermes"]().parser()
    out = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a"')
    assert isinstance(out[0], ToolCallDelta) and out[0].name == "f" and out[0].id and out[0].arguments == ""
    assert [d.arguments for d in out[1:]] == ['{"a"']
    assert [d.arguments for d in parser.feed(': 1}}\n</tool')] == [": 1}"]
    assert parser.feed("_call>") == [] and parser.finish() == []
