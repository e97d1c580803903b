"""asyncio front of the engine: the step loop runs on its own thread so the event loop never blocks on compute.

Requests and aborts cross into the engine thread through a queue; outputs come back to each request's
asyncio.Queue with `call_soon_threadsafe`. Torch releases the GIL inside its kernels, so `/health` and
`/metrics` answer while a long prefill runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import torch

from .ape import ContextInfo
from .config import EngineConfig
from .engine import LLMEngine
from .loader import load_model
from .multiverse_tags import MultiverseTags
from .outputs import EngineStats, RequestOutput
from .sampling_params import InvalidParameterError, SamplingParams
from .sequence import Request

log = logging.getLogger("treadle.engine")
T = TypeVar("T")


class EngineRequestError(Exception):
    """A request the engine refuses at admission; the server maps each kind to a status code."""


class QueueFullError(EngineRequestError):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class PromptTooLongError(EngineRequestError):
    pass


class EngineDeadError(EngineRequestError):
    pass


class AsyncEngine:
    def __init__(self, cfg: EngineConfig, progress: bool = True, multiverse_tags: MultiverseTags | None = None):
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        loaded = load_model(cfg, progress=progress)
        self.cfg = cfg
        self.engine = LLMEngine(cfg, loaded, multiverse_tags)
        self.engine.runner.reserve_core_for_server()
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.model_name = cfg.served_model_name or loaded.name
        self.max_model_len = self.engine.max_model_len
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="treadle-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.engine.close()

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    def stats(self) -> EngineStats:
        return self.engine.published_stats

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._drain_inbox()
                if not engine.has_work():
                    engine.published_stats = engine.snapshot_stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                engine.step()
                engine.published_stats = engine.snapshot_stats()
        except BaseException as exc:  # the loop is dead: fail every live request instead of hanging it
            log.exception("engine step failed")
            self._error = exc
            dead = EngineDeadError(f"engine failed: {exc!r}")
            for req in list(engine.requests.values()):
                if req.on_output is not None:
                    req.on_output(dead)
            self._drain_inbox(reject=dead)

    def _drain_inbox(self, reject: BaseException | None = None) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                if reject is None:
                    self.engine.abort(item)
                continue
            if kind == "call":
                fn, fut = item
                if reject is not None:
                    fut.set_exception(reject)
                    continue
                try:
                    fut.set_result(fn())
                except Exception as exc:  # the caller gets it; the loop goes on
                    fut.set_exception(exc)
                continue
            req: Request = item
            if reject is not None:
                req.on_output(reject)
                continue
            try:
                self.engine.add_request(req)
            except Exception as exc:  # one bad request must not take the loop down
                req.on_output(exc)

    # ---- public API ------------------------------------------------------------------------------------------
    def _admission_check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        params.validate(self.cfg.max_logprobs)
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidParameterError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidParameterError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if params.ape is not None:  # checked on the prompt as the engine will run it: the shared prefix first
            store = self.engine.ape
            prompt_token_ids = store.layout.request_ids(prompt_token_ids)
            store.check(len(prompt_token_ids), params.ape, params.max_tokens)
            if any(min(c) < 0 or max(c) >= vocab for c in params.ape.contexts):
                raise InvalidParameterError(f"context token ids must be in [0, {vocab})", "contexts")
            n = len(prompt_token_ids) + max(len(c) for c in params.ape.contexts)
        limit = self.max_model_len
        if n >= limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {n} tokens."
            )
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion)."
            )
        queued = self._inbox.qsize() + self.engine.scheduler.num_waiting
        if queued >= self.cfg.max_waiting_requests:
            raise QueueFullError(
                f"The server is overloaded: {queued} requests are waiting. Retry later.", retry_after=1.0
            )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutput deltas; stopping the iteration early aborts the request and frees its KV."""
        self._admission_check(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            priority=priority,
            arrival_time=time.monotonic(),
            on_output=lambda out: loop.call_soon_threadsafe(outbox.put_nowait, out),
        )
        self._inbox.put(("add", req))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await outbox.get()
                if isinstance(out, BaseException):
                    finished = True  # the engine already dropped it
                    raise out
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- APE cached contexts (engine/ape.py) -----------------------------------------------------------------
    async def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps (the context store is the engine thread's alone)."""
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, fut)))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    async def create_context(self, token_ids: list[int]) -> ContextInfo:
        """Register a context (kept until deleted) and start encoding it; the same tokens give the same id."""
        vocab = self.model_config.vocab_size
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab):
            raise InvalidParameterError(f"context token ids must be in [0, {vocab})", "tokens")
        store = self.engine.ape
        store.check_context(token_ids)
        return await self._on_engine_thread(lambda: store.info(store.put(token_ids, pinned=True)))

    async def list_contexts(self) -> list[ContextInfo]:
        store = self.engine.ape
        return await self._on_engine_thread(lambda: [store.info(e) for e in store.entries.values() if e.pinned])

    async def get_context(self, context_id: str) -> tuple[ContextInfo, list[int]] | None:
        """A created context's info and tokens; None if unknown."""
        store = self.engine.ape

        def get():
            entry = store.get(context_id.removeprefix("ctx_"))
            return None if entry is None or not entry.pinned else (store.info(entry), list(entry.token_ids))

        return await self._on_engine_thread(get)

    async def delete_context(self, context_id: str) -> bool:
        store = self.engine.ape

        def delete():
            entry = store.get(context_id.removeprefix("ctx_"))
            return entry is not None and entry.pinned and store.delete(entry.key)

        return await self._on_engine_thread(delete)
