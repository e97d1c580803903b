"""What every handler needs, stored once on the app: the engine, the metrics, and the checks that gate a request."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from treadle.engine.async_engine import AsyncEngine
from treadle.engine.guided import GuidedDecoder
from treadle.engine.sampling_params import ParallelParams

from .errors import APIError
from .metrics import ServerMetrics
from .tools import ToolSetup


@dataclass
class ServerState:
    engine: AsyncEngine
    metrics: ServerMetrics
    max_logprobs: int
    tool_setup: ToolSetup
    grammar_compile_timeout: float  # seconds of grammar-worker time a request's constraint may take to compile
    parallel: ParallelParams | None = None  # Multiverse defaults for requests that do not send `parallel`

    @property
    def guided(self) -> GuidedDecoder:
        return self.engine.engine.guided

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.engine.model_name:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")

    def check_healthy(self) -> None:
        if not self.engine.is_healthy:
            raise APIError(503, "The engine is not running.", code="engine_unavailable", retry_after=5)


def get_state(request: Request) -> ServerState:
    return request.app.state.treadle
