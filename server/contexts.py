"""APE cached contexts over HTTP: /v1/contexts routes, and the `contexts` / `ape` extras of chat and completions.

A context is encoded once after the model's shared prefix (engine/ape.py: the chat template up to where the first
user message's content begins, or BOS) and reused by every request that names it. Where things sit in a request:
shared prefix, then the contexts (all at the same positions), then the query = the request's own prompt after the
shared prefix. A chat conversation must therefore render to the shared prefix first (a custom system message
changes the prefix, so it is refused); a completions prompt that does not start with it gets it in front.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from treadle.engine.sampling_params import ApeParams, SamplingParams

from .errors import APIError, bad_request
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ContextCreateRequest,
    ContextDeleted,
    ContextList,
    ContextObject,
    InlineContext,
)
from .state import ServerState, get_state


def _object(info) -> ContextObject:
    return ContextObject(id=info.id, created=info.created, tokens=info.num_tokens, cached=info.cached)


def _not_found(context_id: str) -> APIError:
    return APIError(404, f"The context `{context_id}` does not exist.", param="contexts", code="context_not_found")


async def attach_contexts(state: ServerState, body: ChatCompletionRequest | CompletionRequest, params: SamplingParams) -> None:
    """Resolve the request's `contexts` (ids or inline texts) to token ids and set `params.ape`."""
    if body.contexts is None:
        if body.ape is not None:
            raise bad_request("ape needs contexts", "ape")
        return
    engine = state.engine
    contexts: list[list[int]] = []
    for item in body.contexts:
        if isinstance(item, InlineContext):
            contexts.append(engine.tokenizer.encode(item.text, add_special_tokens=False))
            continue
        found = await engine.get_context(item)
        if found is None:
            raise _not_found(item)
        contexts.append(found[1])
    cfg = engine.cfg
    options = body.ape
    params.ape = ApeParams(
        contexts,
        temperature=options.temperature if options and options.temperature is not None else cfg.ape_temperature,
        scale=options.scale if options and options.scale is not None else cfg.ape_scale,
    )
    params.validate(state.max_logprobs)


def chat_query(state: ServerState, text: str) -> list[int]:
    """The prompt of a chat request with contexts: shared prefix ‖ the rest of the rendered conversation."""
    ids = state.engine.engine.ape.layout.query_from_text(state.engine.tokenizer, text)
    if ids is None:
        raise bad_request("with contexts, the conversation must render to the model's shared prefix first (no "
                          "custom system message): the contexts go right after it", "messages")
    return ids


def install_context_routes(app: FastAPI) -> None:
    @app.post("/v1/contexts")
    async def create(body: ContextCreateRequest, request: Request) -> ContextObject:
        state = get_state(request)
        state.check_model(body.model)
        state.check_healthy()
        if (body.text is None) == (body.tokens is None):
            raise bad_request("send exactly one of text and tokens", "text")
        ids = body.tokens if body.tokens is not None else state.engine.tokenizer.encode(body.text,
                                                                                         add_special_tokens=False)
        return _object(await state.engine.create_context(ids))

    @app.get("/v1/contexts")
    async def list_all(request: Request) -> ContextList:
        state = get_state(request)
        state.check_healthy()
        return ContextList(data=[_object(i) for i in await state.engine.list_contexts()])

    @app.get("/v1/contexts/{context_id}")
    async def get(context_id: str, request: Request) -> ContextObject:
        state = get_state(request)
        state.check_healthy()
        found = await state.engine.get_context(context_id)
        if found is None:
            raise _not_found(context_id)
        return _object(found[0])

    @app.delete("/v1/contexts/{context_id}")
    async def delete(context_id: str, request: Request) -> ContextDeleted:
        state = get_state(request)
        state.check_healthy()
        if not await state.engine.delete_context(context_id):
            raise _not_found(context_id)
        return ContextDeleted(id=context_id)
