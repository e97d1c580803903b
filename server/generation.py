"""One API request's engine requests, started together and read as one stream.

A request becomes one engine request per prompt (a completions batch has several; `n > 1` is forked inside the
engine). `start()` waits for every prompt's first output, so admission errors (queue full, prompt too long)
become a proper HTTP status before a streaming response has sent its headers. Closing the run, by `aclose()`
or by cancellation when the client goes away, closes every engine generator, which aborts the request and
frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from treadle.engine.async_engine import AsyncEngine
from treadle.engine.outputs import PathText, RequestOutput, TokenLogprob
from treadle.engine.sampling_params import SamplingParams

from .metrics import RequestTimer, ServerMetrics
from .protocol import PathText as PathTextModel
from .protocol import PromptTokensDetails, Usage

_DONE = object()


class GenerationRun:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        priority: int,
        arrival: float,
    ):
        self.num_prompts = len(prompts)
        multi = len(prompts) > 1
        self._gens = [
            engine.generate(f"{request_id}-{i}" if multi else request_id, ids, params, priority)
            for i, ids in enumerate(prompts)
        ]
        self._timers = [metrics.timer(arrival) for _ in prompts]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._buffered: deque[tuple[int, object]] = deque()  # read by start(), not yet yielded

    async def start(self) -> None:
        """Submit every prompt and wait for each one's first output; raise the first admission error."""
        self._pumps = [asyncio.create_task(self._pump(i, gen)) for i, gen in enumerate(self._gens)]
        started: set[int] = set()
        try:
            while len(started) < len(self._gens):
                i, item = await self._queue.get()
                self._buffered.append((i, item))
                if isinstance(item, BaseException):
                    raise item
                started.add(i)
        except BaseException:
            await self.aclose()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) pairs in arrival order; raises an engine error that arrives mid-stream."""
        remaining = len(self._gens)
        while remaining:
            if self._buffered:
                i, item = self._buffered.popleft()
            else:
                i, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _DONE:
                remaining -= 1
                continue
            yield i, item

    async def _pump(self, index: int, gen: AsyncIterator[RequestOutput]) -> None:
        timer: RequestTimer = self._timers[index]
        try:
            async for out in gen:
                timer.observe(out)
                self._queue.put_nowait((index, out))
            self._queue.put_nowait((index, _DONE))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the reader, which maps it to an HTTP error
            self._queue.put_nowait((index, exc))
        finally:
            await gen.aclose()

    async def aclose(self) -> None:
        for task in self._pumps:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def path_models(items: list[PathText] | None) -> list[PathTextModel] | None:
    return None if items is None else [PathTextModel(path=p.path, text=p.text) for p in items]


class UsageTracker:
    """Token counts of a request: the prompt once per prompt, completions summed over every choice."""

    def __init__(self) -> None:
        self._prompt: dict[int, int] = {}
        self._cached: dict[int, int] = {}
        self._generated: dict[tuple[int, int], int] = {}
        self._depth: dict[tuple[int, int], int] = {}  # parallel generation: positions used per choice

    def update(self, prompt_index: int, out: RequestOutput) -> None:
        self._prompt[prompt_index] = out.num_prompt_tokens
        self._cached[prompt_index] = out.num_cached_tokens
        for c in out.outputs:
            self._generated[prompt_index, c.index] = c.num_generated_tokens
            if c.depth is not None:
                self._depth[prompt_index, c.index] = c.depth

    def usage(self) -> Usage:
        prompt = sum(self._prompt.values())
        completion = sum(self._generated.values())
        usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached.values())),
        )
        if self._depth:
            usage.completion_depth = sum(self._depth.values())
        return usage


@dataclass
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    branches: list[PathText] | None = None  # parallel generation: every path's text


async def collect(run: GenerationRun, n: int) -> tuple[list[ChoiceResult], Usage]:
    """Read a started run to the end; choice k of prompt i lands at index i * n + k."""
    choices = [ChoiceResult() for _ in range(run.num_prompts * n)]
    usage = UsageTracker()
    async for p, out in run:
        usage.update(p, out)
        for c in out.outputs:
            choice = choices[p * n + c.index]
            choice.text.append(c.text)
            if c.logprobs:
                choice.logprobs.extend(c.logprobs)
            if c.finish_reason is not None:
                choice.finish_reason = c.finish_reason
                choice.stop_reason = c.stop_reason
                choice.branches = c.branches
    return choices, usage.usage()


async def run_to_end(run: GenerationRun, n: int) -> tuple[list[ChoiceResult], Usage]:
    """Start a run and collect it (the non-streaming path); the run is closed however this ends."""
    try:
        await run.start()
        return await collect(run, n)
    finally:
        await run.aclose()
