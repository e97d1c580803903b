"""POST /v1/chat/completions: render the conversation with the model's chat template, generate, answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from treadle.engine.outputs import TokenLogprob
from treadle.engine.tokenizer import ChatTemplateError, Tokenizer

from . import sse
from .contexts import attach_contexts, chat_query
from .disconnect import ClientDisconnected, unless_disconnected
from .errors import bad_request, from_exception
from .generation import GenerationRun, UsageTracker, path_models, run_to_end
from .protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    LOGPROB_FLOOR,
    ToolCall,
)
from .state import get_state
from .structured import compile_constraint, output_constraint
from .tool_parsers import ContentDelta, Delta, MistralFormat, ToolCallFormat
from .tools import plan_chat


def render_chat_text(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                     tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of the templated conversation; the template already holds the special tokens it wants."""
    text = render_chat_text(tokenizer, messages, add_generation_prompt, tools)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_logprobs(lps: list[TokenLogprob]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.token,
                logprob=max(t.logprob, LOGPROB_FLOOR),
                bytes=list(t.token.encode()),
                top_logprobs=[
                    ChatTopLogprob(token=text, logprob=max(lp, LOGPROB_FLOOR), bytes=list(text.encode()))
                    for _, text, lp in t.top
                ],
            )
            for t in lps
        ]
    )


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    state.check_model(body.model)
    state.check_healthy()
    params = body.to_sampling_params(state.max_logprobs, state.parallel)
    plan = plan_chat(body, state.tool_setup, output_constraint(body))
    if params.parallel_enabled and (plan.grammar is not None or plan.tool_format is not None):
        raise bad_request("parallel generation does not support tools or structured outputs", "parallel")
    await attach_contexts(state, body, params)
    if params.ape is None:
        prompt = render_chat(state.engine.tokenizer, plan.messages, body.add_generation_prompt, plan.template_tools)
    else:
        prompt = chat_query(state, render_chat_text(state.engine.tokenizer, plan.messages, body.add_generation_prompt,
                                                    plan.template_tools))
    if isinstance(plan.tool_format, MistralFormat):
        params.skip_special_tokens = False  # [TOOL_CALLS] is a special token
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    want_logprobs = params.logprobs is not None
    try:
        if plan.grammar is not None:
            compiling = compile_constraint(state.guided, plan.grammar, plan.grammar_param,
                                           state.grammar_compile_timeout, plan.schemas)
            params.grammar = await unless_disconnected(request, compiling)
        run = GenerationRun(state.engine, state.metrics, request_id, [prompt], params, body.priority, arrival)
        if body.stream:
            await unless_disconnected(request, run.start())
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream(run, request_id, state.model_name, params.n, want_logprobs, include_usage,
                             plan.tool_format)
            return sse.EventStreamResponse(events, on_close=run.aclose)
        choices, usage = await unless_disconnected(request, run_to_end(run, params.n))
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        raise from_exception(exc) from None
    answers = []
    for i, c in enumerate(choices):
        message = _message("".join(c.text), plan.tool_format)
        if c.branches is not None:
            message.branches = path_models(c.branches)
        answers.append(ChatChoice(
            index=i,
            message=message,
            logprobs=chat_logprobs(c.logprobs) if want_logprobs else None,
            finish_reason="tool_calls" if c.finish_reason == "stop" and message.tool_calls else c.finish_reason,
            stop_reason=c.stop_reason,
        ))
    response = ChatCompletionResponse(id=request_id, object="chat.completion", created=int(time.time()),
                                      model=state.model_name, choices=answers, usage=usage)
    return JSONResponse(response.model_dump(exclude_unset=True))


def _message(text: str, tool_format: ToolCallFormat | None) -> ChatResponseMessage:
    """The answer as OpenAI returns it: tool calls parsed out of the text, content None when only calls remain."""
    if tool_format is None:
        return ChatResponseMessage(role="assistant", content=text)
    parser = tool_format.parser()
    content = ""
    calls: list[ToolCall] = []
    for d in parser.feed(text) + parser.finish():
        if isinstance(d, ContentDelta):
            content += d.text
        elif d.id is not None:
            calls.append(ToolCall(id=d.id, type="function", function=FunctionCall(name=d.name, arguments="")))
        else:
            calls[d.index].function.arguments += d.arguments
    if not calls:
        return ChatResponseMessage(role="assistant", content=content)
    return ChatResponseMessage(role="assistant", content=content or None, tool_calls=calls)


async def _stream(
    run: GenerationRun,
    request_id: str,
    model: str,
    n: int,
    want_logprobs: bool,
    include_usage: bool,
    tool_format: ToolCallFormat | None,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    extra = {"usage": None} if include_usage else {}  # OpenAI sends usage: null on every chunk but the last

    def chunk(choices: list[ChatChunkChoice]) -> bytes:
        return sse.event(ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                             model=model, choices=choices, **extra))

    usage = UsageTracker()
    num_choices = run.num_prompts * n
    parsers = [tool_format.parser() if tool_format is not None else None for _ in range(num_choices)]
    held: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]  # logprobs of text a parser holds back

    def take_logprobs(index: int) -> ChatChoiceLogprobs | None:
        lps, held[index] = held[index], []
        return chat_logprobs(lps) if want_logprobs and lps else None

    try:
        for i in range(num_choices):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                         finish_reason=None)])
        async for p, out in run:
            usage.update(p, out)
            for c in out.outputs:
                index = p * n + c.index
                parser = parsers[index]
                held[index].extend(c.logprobs or [])
                if parser is None:
                    deltas: list[Delta] = [ContentDelta(c.text)] if c.text or c.logprobs else []
                else:
                    deltas = parser.feed(c.text) + (parser.finish() if c.finish_reason is not None else [])
                if c.paths:  # parallel generation: the document's next text, and each path's new text
                    deltas = []
                    delta = ChatDelta(content=c.text, paths=path_models(c.paths))
                    yield chunk([ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)])
                for d in deltas:
                    yield chunk([ChatChunkChoice(index=index, delta=_delta(d), logprobs=take_logprobs(index),
                                                 finish_reason=None)])
                if c.finish_reason is not None:
                    reason = c.finish_reason
                    if reason == "stop" and parser is not None and parser.num_calls:
                        reason = "tool_calls"
                    yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=take_logprobs(index),
                                                 finish_reason=reason, stop_reason=c.stop_reason)])
        if include_usage:
            yield sse.event(ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                                model=model, choices=[], usage=usage.usage()))
    except Exception as exc:  # the 200 is already out: report the failure in-band
        yield sse.error_event(from_exception(exc))
    yield sse.DONE


def _delta(d: Delta) -> ChatDelta:
    if isinstance(d, ContentDelta):
        return ChatDelta(content=d.text)
    if d.id is not None:
        call = DeltaToolCall(index=d.index, id=d.id, type="function",
                             function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
    else:
        call = DeltaToolCall(index=d.index, function=DeltaFunctionCall(arguments=d.arguments))
    return ChatDelta(tool_calls=[call])
