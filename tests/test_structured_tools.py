"""Tool planning without a model: what each tool_choice constrains, how tools reach the prompt (the chat template
when it renders tools, else the injected system prompt), and that every format's grammar accepts exactly what
its parser reads back."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from treadle.engine.tokenizer import Tokenizer
from treadle.grammars import GrammarCompiler, GrammarMatcher, TokenizerInfo
from treadle.server.protocol import ChatCompletionRequest
from treadle.server.structured import output_constraint
from treadle.server.tool_parsers import FORMATS
from treadle.server.tools import ToolSetup, plan_chat

PLAIN_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}\n{% endfor %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
HISTORY = [
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    {"role": "user", "content": "And in Oslo?"},
]


def tokenizer(template: str) -> Tokenizer:
    hf = PreTrainedTokenizerFast(tokenizer_object=RawTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    hf.chat_template = template
    return Tokenizer(hf)


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": [WEATHER, CLOCK], **kw})


def plan(setup: ToolSetup, **kw):
    body = request(**kw)
    return plan_chat(body, setup, output_constraint(body))


def test_templates_that_render_tools_get_them_with_arguments_as_objects():
    tok = tokenizer(TOOLS_TEMPLATE)
    setup = ToolSetup.detect(tok, None)
    assert setup.template_renders_tools and setup.format.name == "hermes"
    p = plan(setup)
    assert [t["function"]["name"] for t in p.template_tools] == ["get_weather", "get_time"]
    prompt = tok.apply_chat_template(p.messages, tools=p.template_tools)
    assert '"arguments": {"city": "Rome"}' in prompt and "<tool>21 C" in prompt
    assert p.messages[0]["role"] == "user"  # nothing injected


def test_templates_without_tool_support_get_the_documented_prompt_and_history_as_text():
    setup = ToolSetup.detect(tokenizer(PLAIN_TEMPLATE), None)
    assert not setup.template_renders_tools
    p = plan(setup)
    assert p.template_tools is None
    system = p.messages[0]
    assert system["role"] == "system" and json.dumps(WEATHER["function"]) in system["content"]
    assert setup.format.example in system["content"]
    assert p.messages[2] == {"role": "assistant", "content": setup.format.render_calls(
        [("get_weather", '{"city": "Rome"}')])}
    assert p.messages[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}
    with_system = plan_chat(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "system", "content": "Be brief."}] + HISTORY, "tools": [WEATHER]}), setup, None)
    assert with_system.messages[0]["content"].startswith("Be brief.\n\n") and with_system.messages[1]["role"] == "user"


def test_family_is_read_off_the_template_unless_given():
    assert ToolSetup.detect(tokenizer(PLAIN_TEMPLATE + "[TOOL_CALLS]"), None).format.name == "mistral"
    assert ToolSetup.detect(tokenizer(PLAIN_TEMPLATE + "<|python_tag|>"), None).format.name == "llama3_json"
    assert ToolSetup.detect(tokenizer(PLAIN_TEMPLATE), "llama3_json").format.name == "llama3_json"


def test_what_each_tool_choice_constrains():
    setup = ToolSetup.detect(tokenizer(PLAIN_TEMPLATE), None)
    fmt = lambda p: p.grammar.value["format"]  # noqa: E731
    auto = plan(setup)
    assert fmt(auto)["type"] == "triggered_tags" and not fmt(auto)["stop_after_first"]
    assert auto.schemas == [("tools.0.function.parameters", WEATHER["function"]["parameters"]),
                            ("tools.1.function.parameters", {"type": "object", "properties": {}})]
    assert fmt(plan(setup, parallel_tool_calls=False))["stop_after_first"]
    required = fmt(plan(setup, tool_choice="required"))
    assert required["type"] == "tags_with_separator" and required["at_least_one"]
    named = fmt(plan(setup, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert [t["begin"] for t in named["tags"]] == ['<tool_call>\n{"name": "get_time", "arguments": ']
    assert named["stop_after_first"]
    composed = plan(setup, response_format={"type": "json_object"})
    assert fmt(composed)["type"] == "or" and composed.grammar_param == "tools and response_format"
    none = plan(setup, tool_choice="none", response_format={"type": "json_object"})
    assert none.tool_format is None and none.grammar.kind == "json_schema" and none.template_tools is None
    assert plan(setup, tool_choice="none").grammar is None


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(TokenizerInfo(["a", "b"], vocab_size=2, stop_token_ids=[1]))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_grammar_accepts_what_its_parser_reads(compiler, name):
    fmt = FORMATS[name]()
    tools = [WEATHER["function"], CLOCK["function"]]
    one = fmt.render_calls([("get_weather", '{"city": "Oslo"}')])
    two = fmt.render_calls([("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")])

    def accepts(f: dict, text: str) -> bool:
        m = GrammarMatcher(compiler.compile_structural_tag({"type": "structural_tag", "format": f}))
        return m.accept_string(text) and m.is_completed()

    assert accepts(fmt.calls(tools, parallel=False), one) and not accepts(fmt.calls(tools, parallel=False), two)
    assert accepts(fmt.calls(tools, parallel=True), two)
    assert not accepts(fmt.calls(tools, parallel=True), fmt.render_calls([("get_weather", '{"town": "Oslo"}')]))
    assert accepts(fmt.text_or_calls(tools, parallel=False), "Let me look. " + one)
    assert accepts(fmt.text_or_calls(tools, parallel=True), "No call needed.")
    parser = fmt.parser()
    deltas = parser.feed("Let me look. " + two) + parser.finish()
    assert parser.num_calls == 2 and [d.name for d in deltas if getattr(d, "name", None)] == ["get_weather",
                                                                                            "get_time"]
