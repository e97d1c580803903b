"""A treadle app served in-process on 127.0.0.1 (uvicorn on a daemon thread), for HTTP tests that also reach into
the engine (scripted logits processors, page accounting)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from treadle.engine.async_engine import AsyncEngine
from treadle.server.app import build_app


@contextmanager
def serving(engine: AsyncEngine) -> Iterator[str]:
    """Serve `engine` on a free port; yields the base URL and stops the server on exit."""
    uv = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def openai_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric_samples(base_url: str, prefix: str) -> dict[str, float]:
    """The /metrics samples whose names start with `prefix`."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith(prefix)}
