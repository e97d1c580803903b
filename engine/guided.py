"""Grammar-constrained decoding in the engine: compiles off the event loop, one matcher per sequence, token
masks built on a worker thread while the model runs.

Everything that touches grammar-engine state (compiling, warming a new grammar's first mask, accepting sampled
tokens, filling masks) runs on one worker thread, except accepting a stop token. The grammar engine grows shared
state lazily (per-grammar configuration tables, the compiler's cross-grammar caches), so those calls must not
interleave; one thread serializes them without locks. Masks for step t+1 depend only on the token sampled at step
t, so the engine submits them (with that token, accepted in front of the fill) around the forward of step t+1 and
collects them after: torch releases the GIL in its kernels, and the fill overlaps the forward. A stop token, the
only one that can end a grammar, is accepted on the engine thread at once, outside any fill (fills and accepts of
one step never overlap).

A compile has a time budget, counted from when the worker starts it (queueing behind other compiles is free).
Python threads cannot be killed, so an over-budget compile is interrupted by raising an exception inside the
worker thread (`PyThreadState_SetAsyncExc`), which frees the worker for the masks of running requests: a
pathological grammar delays their steps by at most the budget, and it is remembered so that retries fail at once.

With `workers` > 0 (the GPU default) matchers live in worker processes instead (grammar_procs.py): there the
engine's own host work is a large part of each step, and a fill on a thread of this process would take turns with
it on the GIL rather than overlap it. Compiling stays here, where its budget and errors are enforced, and each
compiled grammar is broadcast to the workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import json
import logging
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from treadle.grammars import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarMatcher,
    TokenizerInfo,
    allocate_token_bitmask,
)

from .grammar_procs import GrammarProcessPool, ProcessMaskJob, fill_row
from .sequence import Sequence
from .tokenizer import Tokenizer

log = logging.getLogger("treadle.engine")

GRAMMAR_CACHE_BYTES = 512 * 2**20  # compiled grammars kept across requests (LRU beyond this)
_MEMORY = 4096  # distinct grammars remembered as validated, and as over budget


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match; the server builds it from the request body.

    kind: "json_schema" (value: a schema dict), "regex" (a pattern), "grammar" (EBNF text with a `root` rule) or
    "structural_tag" (xgrammar's structural-tag dict: {"type": "structural_tag", "format": {...}}).
    """

    kind: str
    value: Any

    def key(self) -> str:
        return f"{self.kind}\0{self.value if isinstance(self.value, str) else json.dumps(self.value)}"


def compile_spec(compiler: GrammarCompiler, spec: GrammarSpec) -> CompiledGrammar:
    """Compile (or fetch from the compiler's cache) what a GrammarSpec describes."""
    kind, value = spec.kind, spec.value
    if kind == "json_schema":
        return compiler.compile_json_schema(value)
    if kind == "regex":
        return compiler.compile_regex(value)
    if kind == "grammar":
        return compiler.compile_grammar(value)
    if kind == "structural_tag":
        return compiler.compile_structural_tag(value)
    raise ValueError(f"unknown grammar kind {kind!r}")


class GrammarCompileTimeout(Exception):
    """Compiling a grammar took longer than its budget (the server answers 400)."""


class _Interrupted(BaseException):
    """Raised inside the worker thread to stop an over-budget compile; a BaseException so that no
    `except Exception` in the grammar engine swallows it."""


def _set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise `exc_type` in the thread at its next bytecode (None withdraws a pending one)."""
    exc = None if exc_type is None else ctypes.py_object(exc_type)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)


@dataclass(eq=False)
class _Job:
    fn: Callable[[], Any]
    future: concurrent.futures.Future
    interruptible: bool
    on_start: Callable[[], None] | None
    interrupt_sent: bool = False


class GrammarWorker:
    """One daemon thread running grammar jobs in submission order; compile jobs can be interrupted."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: _Job | None = None
        self._thread: threading.Thread | None = None

    def submit(
        self, fn: Callable[[], Any], interruptible: bool = False, on_start: Callable[[], None] | None = None
    ) -> concurrent.futures.Future:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="treadle-grammar", daemon=True)
                self._thread.start()
        job = _Job(fn, concurrent.futures.Future(), interruptible, on_start)
        self._queue.put(job)
        return job.future

    def interrupt(self, future: concurrent.futures.Future) -> None:
        """Stop the job of `future`: dropped if still queued, interrupted if it is an interruptible running job."""
        if future.cancel():
            return
        with self._lock:
            job = self._running
            if job is None or job.future is not future or not job.interruptible or job.interrupt_sent:
                return
            job.interrupt_sent = True
            _set_async_exc(self._thread.ident, _Interrupted)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                with self._lock:
                    self._running = job
                if job.on_start is not None:
                    job.on_start()
                result = job.fn()
                with self._lock:
                    self._running = None
                    if job.interrupt_sent:  # too late to land: drop it before it hits the next job
                        _set_async_exc(self._thread.ident, None)
            except _Interrupted:
                with self._lock:
                    self._running = None
                job.future.set_exception(GrammarCompileTimeout())
                continue
            except BaseException as exc:
                with self._lock:
                    self._running = None
                job.future.set_exception(exc)
                continue
            job.future.set_result(result)


