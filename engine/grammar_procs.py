"""Grammar matchers in worker processes, so that mask fills run beside the engine instead of sharing its GIL.

On a GPU the engine's own host work (scheduling, step metadata, sampling, detokenizing) takes much of every step,
and grammar work on a thread of the same process cannot overlap it: both need the GIL. Here each constrained
sequence's matcher lives in one of a few spawned processes, which write their rows of a bitmask in shared memory
while the model runs.

A step's fills travel through shared memory, not pipes: the engine writes each process's rows (row, matcher, the
token sampled since its last fill) into a shared table and bumps that process's step counter; the process, which
polls the counter while work keeps coming, accepts the token, fills the rows and bumps its done counter, which
the engine spins on. A pipe message each way per process and step costs tens of microseconds of system calls and
wake-ups, a visible share of a few-millisecond GPU step. A process idle for SPIN_S blocks on its pipe instead, and
the engine wakes it with a message. The pipe carries everything that is not per step: new grammars, matcher
creation and release, and stop tokens, which are accepted at once (one round trip per finishing sequence) since
only a stop token can end a grammar.

A process that dies fails the sequences it held (they finish with "abort") and is replaced.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import signal
import threading
import time
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
SPIN_S = 0.02  # a worker polls this long after its last work before blocking on its pipe
POLL_S = 2e-5  # its sleep between polls (~70 us with Linux's default timer slack): a busy spin would slow the
# engine's thread on a sibling hyperthread, and the work it waits for comes a millisecond before it is due
_LIVENESS_SPINS = 1024  # the engine checks that a worker it waits for is alive every this many spins
POSTED, DONE, SLEEPING, RESTRICTS = range(4)  # columns of the control array, one row per worker
CompileSpec = Callable[[GrammarCompiler, Any], CompiledGrammar]

_BARRIER = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a lock's acquire and release are atomic instructions), so that the other process
    sees shared-memory writes in program order on weakly ordered CPUs too."""
    _BARRIER.acquire()
    _BARRIER.release()


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


@dataclass
class SharedArrays:
    """What the engine and the worker processes share: the bitmask, and per worker its control counters
    (POSTED, DONE, SLEEPING, RESTRICTS), the rows of its posted step (n, then row, matcher id, token or -1 per
    row) and the matchers that step failed (n, then ids)."""

    bitmask: torch.Tensor  # [rows, words] int32
    ctl: torch.Tensor  # [workers, 4] int64
    cmd: torch.Tensor  # [workers, 1 + 3 * rows] int32
    failed: torch.Tensor  # [workers, 1 + rows] int32

    @classmethod
    def allocate(cls, workers: int, rows: int, words: int, ctl: torch.Tensor | None = None) -> SharedArrays:
        """Arrays for `rows` rows; a grown set keeps the control array, which the workers' counters live in."""
        if ctl is None:
            ctl = torch.zeros(workers, 4, dtype=torch.int64).share_memory_()
        return cls(torch.zeros(rows, words, dtype=torch.int32).share_memory_(), ctl,
                   torch.zeros(workers, 1 + 3 * rows, dtype=torch.int32).share_memory_(),
                   torch.zeros(workers, 1 + rows, dtype=torch.int32).share_memory_())


