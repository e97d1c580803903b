"""POST /v1/chat/completions: render the conversation with the model's chat template, generate, answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from treadle.engine.outputs import TokenLogprob
from treadle.engine.tokenizer import ChatTemplateError, Tokenizer

from . import sse
from .disconnect import ClientDisconnected, unless_disconnected
from .errors import bad_request, from_exception
from .generation import GenerationRun, UsageTracker, run_to_end
from .protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    LOGPROB_FLOOR,
)
from .state import get_state


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of the templated conversation; the template already holds the special tokens it wants."""
    dicts = [m.template_dict(i) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt, tools=tools)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
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
    params = body.to_sampling_params(state.max_logprobs)
    prompt = render_chat(state.engine.tokenizer, body.messages, body.add_generation_prompt, body.tools)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    run = GenerationRun(state.engine, state.metrics, request_id, [prompt], params, body.priority, arrival)
    want_logprobs = params.logprobs is not None
    try:
        if body.stream:
            await unless_disconnected(request, run.start())
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream(run, request_id, state.model_name, params.n, want_logprobs, include_usage)
            return sse.EventStreamResponse(events, on_close=run.aclose)
        choices, usage = await unless_disconnected(request, run_to_end(run, params.n))
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        raise from_exception(exc) from None
    response = ChatCompletionResponse(
        id=request_id,
        object="chat.completion",
        created=int(time.time()),
        model=state.model_name,
        choices=[
            ChatChoice(
                index=i,
                message=ChatResponseMessage(role="assistant", content="".join(c.text)),
                logprobs=chat_logprobs(c.logprobs) if want_logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage,
    )
    return JSONResponse(response.model_dump())


async def _stream(
    run: GenerationRun, request_id: str, model: str, n: int, want_logprobs: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())
    extra = {"usage": None} if include_usage else {}  # OpenAI sends usage: null on every chunk but the last

    def chunk(choices: list[ChatChunkChoice]) -> bytes:
        return sse.event(ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                             model=model, choices=choices, **extra))

    usage = UsageTracker()
    try:
        for i in range(run.num_prompts * n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                         finish_reason=None)])
        async for p, out in run:
            usage.update(p, out)
            for c in out.outputs:
                index = p * n + c.index
                if c.text or c.logprobs:
                    logprobs = chat_logprobs(c.logprobs or []) if want_logprobs else None
                    yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=c.text), logprobs=logprobs,
                                                 finish_reason=None)])
                if c.finish_reason is not None:
                    yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=None,
                                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
        if include_usage:
            yield sse.event(ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                                model=model, choices=[], usage=usage.usage()))
    except Exception as exc:  # the 200 is already out: report the failure in-band
        yield sse.error_event(from_exception(exc))
    yield sse.DONE