@dataclass
class MaskJob:
    """Masks being filled for one step: one row per sequence that gets logits, in logits-row order."""

    future: concurrent.futures.Future  # -> bitmask [rows, words], or None when no row restricts anything


class GuidedDecoder:
    """The engine's grammar side: compiles GrammarSpecs, tracks a matcher per constrained sequence, builds the
    batched bitmask for the sampler and advances matchers on sampled tokens.

    `workers` > 0 keeps the matchers in that many processes; `max_rows` sizes their shared bitmask (the most
    sequences one step samples), which `pin_memory` registers with CUDA for the sampler's upload."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, workers: int = 0, max_rows: int = 64,
                 pin_memory: bool = False):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._num_workers = workers
        self._max_rows = max_rows
        self._pin_memory = pin_memory
        self._pool: GrammarProcessPool | None = None  # started with the compiler
        self._specs: weakref.WeakKeyDictionary[CompiledGrammar, tuple[GrammarSpec, str]] = weakref.WeakKeyDictionary()
        self._worker = GrammarWorker()
        self._compiler_future: concurrent.futures.Future | None = None
        self._matchers: weakref.WeakKeyDictionary[Sequence, GrammarMatcher] = weakref.WeakKeyDictionary()
        self._failed: weakref.WeakSet[GrammarMatcher] = weakref.WeakSet()
        # Sampled tokens not yet accepted: applied on the worker in front of the matcher's next fill (see accept).
        self._pending: weakref.WeakKeyDictionary[GrammarMatcher, list[int]] = weakref.WeakKeyDictionary()
        self._warmed: weakref.WeakSet[CompiledGrammar] = weakref.WeakSet()
        self._over_budget: OrderedDict[str, float] = OrderedDict()  # event loop side
        self._validated: OrderedDict[str, None] = OrderedDict()  # worker side: specs that compiled
        # Grammars compiled, warmed and handed to the pool, by spec key, while anything (the compiler's cache, a
        # live request) keeps them: served on the event loop without a trip through the grammar thread.
        self._ready: weakref.WeakValueDictionary[str, CompiledGrammar] = weakref.WeakValueDictionary()
        self._buffer = allocate_token_bitmask(1, vocab_size)  # reused every step; grown on demand

    # ---- compiling (event loop side) -------------------------------------------------------------------------
    async def compile(
        self, spec: GrammarSpec, budget_s: float, validate: Callable[[], None] | None = None
    ) -> CompiledGrammar:
        """Compile (or fetch from the cache) and warm the first mask, within `budget_s` seconds of worker time.

        `validate` (checks of the request's input, such as JSON schemas against their metaschema, which can take
        seconds on huge schemas) runs first on the worker, inside the budget, the first time a spec is seen;
        what it raises is raised here. Raises the grammar engine's GrammarError (a ValueError) for input it
        rejects, GrammarCompileTimeout when over budget. The one-time tokenizer setup is not charged.
        A grammar compiled before is returned at once, on the event loop: it never waits behind another
        grammar's compile (up to its budget) on the thread.
        """
        key = spec.key()
        if key in self._over_budget:
            raise GrammarCompileTimeout(
                f"this grammar already exceeded the {self._over_budget[key]:g} s compile budget")
        ready = self._ready.get(key)
        if ready is not None:
            return ready
        compiler = await asyncio.wrap_future(self._compiler())
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def on_start() -> None:  # on the worker: the budget runs from here, not from the submission
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))

        future = self._worker.submit(lambda: self._compile_now(compiler, spec, key, validate), True, on_start)
        done = asyncio.wrap_future(future)
        try:
            await asyncio.wait((started, done), return_when=asyncio.FIRST_COMPLETED)
            return await asyncio.wait_for(asyncio.shield(done), budget_s)
        except (TimeoutError, GrammarCompileTimeout):
            self._worker.interrupt(future)
            # An interrupted compile may have left a half-grown grammar in the compiler's cache: drop the cache
            # (grammars in use keep working; new requests recompile).
            self._worker.submit(compiler.clear_cache)
            self._over_budget[key] = budget_s
            while len(self._over_budget) > _MEMORY:
                self._over_budget.popitem(last=False)
            raise GrammarCompileTimeout(f"compiling the grammar took longer than the {budget_s:g} s budget") from None
        except asyncio.CancelledError:  # the client went away
            self._worker.interrupt(future)
            raise

    def _compiler(self) -> concurrent.futures.Future:
        """The GrammarCompiler, built once on the worker (the vocabulary tables take about a second)."""
        if self._compiler_future is None:
            def build() -> GrammarCompiler:
                info = TokenizerInfo.from_huggingface(
                    self._tokenizer.hf, vocab_size=self.vocab_size, stop_token_ids=self._tokenizer.eos_token_ids)
                if self._num_workers > 0:
                    self._pool = GrammarProcessPool(info, self._num_workers, self._max_rows, GRAMMAR_CACHE_BYTES,
                                                    compile_spec, self._pin_memory)
                return GrammarCompiler(info, cache_limit_bytes=GRAMMAR_CACHE_BYTES)

            self._compiler_future = self._worker.submit(build)
        return self._compiler_future

    def _compile_now(
        self, compiler: GrammarCompiler, spec: GrammarSpec, key: str, validate: Callable[[], None] | None
    ) -> CompiledGrammar:
        if validate is not None and key not in self._validated:
            validate()
        compiled = compile_spec(compiler, spec)
        if compiled not in self._warmed:
            # The first mask is the costliest one of a new grammar: pay it here, inside the budget, rather than
            # in a step. A grammar seen before may have live matchers, so it is not touched again.
            GrammarMatcher(compiled).fill_next_token_bitmask(allocate_token_bitmask(1, self.vocab_size))
            self._warmed.add(compiled)
        self._validated[key] = None
        while len(self._validated) > _MEMORY:
            self._validated.popitem(last=False)
        if self._pool is not None:
            self._specs[compiled] = spec, key
            self._pool.prepare(key, spec)
        self._ready[key] = compiled
        return compiled

    # ---- decoding (engine thread side) -----------------------------------------------------------------------
    def add(self, seq: Sequence, grammar: CompiledGrammar | None) -> None:
        """Start a matcher for a new sequence (each choice of an n > 1 request gets its own)."""
        if grammar is None:
            return
        if self._pool is None:
            self._matchers[seq] = GrammarMatcher(grammar)
            return
        known = self._specs.get(grammar)
        if known is None:
            raise ValueError("a grammar for worker processes must come from this decoder's compile()")
        spec, key = known
        self._pool.add(seq, spec, key)

    def start_masks(self, seqs: list[Sequence]) -> MaskJob | ProcessMaskJob | None:
        """Submit the mask fill for the sequences about to get logits (None when none is constrained)."""
        if self._pool is not None:
            return self._pool.start(seqs)
        matchers = [self._matchers.get(s) for s in seqs]
        if not any(m is not None for m in matchers):
            return None
        return MaskJob(self._worker.submit(lambda: self._fill(matchers)))

    def _fill(self, matchers: list[GrammarMatcher | None]) -> torch.Tensor | None:
        n = len(matchers)
        if self._buffer.shape[0] < n:
            self._buffer = allocate_token_bitmask(max(n, 2 * self._buffer.shape[0]), self.vocab_size)
        buf = self._buffer
        restricts = False
        for i, m in enumerate(matchers):
            if m is None:
                buf[i] = -1
                continue
            filled = fill_row(m, self._pending.pop(m, []), buf, i)
            if filled is None:
                self._failed.add(m)
            else:
                restricts |= filled
        return buf[:n] if restricts else None

    def finish_masks(self, job: MaskJob | ProcessMaskJob | None, rows: list[int]) -> torch.Tensor | None:
        """The bitmask for the sampler, one row per sampled sequence; `rows[i]` is its row in the job (forked
        choices of one prompt share their parent's row: their matchers all start at the same state)."""
        if job is None:
            return None
        bitmask = self._pool.finish(job) if isinstance(job, ProcessMaskJob) else job.future.result()
        if bitmask is None:
            return None
        if rows != list(range(bitmask.shape[0])):
            bitmask = bitmask[torch.tensor(rows)]
        return bitmask

    def sampled(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Tokens were just sampled, before the engine emits them: worker processes start on the next masks now.
        (The thread takes its tokens with the next fill.) Every token `accept` sees must have come through here."""
        if self._pool is not None:
            self._pool.sampled(seqs, token_ids)

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """Advance the sequence's matcher; a finish reason when the grammar ends the sequence, else None.

        "stop" once a stop token completed the grammar; "abort" if the matcher failed or a token broke the grammar
        (only possible when another rule, such as min_tokens, banned every token the grammar allowed). Only a stop
        token can end a grammar, so other tokens are accepted later, on the worker, in front of the matcher's next
        mask fill, where the work overlaps the model's forward instead of following it; a token that breaks the
        grammar is then reported on the sequence's next token. Worker processes have had the sampled tokens since
        `sampled`, and take a stop token as ending the grammar without a round trip (see GrammarProcessPool.accept).
        """
        if self._pool is not None:
            return self._pool.accept(seq, token_id)
        m = self._matchers.get(seq)
        if m is None:
            return None
        if m in self._failed:
            return "abort"
        if token_id not in m.stop_token_ids:
            self._pending.setdefault(m, []).append(token_id)
            return None
        for tok in (*self._pending.pop(m, ()), token_id):
            if not m.accept_token(tok):
                log.warning("sampled token %d violates the request's grammar; the sequence is aborted", tok)
                return "abort"
        return "stop" if m.is_terminated() else None

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: drop its matcher."""
        if self._pool is not None:
            self._pool.release(seq)
            return
        m = self._matchers.pop(seq, None)
        if m is not None:
            self._pending.pop(m, None)

    def close(self) -> None:
        """Stop the worker processes, if any (the worker thread is a daemon and idles)."""
        if self._pool is not None:
            self._pool.close()