class _Server:
    """A worker process's side: matchers by id, its rows of the shared arrays, and its pipe to the engine."""

    def __init__(self, conn: Connection, index: int, info: TokenizerInfo, shared: SharedArrays, cache_bytes: int,
                 compile_spec: CompileSpec):
        self.conn = conn
        self.index = index
        self.compiler = GrammarCompiler(info, cache_limit_bytes=cache_bytes)
        self.compile_spec = compile_spec
        self.matchers: dict[int, GrammarMatcher | None] = {}  # None: creating it or accepting for it failed
        self.use(shared)

    def use(self, shared: SharedArrays) -> None:
        self.bitmask = shared.bitmask
        self.ctl = shared.ctl.numpy()[self.index]
        self.cmd = shared.cmd.numpy()[self.index]
        self.failed = shared.failed.numpy()[self.index]

    def run(self) -> None:
        done = int(self.ctl[DONE])
        idle_since = time.monotonic()
        while True:
            if self.ctl[POSTED] != done:
                _fence()
                while self.conn.poll():  # what the engine sent before posting the step comes first
                    if not self.handle(self.conn.recv()):
                        return
                done = int(self.ctl[POSTED])
                self.fill()
                _fence()
                self.ctl[DONE] = done
                idle_since = time.monotonic()
            elif self.conn.poll():
                if not self.handle(self.conn.recv()):
                    return
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > SPIN_S:
                self.ctl[SLEEPING] = 1
                _fence()
                if self.ctl[POSTED] == done:  # else the engine posted before it could see us asleep
                    self.conn.poll(None)
                self.ctl[SLEEPING] = 0
                idle_since = time.monotonic()
            else:
                time.sleep(POLL_S)

    def fill(self) -> None:
        n = int(self.cmd[0])
        restricts, failed = False, []
        for row, sid, tok in self.cmd[1 : 1 + 3 * n].reshape(n, 3).tolist():
            m = self.matchers.get(sid)
            filled = None if m is None else fill_row(m, [tok] if tok >= 0 else [], self.bitmask, row)
            if filled is None:
                self.bitmask[row] = -1
                self.matchers[sid] = None
                failed.append(sid)
            else:
                restricts |= filled
        self.failed[0] = len(failed)
        self.failed[1 : 1 + len(failed)] = failed
        self.ctl[RESTRICTS] = restricts

    def handle(self, msg: tuple) -> bool:
        """One pipe message; False to stop."""
        kind = msg[0]
        if kind == "grammar":  # compile and warm the first mask before a sequence needs it
            try:
                compiled = self.compile_spec(self.compiler, msg[1])
                GrammarMatcher(compiled).fill_next_token_bitmask(torch.zeros_like(self.bitmask[:1]))
            except Exception:
                log.exception("compiling a grammar in a worker process failed")
        elif kind == "add":
            _, sid, spec = msg
            try:
                self.matchers[sid] = GrammarMatcher(self.compile_spec(self.compiler, spec))
            except Exception:
                log.exception("compiling a grammar in a worker process failed; the sequence is aborted")
                self.matchers[sid] = None
        elif kind == "drop":
            for sid in msg[1]:
                self.matchers.pop(sid, None)
        elif kind in ("pending", "accept"):  # tokens sampled since the last fill; "accept" ends with a stop token
            _, sid, tokens = msg
            m = self.matchers.get(sid)
            try:
                ok = m is not None and all(m.accept_token(t) for t in tokens)
            except Exception:
                log.exception("accepting a token failed; the sequence is aborted")
                ok = False
            if not ok:
                self.matchers[sid] = None
            if kind == "accept":
                self.conn.send((ok, ok and m.is_terminated()))
        elif kind == "arrays":
            self.use(msg[1])
        elif kind == "count":
            self.conn.send(len(self.matchers))
        elif kind == "stop":
            return False
        return True  # "wake" needs nothing more


def _serve(conn: Connection, index: int, info_blob: bytes, shared: SharedArrays, cache_bytes: int,
           compile_spec: CompileSpec) -> None:
    """A worker process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops us after it
    torch.set_num_threads(1)
    try:
        _Server(conn, index, pickle.loads(info_blob), shared, cache_bytes, compile_spec).run()
    except (EOFError, OSError):  # the engine is gone
        return


@dataclass(eq=False)
class _Worker:
    """The engine's handle on one worker process."""

    index: int  # its row of the control arrays
    process: Any
    conn: Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)  # compiles broadcast from another thread
    live: int = 0  # sequences assigned and not yet released
    posted: int = 0  # steps posted to it
    drops: list[int] = field(default_factory=list)  # ids of released sequences, sent before its next step
    dead: bool = False

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.conn.send(msg)


@dataclass
class _Entry:
    """A constrained sequence: its worker, its matcher's id there, and the tokens the worker has not seen yet."""

    worker: _Worker
    sid: int
    pending: list[int] = field(default_factory=list)
    failed: bool = False


@dataclass
class ProcessMaskJob:
    """Fills posted for one step: the workers to wait for and, per worker, its entries with their rows."""

    sent: list[tuple[_Worker, list[tuple[int, _Entry]]]]
    free_rows: list[int]
    rows: int


