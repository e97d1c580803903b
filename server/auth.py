"""Bearer API-key check for every route except /health, as plain ASGI middleware.

Plain ASGI (not BaseHTTPMiddleware) keeps the receive channel untouched, which the disconnect watcher relies on.
Keys are compared as SHA-256 digests with hmac.compare_digest so the time taken says nothing about the key.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        error = self._check(dict(scope["headers"]).get(b"authorization"))
        if error is None:
            await self.app(scope, receive, send)
            return
        response = APIError(401, error, code="invalid_api_key").response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _check(self, header: bytes | None) -> str | None:
        """None if the key matches, else the message to send back (which never echoes what was sent)."""
        if not header:
            return "Missing API key: send it as 'Authorization: Bearer <key>'."
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "Malformed Authorization header: expected 'Bearer <key>'."
        if not hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest):
            return "Incorrect API key provided."
        return None
