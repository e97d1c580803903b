"""OpenAI-shaped errors: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

`type` and `code` follow the OpenAI API's vocabulary so that clients that branch on them (e.g. on
`context_length_exceeded`) work unchanged; `Retry-After` rides along on 429 and 503 because the official
clients honour it when they retry.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle.engine.async_engine import EngineDeadError, EngineRequestError, PromptTooLongError, QueueFullError
from treadle.engine.sampling_params import InvalidParameterError

log = logging.getLogger("treadle.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = None
        if self.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """Map an engine-side or unexpected exception; unexpected ones are logged and reported without detail."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameterError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="rate_limit_exceeded", retry_after=exc.retry_after)
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is not running.", code="engine_unavailable", retry_after=5)
    if isinstance(exc, EngineRequestError):
        return bad_request(str(exc))
    log.error("unhandled error while serving a request", exc_info=exc)
    return APIError(500, "Internal server error.")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    # A value that fits none of a union's types yields one error per type, each under the field's location plus
    # the type's name: report the field itself, with every type's complaint.
    locs = [tuple(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
    same_field = [i for i, loc in enumerate(locs) if loc[:1] == locs[0][:1]]
    field = locs[0]
    for i in same_field[1:]:
        n = 0
        while n < min(len(field), len(locs[i])) and field[n] == locs[i][n]:
            n += 1
        field = field[:n]
    param = ".".join(field) or None
    where = f" at '{param}'" if param else ""
    messages = "; ".join(dict.fromkeys(errors[i].get("msg", "invalid value") for i in same_field))
    return bad_request(f"Invalid request{where}: {messages}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    async def on_mapped(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidParameterError, on_mapped)
    app.add_exception_handler(EngineRequestError, on_mapped)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_mapped)  # a 500 that says nothing about the failure
