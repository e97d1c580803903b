"""Tool calling on any model: validates `tools` / `tool_choice`, renders tools into the prompt, and builds the
grammar that constrains the answer.

Prompt. If the model's chat template renders tools (detected once: rendering with a probe tool changes the
prompt), tools and tool-call history go through the template. Otherwise (SmolLM2, the default model, for one)
treadle adds TOOL_PROMPT as a system message, or appends it to the conversation's own system message, and
writes past calls and results as text in the format the model is asked to use:

    You can call functions to answer the user. The functions, as JSON schemas:
    {"name": "get_weather", "description": "...", "parameters": {...}}
    To call a function, reply with:
    <tool_call>
    {"name": <function name>, "arguments": <arguments as a JSON object>}
    </tool_call>
    Answer in plain text when no function is needed.

Grammar (TagDispatch through structural tags): `auto` is free text in which the format's trigger forces a call
of one of the tools with schema-valid arguments; `required` is one or more calls and nothing else; a named tool
is exactly one call of it; `none` renders no tools and constrains nothing. A response format composes with
`auto`: the answer is either text that follows it, or calls. `parallel_tool_calls=false` allows one call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from treadle.engine.guided import GrammarSpec
from treadle.engine.tokenizer import ChatTemplateError, Tokenizer

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from .structured import OutputConstraint, structural_tag
from .tool_parsers import FORMATS, ToolCallFormat, tool_parameters

log = logging.getLogger("treadle.server")

TOOL_PROMPT = """You can call functions to answer the user. The functions, as JSON schemas:
{functions}
To call a function, reply with:
{example}
Answer in plain text when no function is needed."""

_PROBE_TOOL = {"type": "function", "function": {"name": "treadle_probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}


@dataclass
class ToolSetup:
    """How the served model calls tools, decided once at startup."""

    format: ToolCallFormat
    template_renders_tools: bool

    @classmethod
    def detect(cls, tokenizer: Tokenizer, parser: str | None) -> ToolSetup:
        """`parser` (--tool-call-parser) wins; else the family is read off the chat template, hermes by default."""
        template = tokenizer.chat_template or ""
        if parser is None:
            if "[TOOL_CALLS]" in template:
                parser = "mistral"
            elif "<|python_tag|>" in template or '"parameters"' in template:
                parser = "llama3_json"
            else:
                parser = "hermes"
        probe = [{"role": "user", "content": "hi"}]
        try:
            renders = (tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL])
                       != tokenizer.apply_chat_template(probe))
        except ChatTemplateError:
            renders = False
        if renders and parser == "hermes" and "<tool_call>" not in template:
            log.warning("the chat template renders tools in an unknown format; tool calls are parsed as hermes "
                        "(set --tool-call-parser if the model uses another format)")
        return cls(FORMATS[parser](), renders)


@dataclass
class ChatPlan:
    """What the chat handler does with a request's tools and output constraint."""

    messages: list[dict[str, Any]]  # for the chat template
    template_tools: list[dict[str, Any]] | None
    grammar: GrammarSpec | None
    grammar_param: str | None  # the request field the grammar enforces, for error messages
    schemas: list[tuple[str, Any]]  # (param, JSON schema) pairs the grammar embeds, checked before compiling
    tool_format: ToolCallFormat | None  # parse tool calls out of the output


def plan_chat(body: ChatCompletionRequest, setup: ToolSetup, constraint: OutputConstraint | None) -> ChatPlan:
    tools = _checked_tools(body)
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise bad_request("tool_choice requires tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t["name"] == choice.function.name]
        if not named:
            raise bad_request(f"tool_choice names the function '{choice.function.name}', which is not in tools "
                              f"({', '.join(t['name'] for t in tools)})", "tool_choice")
    messages = template_messages(body.messages, setup)
    if choice == "none":
        if constraint is None:
            return ChatPlan(messages, None, None, None, [], None)
        return ChatPlan(messages, None, constraint.spec, constraint.param, constraint.schemas, None)

    fmt = setup.format
    parallel = body.parallel_tool_calls
    if isinstance(choice, NamedToolChoice):
        grammar_format = fmt.calls(named, parallel=False)
    elif choice == "required":
        grammar_format = fmt.calls(tools, parallel)
    elif constraint is not None:
        grammar_format = {"type": "or", "elements": [constraint.format, fmt.calls(tools, parallel)]}
    else:
        grammar_format = fmt.text_or_calls(tools, parallel)
    template_tools = None
    if setup.template_renders_tools:
        template_tools = [{"type": "function", "function": t} for t in tools]
    else:
        messages = _with_tool_prompt(messages, tools, fmt)
    schemas = [(f"tools.{i}.function.parameters", tool_parameters(t)) for i, t in enumerate(tools)]
    param = "tools"
    if constraint is not None and choice == "auto":
        schemas += constraint.schemas
        param = f"tools and {constraint.param}"
    return ChatPlan(messages, template_tools, structural_tag(grammar_format), param, schemas, fmt)


def _checked_tools(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The functions as plain dicts, names unique (their parameter schemas are checked with the compile)."""
    if body.tools is None:
        return []
    if not body.tools:
        raise bad_request("tools must list at least one function (or be left out)", "tools")
    tools = []
    seen = set()
    for i, tool in enumerate(body.tools):
        fn = tool.function.model_dump(exclude_none=True)
        if fn["name"] in seen:
            raise bad_request(f"two tools are named '{fn['name']}'", f"tools.{i}.function.name")
        seen.add(fn["name"])
        tools.append(fn)
    return tools


def template_messages(messages: list[ChatMessage], setup: ToolSetup) -> list[dict[str, Any]]:
    """Message dicts for the template. Templates that render tools get past calls with arguments as objects (as
    HF templates expect); others get calls written out in the model's format and results as user turns."""
    out = []
    for i, m in enumerate(messages):
        d = m.template_dict(i)
        calls = d.pop("tool_calls", None)
        if calls:
            parsed = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            for j, (_, args) in enumerate(parsed):
                try:
                    json.loads(args)
                except json.JSONDecodeError:
                    raise bad_request("tool call arguments must be JSON text",
                                      f"messages.{i}.tool_calls.{j}.function.arguments") from None
            if setup.template_renders_tools:
                d["tool_calls"] = [{**c, "function": {"name": n, "arguments": json.loads(a)}}
                                   for c, (n, a) in zip(calls, parsed)]
            else:
                written = setup.format.render_calls(parsed)
                d["content"] = f"{d['content']}\n{written}" if d["content"] else written
        if m.role == "tool" and not setup.template_renders_tools:
            d = {"role": "user", "content": f"<tool_response>\n{d['content']}\n</tool_response>"}
        out.append(d)
    return out


def _with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                      fmt: ToolCallFormat) -> list[dict[str, Any]]:
    functions = "\n".join(json.dumps({k: t[k] for k in ("name", "description", "parameters") if k in t})
                          for t in tools)
    prompt = TOOL_PROMPT.format(functions=functions, example=fmt.example)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{prompt}"}] + messages[1:]
    return [{"role": "system", "content": prompt}] + messages