class GrammarProcessPool:
    """Matchers of constrained sequences, spread over `workers` processes (the least loaded takes a new one)."""

    def __init__(self, info: TokenizerInfo, workers: int, rows: int, cache_bytes: int, compile_spec: CompileSpec,
                 pin_memory: bool = False):
        """`cache_bytes` bounds each worker's compiled-grammar cache (each compiles what its sequences use);
        `pin_memory` registers the shared bitmask with CUDA, so the sampler uploads it without a staging copy."""
        self.words = (info.vocab_size + 31) // 32
        self.stop_token_ids = frozenset(info.stop_token_ids)
        self._ctx = mp.get_context("spawn")
        self._info_blob = pickle.dumps(info)
        self._cache_bytes = cache_bytes
        self._compile_spec = compile_spec
        self._pin = pin_memory
        self._shared = SharedArrays.allocate(workers, rows, self.words)
        self._use_shared()
        self._prepared: OrderedDict[str, None] = OrderedDict()  # grammars broadcast lately (not again)
        self._workers = [self._start(i) for i in range(workers)]
        self._entries: dict[Sequence, _Entry] = {}
        self._by_sid: dict[int, _Entry] = {}
        self._ids = itertools.count()
        self._closing = False

    @property
    def bitmask(self) -> torch.Tensor:
        return self._shared.bitmask

    def _use_shared(self) -> None:
        shared = self._shared
        if self._pin and (torch.cuda.cudart().cudaHostRegister(shared.bitmask.data_ptr(), shared.bitmask.nbytes, 0)
                          != torch.cuda.cudart().cudaError.success):
            log.warning("could not pin the shared grammar bitmask; it is uploaded through a staging copy")
            self._pin = False
        self._ctl, self._cmd, self._failed = shared.ctl.numpy(), shared.cmd.numpy(), shared.failed.numpy()

    def _start(self, index: int) -> _Worker:
        self._ctl[index] = 0
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, name="treadle-grammar", daemon=True,
                                 args=(child, index, self._info_blob, self._shared, self._cache_bytes,
                                       self._compile_spec))
        proc.start()
        child.close()
        return _Worker(index, proc, parent)

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
        entry = _Entry(worker, next(self._ids))
        self._entries[seq] = entry
        self._by_sid[entry.sid] = entry
        if not self._send(worker, ("add", entry.sid, spec)):
            entry.failed = True

    def release(self, seq: Sequence) -> None:
        """The sequence finished: its matcher goes before the worker's next step."""
        entry = self._entries.pop(seq, None)
        if entry is not None:
            del self._by_sid[entry.sid]
            entry.worker.live -= 1
            entry.worker.drops.append(entry.sid)

    def start(self, seqs: list[Sequence]) -> ProcessMaskJob | None:
        """Post the fills of one step's rows (`seqs[i]` is row i); None when no row is constrained."""
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
            if self._ctl[worker.index, DONE] != worker.posted and not self._wait(worker):
                self._lost(worker)  # a step left unfinished (an exception between start and finish): wait for it
            if worker.drops:
                self._send(worker, ("drop", self._drain(worker)))
            flat = [len(rows)]
            for row, e in rows:
                pending, e.pending = e.pending, []
                if len(pending) == 1:
                    flat += (row, e.sid, pending[0])
                else:  # none yet, or several (rare: a sequence sampled but not filled): by pipe, ahead of the step
                    if pending:
                        self._send(worker, ("pending", e.sid, pending))
                    flat += (row, e.sid, -1)
            if worker.dead:
                self._fail_rows(rows)
                free_rows.extend(row for row, _ in rows)
                continue
            self._cmd[worker.index, : len(flat)] = flat
            _fence()
            worker.posted += 1
            self._ctl[worker.index, POSTED] = worker.posted
            _fence()
            if self._ctl[worker.index, SLEEPING]:
                self._send(worker, ("wake",))
            sent.append((worker, rows))
        return ProcessMaskJob(sent, free_rows, len(seqs))

    def finish(self, job: ProcessMaskJob) -> torch.Tensor | None:
        """Wait for the step's fills: the bitmask rows (or None when no row restricts anything)."""
        restricts = False
        for worker, rows in job.sent:
            if not self._wait(worker):
                self._lost(worker)
                self._fail_rows(rows)
                for row, _ in rows:
                    self.bitmask[row] = -1
                continue
            restricts |= bool(self._ctl[worker.index, RESTRICTS])
            failed = self._failed[worker.index]
            for sid in failed[1 : 1 + failed[0]].tolist():
                entry = self._by_sid.get(sid)
                if entry is not None:
                    entry.failed = True
        if not restricts:
            return None
        if job.free_rows:
            self.bitmask[job.free_rows] = -1
        return self.bitmask[: job.rows]

    def _wait(self, worker: _Worker) -> bool:
        """Spin until the worker has filled its posted step; False if it died first."""
        ctl = self._ctl[worker.index]
        spins = 0
        while ctl[DONE] != worker.posted:
            spins += 1
            if spins % _LIVENESS_SPINS == 0 and not worker.process.is_alive():
                return False
            os.sched_yield()
        _fence()
        return True

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
        msg = ("accept", entry.sid, entry.pending)
        entry.pending = []
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
            if self._send(w, ("drop", self._drain(w))) and self._send(w, ("count",)):
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
        self._unpin()

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
        self._workers[self._workers.index(worker)] = self._start(worker.index)

    @staticmethod
    def _fail_rows(rows: list[tuple[int, _Entry]]) -> None:
        for _, e in rows:
            e.failed = True

    def _unpin(self) -> None:
        if self._pin:
            torch.cuda.cudart().cudaHostUnregister(self._shared.bitmask.data_ptr())

    def _grow(self, rows: int) -> None:
        """More rows than the shared arrays hold (never at the engine's own batch limits): bigger ones."""
        self._unpin()
        self._shared = SharedArrays.allocate(len(self._workers), rows, self.words, self._shared.ctl)
        self._use_shared()
        for w in self._workers:
            self._send(w, ("arrays", self._shared))
