"""Grammar matchers in worker processes, so that mask fills run beside the engine instead of sharing its GIL.

On a GPU the engine's own host work (scheduling, step metadata, sampling, detokenizing) takes much of every step,
and grammar work on a thread of the same process cannot overlap it: both need the GIL. Here each constrained
sequence's matcher lives in one of a few spawned processes. Per step the engine sends each process the rows it
must fill together with the tokens sampled since that sequence's last fill; the processes accept them, write their
rows of a bitmask in shared memory while the model runs, and answer with whether any row restricts anything and
which sequences broke their grammar. Only a stop token can end a grammar, so only a stop token is accepted at once
(one round trip, once per finishing sequence).

A process that dies fails the sequences it held (they finish with "abort") and is replaced.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from treadle.grammars import CompiledGrammar, GrammarCompiler, GrammarMatcher, TokenizerInfo

from .sequence import Sequence

log = logging.getLogger("treadle.engine")

_MEMORY = 4096  # grammars remembered as already broadcast to the workers
CompileSpec = Callable[[GrammarCompiler, Any], CompiledGrammar]


def fill_row(m: GrammarMatcher, tokens: list[int], bitmask: torch.Tensor, row: int) -> bool | None:
    """Accept the tokens sampled since the last fill, then write the matcher's mask into `row`: whether it
    restricts anything, or None (logged; the row allows everything) if a token broke the grammar or the fill
    failed, which aborts the sequence."""
    try:
        for t in tokens:
            if not m.accept_token(t):
                log.warning("sampled token %d violates the request's grammar; the sequence is aborted", t)
                bitmask[row] = -1
                return None
        return m.fill_next_token_bitmask(bitmask, row)
    except Exception:
        log.exception("filling a token mask failed; the sequence is aborted")
        bitmask[row] = -1
        return None


def _serve(conn: Connection, info_blob: bytes, bitmask: torch.Tensor, cache_bytes: int, compile_spec: CompileSpec
           ) -> None:
    """A worker process: owns matchers by sequence id and answers the engine's messages in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops us after it
    torch.set_num_threads(1)
    compiler = GrammarCompiler(pickle.loads(info_blob), cache_limit_bytes=cache_bytes)
    matchers: dict[int, GrammarMatcher] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the engine is gone
            return
        kind = msg[0]
        if kind == "grammar":  # compile and warm the first mask before a sequence needs it
            try:
                compiled = compile_spec(compiler, msg[1])
                GrammarMatcher(compiled).fill_next_token_bitmask(torch.zeros_like(bitmask[:1]))
            except Exception:
                log.exception("compiling a grammar in a worker process failed")
        elif kind == "fill":
            _, drops, entries = msg
            for sid in drops:
                matchers.pop(sid, None)
            restricts, failed = False, []
            for row, sid, spec, tokens in entries:
                if spec is not None:
                    try:
                        matchers[sid] = GrammarMatcher(compile_spec(compiler, spec))
                    except Exception:
                        log.exception("compiling a grammar in a worker process failed; the sequence is aborted")
                        failed.append(sid)
                        bitmask[row] = -1
                        continue
                filled = fill_row(matchers[sid], tokens, bitmask, row)
                if filled is None:
                    failed.append(sid)
                else:
                    restricts |= filled
            conn.send((restricts, failed))
        elif kind == "accept":  # a stop token, after the tokens still pending
            _, sid, spec, tokens = msg
            try:
                if spec is not None:  # a forked choice can sample a stop token before its first fill
                    matchers[sid] = GrammarMatcher(compile_spec(compiler, spec))
                m = matchers[sid]
                ok = all(m.accept_token(t) for t in tokens)
                conn.send((ok, ok and m.is_terminated()))
            except Exception:
                log.exception("accepting a stop token failed; the sequence is aborted")
                conn.send((False, False))
        elif kind == "bitmask":
            bitmask = msg[1]
        elif kind == "count":
            conn.send(len(matchers))
        elif kind == "stop":
            return


@dataclass(eq=False)
class _Worker:
    """The engine's handle on one worker process."""

    process: Any
    conn: Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)  # compiles broadcast from another thread
    live: int = 0  # sequences assigned and not yet released
    drops: list[int] = field(default_factory=list)  # ids of released sequences, sent with the next message
    dead: bool = False

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.conn.send(msg)


@dataclass
class _Entry:
    """A constrained sequence: its worker, its id there, and what the worker has not been told yet."""

    worker: _Worker
    sid: int
    spec: Any  # sent with the first fill, which creates the matcher; None afterwards
    pending: list[int] = field(default_factory=list)
    failed: bool = False


@dataclass
class ProcessMaskJob:
    """Fills sent for one step: the workers to hear from and, per worker, its entries with their rows."""

    sent: list[tuple[_Worker, list[tuple[int, _Entry]]]]
    free_rows: list[int]
    rows: int


