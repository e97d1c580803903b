"""The FastAPI app: OpenAI routes, tokenizer routes, health, metrics and version, around one AsyncEngine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from treadle.engine.async_engine import AsyncEngine
from treadle.engine.sampling_params import ParallelParams

from .auth import APIKeyMiddleware
from .chat import create_chat_completion, render_chat
from .completions import create_completion
from .contexts import install_context_routes
from .errors import APIError, bad_request, install_error_handlers
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .state import ServerState, get_state
from .tools import ToolSetup, template_messages


def treadle_version() -> str:
    try:
        return version("treadle")
    except PackageNotFoundError:
        return "unknown"


def build_app(
    engine: AsyncEngine,
    *,
    api_key: str | None = None,
    max_logprobs: int = 20,
    tool_call_parser: str | None = None,
    grammar_compile_timeout: float = 5.0,
    parallel: ParallelParams | None = None,
) -> FastAPI:
    """The app serving `engine`; its lifespan starts the engine's step thread and shuts it down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="treadle", version=treadle_version(), lifespan=lifespan)
    app.state.treadle = ServerState(engine, ServerMetrics(engine.stats, engine.model_name), max_logprobs,
                                    ToolSetup.detect(engine.tokenizer, tool_call_parser), grammar_compile_timeout,
                                    parallel)
    started = int(time.time())
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    app.post("/v1/chat/completions")(create_chat_completion)
    app.post("/v1/completions")(create_completion)
    install_context_routes(app)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        state = get_state(request)
        card = ModelCard(id=state.model_name, created=started, max_model_len=state.engine.max_model_len)
        return ModelList(data=[card])

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> ModelCard:
        state = get_state(request)
        state.check_model(model)
        return ModelCard(id=state.model_name, created=started, max_model_len=state.engine.max_model_len)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if not get_state(request).engine.is_healthy:
            return APIError(503, "The engine is not running.", code="engine_unavailable", retry_after=5).response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version_route() -> JSONResponse:
        return JSONResponse({"version": treadle_version()})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        state = get_state(request)
        state.check_model(body.model)
        tokenizer = state.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = render_chat(tokenizer, template_messages(body.messages, state.tool_setup),
                              body.add_generation_prompt)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        state = get_state(request)
        state.check_model(body.model)
        vocab = state.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens, skip_special_tokens=False))

    return app
