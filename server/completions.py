"""POST /v1/completions: one or several prompts (text or token ids), each continued n times."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from treadle.engine.outputs import TokenLogprob
from treadle.engine.tokenizer import Tokenizer

from . import sse
from .contexts import attach_contexts
from .disconnect import ClientDisconnected, unless_disconnected
from .errors import bad_request, from_exception
from .generation import GenerationRun, UsageTracker, path_models, run_to_end
from .protocol import LOGPROB_FLOOR, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .state import get_state
from .structured import compile_constraint, output_constraint


def prompt_token_ids(tokenizer: Tokenizer, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Every prompt of the request as token ids; text is encoded with the tokenizer's special tokens (BOS)."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    ids = [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in prompts]
    if any(not p for p in ids):
        raise bad_request("prompt must not be empty", "prompt")
    return ids


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy shape; `text_offset` counts characters from the start of the choice's text (at `offset`)."""
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in lps],
        token_logprobs=[max(t.logprob, LOGPROB_FLOOR) for t in lps],
        # The sampled token is always listed, so there may be logprobs + 1 entries, as OpenAI documents.
        top_logprobs=[
            {**{text: max(lp, LOGPROB_FLOOR) for _, text, lp in t.top}, t.token: max(t.logprob, LOGPROB_FLOOR)}
            for t in lps
        ],
        text_offset=offsets,
    )


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    state.check_model(body.model)
    state.check_healthy()
    params = body.to_sampling_params(state.max_logprobs, state.parallel)
    prompts = prompt_token_ids(state.engine.tokenizer, body.prompt)
    await attach_contexts(state, body, params)  # the engine puts the shared prefix in front of prompts without it
    constraint = output_constraint(body)
    if params.parallel_enabled and constraint is not None:
        raise bad_request("parallel generation does not support structured outputs", "parallel")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    want_logprobs = params.logprobs is not None
    try:
        if constraint is not None:
            compiling = compile_constraint(state.guided, constraint.spec, constraint.param,
                                           state.grammar_compile_timeout, constraint.schemas)
            params.grammar = await unless_disconnected(request, compiling)
        run = GenerationRun(state.engine, state.metrics, request_id, prompts, params, body.priority, arrival)
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
    response = CompletionResponse(
        id=request_id,
        object="text_completion",
        created=int(time.time()),
        model=state.model_name,
        choices=[
            CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=completion_logprobs(c.logprobs, 0) if want_logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage,
    )
    for answer, c in zip(response.choices, choices):
        if c.branches is not None:  # parallel generation (fields only set here appear in the answer)
            answer.branches = path_models(c.branches)
    return JSONResponse(response.model_dump(exclude_unset=True))


async def _stream(
    run: GenerationRun, request_id: str, model: str, n: int, want_logprobs: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: CompletionChoice) -> bytes:
        return sse.event(CompletionResponse(id=request_id, object="text_completion", created=created, model=model,
                                            choices=[choice], **extra))

    usage = UsageTracker()
    offsets = [0] * (run.num_prompts * n)  # characters streamed so far per choice, for text_offset
    try:
        async for p, out in run:
            usage.update(p, out)
            for c in out.outputs:
                index = p * n + c.index
                if c.text or c.logprobs or c.paths:
                    logprobs = None
                    if want_logprobs:
                        logprobs = completion_logprobs(c.logprobs or [], offsets[index])
                        offsets[index] += sum(len(t.token) for t in c.logprobs or [])
                    choice = CompletionChoice(index=index, text=c.text, logprobs=logprobs, finish_reason=None)
                    if c.paths:  # parallel generation: each path's new text alongside the document's
                        choice.paths = path_models(c.paths)
                    yield chunk(choice)
                if c.finish_reason is not None:
                    yield chunk(CompletionChoice(index=index, text="", logprobs=None, finish_reason=c.finish_reason,
                                                 stop_reason=c.stop_reason))
        if include_usage:
            yield sse.event(CompletionResponse(id=request_id, object="text_completion", created=created,
                                               model=model, choices=[], usage=usage.usage()))
    except Exception as exc:  # the 200 is already out: report the failure in-band
        yield sse.error_event(from_exception(exc))
    yield sse.DONE