class GrammarProcessPool:
    """Matchers of constrained sequences, spread over `workers` processes (the least loaded takes a new one)."""

    def __init__(self, info: TokenizerInfo, workers: int, rows: int, cache_bytes: int, compile_spec: CompileSpec):
        """`cache_bytes` bounds each worker's compiled-grammar cache (each compiles what its sequences use)."""
        self.words = (info.vocab_size + 31) // 32
        self.stop_token_ids = frozenset(info.stop_token_ids)
        self._ctx = mp.get_context("spawn")
        self._info_blob = pickle.dumps(info)
        self._cache_bytes = cache_bytes
        self._compile_spec = compile_spec
        self.bitmask = torch.zeros(rows, self.words, dtype=torch.int32).share_memory_()
        self._prepared: OrderedDict[str, None] = OrderedDict()  # grammars broadcast lately (not again)
        self._workers = [self._start() for _ in range(workers)]
        self._entries: dict[Sequence, _Entry] = {}
        self._by_sid: dict[int, _Entry] = {}
        self._ids = itertools.count()
        self._closing = False

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, name="treadle-grammar", daemon=True,
                                 args=(child, self._info_blob, self.bitmask, self._cache_bytes, self._compile_spec))
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def prepare(self, key: str, spec: Any) -> None:
        """Have every worker compile a grammar the engine just compiled (called from the compiling thread)."""
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return
        self._prepared[key] = None
        while len(self._prepared) > _MEMORY:
            self._prepared.popitem(last=False)
        for w in self._workers:
            self._send(w, ("grammar", spec))

    def add(self, seq: Sequence, spec: Any) -> None:
        worker = min((w for w in self._workers if not w.dead), key=lambda w: w.live)
        worker.live += 1
        entry = _Entry(worker, next(self._ids), spec)
        self._entries[seq] = entry
        self._by_sid[entry.sid] = entry

    def release(self, seq: Sequence) -> None:
        """The sequence finished: its matcher goes with the worker's next message."""
        entry = self._entries.pop(seq, None)
        if entry is not None:
            del self._by_sid[entry.sid]
            entry.worker.live -= 1
            entry.worker.drops.append(entry.sid)

    def start(self, seqs: list[Sequence]) -> ProcessMaskJob | None:
        """Send the fills of one step's rows (`seqs[i]` is row i); None when no row is constrained."""
        if len(seqs) > self.bitmask.shape[0]:
            self._grow(len(seqs))
        per_worker: dict[_Worker, list[tuple[int, _Entry]]] = {}
        free_rows = []
        for row, seq in enumerate(seqs):
            entry = self._entries.get(seq)
            if entry is None or entry.failed:
                free_rows.append(row)
            else:
                per_worker.setdefault(entry.worker, []).append((row, entry))
        if not per_worker:
            return None
        sent = []
        for worker, rows in per_worker.items():
            drops = self._drain(worker)
            msg = ("fill", drops, [(row, e.sid, e.spec, e.pending) for row, e in rows])
            if self._send(worker, msg):
                sent.append((worker, rows))
                for _, e in rows:
                    e.spec, e.pending = None, []
            else:
                self._fail_rows(rows)
                free_rows.extend(row for row, _ in rows)
        return ProcessMaskJob(sent, free_rows, len(seqs))

    def finish(self, job: ProcessMaskJob) -> torch.Tensor | None:
        """Wait for the step's fills: the bitmask rows (or None when no row restricts anything)."""
        restricts = False
        for worker, rows in job.sent:
            try:
                row_restricts, failed = worker.conn.recv()
            except (EOFError, OSError):
                self._lost(worker)
                self._fail_rows(rows)
                for row, _ in rows:
                    self.bitmask[row] = -1
                continue
            restricts |= row_restricts
            for sid in failed:
                entry = self._by_sid.get(sid)
                if entry is not None:
                    entry.failed = True
        if not restricts:
            return None
        if job.free_rows:
            self.bitmask[job.free_rows] = -1
        return self.bitmask[: job.rows]

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """Queue a sampled token; accept a stop token at once. The finish reason the grammar gives, if any."""
        entry = self._entries.get(seq)
        if entry is None:
            return None
        if entry.failed:
            return "abort"
        entry.pending.append(token_id)
        if token_id not in self.stop_token_ids:
            return None
        msg = ("accept", entry.sid, entry.spec, entry.pending)
        entry.spec, entry.pending = None, []
        worker = entry.worker
        if not self._send(worker, msg):
            return "abort"
        try:
            ok, terminated = worker.conn.recv()
        except (EOFError, OSError):
            self._lost(worker)
            return "abort"
        if not ok:
            log.warning("sampled token %d violates the request's grammar; the sequence is aborted", token_id)
            return "abort"
        return "stop" if terminated else None

    def live_matchers(self) -> int:
        """Matchers alive in the workers, after dropping those of released sequences (for leak checks)."""
        total = 0
        for w in self._workers:
            if self._send(w, ("fill", self._drain(w), [])):
                w.conn.recv()
            if self._send(w, ("count",)):
                total += w.conn.recv()
        return total

    def close(self) -> None:
        self._closing = True
        for w in self._workers:
            self._send(w, ("stop",))
        for w in self._workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
            w.conn.close()
        self._workers = []

    # ---- internals -----------------------------------------------------------------------------------------
    def _drain(self, worker: _Worker) -> list[int]:
        drops, worker.drops = worker.drops, []
        return drops

    def _send(self, worker: _Worker, msg: tuple) -> bool:
        if worker.dead:
            return False
        try:
            worker.send(msg)
            return True
        except (BrokenPipeError, OSError):
            self._lost(worker)
            return False

    def _lost(self, worker: _Worker) -> None:
        """A worker died: its sequences fail, and a fresh process takes its place for new ones."""
        if worker.dead:
            return
        worker.dead = True
        if self._closing:  # killed with the server (a signal to its process group), not lost
            return
        log.error("grammar worker process %s died (exit code %s); its sequences are aborted",
                  worker.process.pid, worker.process.exitcode)
        for e in self._entries.values():
            if e.worker is worker:
                e.failed = True
        self._workers[self._workers.index(worker)] = self._start()

    @staticmethod
    def _fail_rows(rows: list[tuple[int, _Entry]]) -> None:
        for _, e in rows:
            e.failed = True

    def _grow(self, rows: int) -> None:
        """More rows than the shared bitmask holds (never at the engine's own batch limits): a bigger one."""
        self.bitmask = torch.zeros(rows, self.words, dtype=torch.int32).share_memory_()
        for w in self._workers:
            self._send(w, ("bitmask", self.bitmask))
