"""Grammar matchers in worker processes, so that mask fills run beside the engine instead of sharing its GIL.

On a GPU the engine's own host work (scheduling, step metadata, sampling, detokenizing) takes much of every step,
and grammar work on a thread of the same process cannot overlap it: both need the GIL. Here each constrained
sequence's matcher lives in one of a few spawned processes, which build masks while the engine works.

Each step has two posts per process, through shared memory rather than pipes (a pipe message each way per process
and step costs tens of microseconds of system calls and wake-ups, a visible share of a few-millisecond GPU step):
- once the step's rows are known, which sequence is which bitmask row: the process copies the masks there;
- right after sampling, the tokens just sampled: the process accepts them and builds each sequence's next mask in
  memory of its own, while the engine emits, schedules and runs the next forward. Usually every row sampled one
  token, and the engine writes the step's tokens once, by row, for all processes (each knows its rows from the
  row post); otherwise (forked choices of a prompt) it writes (matcher, token) pairs per process. After a post by
  row the process also puts the new masks into the same rows at once: decoding steps mostly keep their batch,
  and then the next row post finds them in place. A step with other rows waits for those writes first.
A post is a table the engine writes and a counter it bumps; the process polls the counters while work keeps coming
and bumps its own when done, which the engine spins on. A process idle for SPIN_S blocks on its pipe instead, and
the engine wakes it with a message. The pipe carries everything that is not per step: new grammars, and matcher
creation and release. A sampled stop token is not accepted: it ends its grammar (see `accept`).

Sequences of one grammar go to the same process while it holds fewer than AFFINITY_ROWS of them: masks are built
lazily and cached per process, so spreading one grammar's sequences would build each new parser configuration's
mask once per process.

A process that dies fails the sequences it held (they finish with "abort") and is replaced.
"""

from __future__ import annotations

import itertools
import logging
import operator
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
AFFINITY_ROWS = 64  # sequences of one grammar a process takes before the next one shares them
BY_ROW = -1  # an accept post's count meaning "the tokens of your last row post's rows, in the shared row tokens"
# Columns of the control array, one row per worker: the two posts' counters, whether it sleeps, whether its
# last rows restrict anything.
ACC_POSTED, ACC_DONE, ROW_POSTED, ROW_DONE, SLEEPING, RESTRICTS = range(6)
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
    """What the engine and the worker processes share: the bitmask, the last sampled token of every row, and per
    worker its control counters, the tokens of its last accept post (n, then matcher id and token per token; or
    BY_ROW), the rows of its last row post (n, then row and matcher id per row) and the matchers that post found
    failed (n, then ids)."""

    bitmask: torch.Tensor  # [rows, words] int32
    row_tokens: torch.Tensor  # [rows] int32
    ctl: torch.Tensor  # [workers, 6] int64
    tokens: torch.Tensor  # [workers, 1 + 2 * rows] int32
    rows: torch.Tensor  # [workers, 1 + 2 * rows] int32
    failed: torch.Tensor  # [workers, 1 + rows] int32

    @classmethod
    def allocate(cls, workers: int, rows: int, words: int, ctl: torch.Tensor | None = None) -> SharedArrays:
        """Arrays for `rows` rows; a grown set keeps the control array, which the workers' counters live in."""
        if ctl is None:
            ctl = torch.zeros(workers, 6, dtype=torch.int64).share_memory_()
        table = lambda n: torch.zeros(workers, n, dtype=torch.int32).share_memory_()  # noqa: E731
        return cls(torch.zeros(rows, words, dtype=torch.int32).share_memory_(),
                   torch.zeros(rows, dtype=torch.int32).share_memory_(), ctl, table(1 + 2 * rows),
                   table(1 + 2 * rows), table(1 + rows))


class _Server:
    """A worker process's side: matchers by id with their next masks, its rows of the shared arrays, and its pipe
    to the engine."""

    def __init__(self, conn: Connection, index: int, info: TokenizerInfo, shared: SharedArrays, cache_bytes: int,
                 compile_spec: CompileSpec):
        self.conn = conn
        self.index = index
        self.compiler = GrammarCompiler(info, cache_limit_bytes=cache_bytes)
        self.compile_spec = compile_spec
        self.stop_token_ids = frozenset(info.stop_token_ids)
        self.last_rows: list[list[int]] = []  # (row, matcher id) of the last row post
        self.placed: tuple[bool, list[int]] | None = None  # `place` of last_rows after an accept post by row
        self.words = shared.bitmask.shape[1]
        self.matchers: dict[int, GrammarMatcher | None] = {}  # None: creating it or accepting for it failed
        self.masks: dict[int, torch.Tensor] = {}  # each matcher's next mask, [1, words]
        self.restricts: dict[int, bool] = {}
        self.use(shared)

    def use(self, shared: SharedArrays) -> None:
        self.placed = None  # masks placed in the old bitmask
        self.bitmask = shared.bitmask
        self.bitmask_np = shared.bitmask.numpy()
        self.row_tokens = shared.row_tokens.numpy()
        self.ctl = shared.ctl.numpy()[self.index]
        self.tokens = shared.tokens.numpy()[self.index]
        self.rows = shared.rows.numpy()[self.index]
        self.failed = shared.failed.numpy()[self.index]

    def run(self) -> None:
        ctl = self.ctl
        acc_done, row_done = int(ctl[ACC_DONE]), int(ctl[ROW_DONE])
        idle_since = time.monotonic()
        while True:
            if ctl[ACC_POSTED] != acc_done:
                _fence()
                acc_done = self.serve_post(ACC_POSTED, ACC_DONE, self.accept_posted)
                if acc_done is None:
                    return
                idle_since = time.monotonic()
            elif ctl[ROW_POSTED] != row_done:
                _fence()
                if ctl[ACC_POSTED] != acc_done:  # posted before these rows: accepted first
                    continue
                row_done = self.serve_post(ROW_POSTED, ROW_DONE, self.fill_rows)
                if row_done is None:
                    return
                idle_since = time.monotonic()
            elif self.conn.poll():
                if not self.handle(self.conn.recv()):
                    return
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > SPIN_S:
                ctl[SLEEPING] = 1
                _fence()
                if ctl[ACC_POSTED] == acc_done and ctl[ROW_POSTED] == row_done:  # else posted before it saw us
                    self.conn.poll(None)
                ctl[SLEEPING] = 0
                idle_since = time.monotonic()
            else:
                time.sleep(POLL_S)

    def serve_post(self, posted: int, done: int, work: Callable[[], None]) -> int | None:
        """Handle what the engine sent before a post, do the post's work and mark it done: the post's count, or
        None to stop."""
        if not self.drain():
            return None
        count = int(self.ctl[posted])
        work()
        _fence()
        self.ctl[done] = count
        return count

    def drain(self) -> bool:
        """Handle what the engine sent before its post; False to stop."""
        while self.conn.poll():
            if not self.handle(self.conn.recv()):
                return False
        return True

    def advance(self, sid: int, tokens: list[int]) -> None:
        """Accept tokens and build the matcher's next mask; a failure marks it failed."""
        m = self.matchers.get(sid)
        if m is None:
            return
        filled = fill_row(m, tokens, self.masks[sid], 0)
        if filled is None:
            self.matchers[sid] = None
        else:
            self.restricts[sid] = filled

    def accept_posted(self) -> None:
        n = int(self.tokens[0])
        self.placed = None
        if n != BY_ROW:
            for sid, tok in self.tokens[1 : 1 + 2 * n].reshape(n, 2).tolist():
                if tok not in self.stop_token_ids:
                    self.advance(sid, [tok])
            return
        row_tokens = self.row_tokens.tolist()
        for row, sid in self.last_rows:
            tok = row_tokens[row]
            if tok not in self.stop_token_ids:
                self.advance(sid, [tok])
        # The next step most likely has the same rows (the engine has read this step's bitmask by now): the masks
        # go in place here, beside the engine's work, rather than after its row post, at the end of the forward.
        self.placed = self.place(self.last_rows)

    def fill_rows(self) -> None:
        n = int(self.rows[0])
        rows = self.rows[1 : 1 + 2 * n].reshape(n, 2).tolist()
        placed, self.placed = self.placed, None
        if placed is None or rows != self.last_rows:
            placed = self.place(rows)
        self.last_rows = rows
        restricts, failed = placed
        self.failed[0] = len(failed)
        self.failed[1 : 1 + len(failed)] = failed
        self.ctl[RESTRICTS] = restricts

    def place(self, rows: list[list[int]]) -> tuple[bool, list[int]]:
        """Copy the matchers' masks into their (row, matcher id) rows: whether any restricts, and the failed ids
        (their rows allow everything)."""
        restricts, failed = False, []
        for row, sid in rows:
            if self.matchers.get(sid) is None:
                self.bitmask_np[row] = -1
                failed.append(sid)
            else:
                self.bitmask_np[row] = self.masks[sid].numpy()[0]
                restricts |= self.restricts[sid]
        return restricts, failed

    def handle(self, msg: tuple) -> bool:
        """One pipe message; False to stop."""
        kind = msg[0]
        if kind == "grammar":  # compile and warm the first mask before a sequence needs it
            try:
                compiled = self.compile_spec(self.compiler, msg[1])
                GrammarMatcher(compiled).fill_next_token_bitmask(torch.zeros_like(self.bitmask[:1]))
            except Exception:
                log.exception("compiling a grammar in a worker process failed")
        elif kind == "add":  # a new sequence: its matcher and first mask
            _, sid, spec = msg
            try:
                self.matchers[sid] = GrammarMatcher(self.compile_spec(self.compiler, spec))
            except Exception:
                log.exception("compiling a grammar in a worker process failed; the sequence is aborted")
                self.matchers[sid] = None
                return True
            self.masks[sid] = torch.empty(1, self.words, dtype=torch.int32)
            self.advance(sid, [])
        elif kind == "drop":
            for sid in msg[1]:
                self.matchers.pop(sid, None)
                self.masks.pop(sid, None)
                self.restricts.pop(sid, None)
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
    grammars: dict[str, int] = field(default_factory=dict)  # of those, how many per grammar key
    acc_posted: int = 0  # accept posts so far
    row_posted: int = 0  # row posts so far
    drops: list[int] = field(default_factory=list)  # ids of released sequences, sent before its next post
    dead: bool = False

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.conn.send(msg)


@dataclass(eq=False)
class _Entry:
    """A constrained sequence: its worker, its matcher's id there, and its grammar's key."""

    worker: _Worker
    sid: int
    key: str
    failed: bool = False


@dataclass
class ProcessMaskJob:
    """Rows posted for one step: the sequences by row, the workers to wait for and, per worker, its entries with
    their rows."""

    seqs: list[Sequence]
    sent: list[tuple[_Worker, list[tuple[int, _Entry]]]]
    free_rows: list[int]


class GrammarProcessPool:
    """Matchers of constrained sequences, spread over `workers` processes (by grammar, see the module docstring;
    a grammar new to all takes the least loaded one)."""

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
        self._job: ProcessMaskJob | None = None  # the step's rows, until its tokens are posted
        self._last: ProcessMaskJob | None = None  # the last step's rows, reposted as they are if nothing changed
        self._unchanged = True  # no entry failed and no worker was lost or arrays grown since the last step
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
        self._ctl, self._tokens, self._row_tokens = shared.ctl.numpy(), shared.tokens.numpy(), shared.row_tokens.numpy()
        self._rows, self._failed = shared.rows.numpy(), shared.failed.numpy()

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

    def add(self, seq: Sequence, spec: Any, key: str) -> None:
        """A new constrained sequence; `key` names its grammar (GrammarSpec.key)."""
        worker = self._assign(key)
        worker.live += 1
        entry = _Entry(worker, next(self._ids), key)
        self._entries[seq] = entry
        self._by_sid[entry.sid] = entry
        if not self._send(worker, ("add", entry.sid, spec)):
            entry.failed = True
            self._unchanged = False

    def release(self, seq: Sequence) -> None:
        """The sequence finished: its matcher goes before the worker's next post."""
        entry = self._entries.pop(seq, None)
        if entry is None:
            return
        del self._by_sid[entry.sid]
        entry.worker.live -= 1
        entry.worker.drops.append(entry.sid)
        held = entry.worker.grammars
        held[entry.key] -= 1
        if not held[entry.key]:
            del held[entry.key]

    def sampled(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Post the tokens just sampled (every one must be, before `accept` sees it), so that the workers accept
        them and build the next masks while the engine emits them, schedules and runs the next forward."""
        job, self._job = self._job, None
        if job is not None and len(seqs) == len(job.seqs) and all(map(operator.is_, seqs, job.seqs)):
            self._row_tokens[: len(token_ids)] = token_ids  # every row as posted this step: one write for all
            for worker, _ in job.sent:
                self._post_tokens(worker, None)
            return
        per_worker: dict[_Worker, list[int]] = {}
        for seq, tok in zip(seqs, token_ids):
            e = self._entries.get(seq)
            if e is not None and not e.failed:
                per_worker.setdefault(e.worker, []).extend((e.sid, tok))
        for worker, pairs in per_worker.items():
            self._post_tokens(worker, pairs)

    def start(self, seqs: list[Sequence]) -> ProcessMaskJob | None:
        """Post which sequence is which bitmask row this step (`seqs[i]` is row i); None when no row is
        constrained."""
        if len(seqs) > self.bitmask.shape[0]:
            self._grow(len(seqs))
        last, self._job, self._last = self._last, None, None
        if (last is not None and self._unchanged and len(seqs) == len(last.seqs)
                and all(map(operator.is_, seqs, last.seqs))):
            # The batch of the last step (the common case in decoding), whose row tables the workers still hold.
            seqs, groups, free_rows, write = last.seqs, last.sent, list(last.free_rows), False
        else:
            seqs, (groups, free_rows), write = list(seqs), self._layout(seqs), True
            for w in self._workers:  # an accept post by row writes masks into its last rows: not past this point
                if not w.dead and self._ctl[w.index, ACC_DONE] != w.acc_posted and not self._wait(w, ACC_DONE):
                    self._lost(w)
        self._unchanged = True
        sent = []
        for worker, rows in groups:
            if self._ctl[worker.index, ROW_DONE] != worker.row_posted and not self._wait(worker, ROW_DONE):
                self._lost(worker)  # a step left unfinished (an exception between start and finish): wait for it
            if worker.drops:
                self._send(worker, ("drop", self._drain(worker)))
            if worker.dead:
                self._fail_rows(rows)
                free_rows.extend(row for row, _ in rows)
                continue
            if write:
                flat = [len(rows)]
                for row, e in rows:
                    flat += (row, e.sid)
                self._rows[worker.index, : len(flat)] = flat
            worker.row_posted += 1
            self._post(worker, ROW_POSTED, worker.row_posted)
            sent.append((worker, rows))
        if not sent:
            return None
        self._last = self._job = ProcessMaskJob(seqs, sent, free_rows)
        return self._job

    def _layout(self, seqs: list[Sequence]) -> tuple[list[tuple[_Worker, list[tuple[int, _Entry]]]], list[int]]:
        """Each worker's (row, entry) pairs among the step's rows, and the rows no grammar restricts."""
        per_worker: dict[_Worker, list[tuple[int, _Entry]]] = {}
        free_rows = []
        for row, seq in enumerate(seqs):
            entry = self._entries.get(seq)
            if entry is None or entry.failed:
                free_rows.append(row)
            else:
                per_worker.setdefault(entry.worker, []).append((row, entry))
        return list(per_worker.items()), free_rows

    def finish(self, job: ProcessMaskJob) -> torch.Tensor | None:
        """Wait for the step's rows: the bitmask rows (or None when no row restricts anything)."""
        restricts = False
        for worker, rows in job.sent:
            if not self._wait(worker, ROW_DONE):
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
                    self._unchanged = False
        if not restricts:
            return None
        if job.free_rows:
            self.bitmask[job.free_rows] = -1
        return self.bitmask[: len(job.seqs)]

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """A token posted by `sampled` was appended: the finish reason the grammar gives, if any. "stop" for a
        stop token, without asking the worker, since the token was sampled under the row's mask, which allows stop
        tokens only where the grammar can end (a row that allows everything is either failed, hence "abort", or at
        such a point)."""
        entry = self._entries.get(seq)
        if entry is None:
            return None
        if entry.failed:
            return "abort"
        return "stop" if token_id in self.stop_token_ids else None

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
    def _assign(self, key: str) -> _Worker:
        """The worker for a new sequence of grammar `key`: one holding that grammar with room left, else the least
        loaded."""
        live = [w for w in self._workers if not w.dead]
        worker = next((w for w in live if 0 < w.grammars.get(key, 0) < AFFINITY_ROWS), None)
        if worker is None:
            worker = min(live, key=lambda w: w.live)
        worker.grammars[key] = worker.grammars.get(key, 0) + 1
        return worker

    def _post_tokens(self, worker: _Worker, pairs: list[int] | None) -> None:
        """An accept post: (matcher id, token) pairs flattened, or None for the tokens of the worker's last row post
        by row, in the shared row tokens."""
        if worker.dead or (self._ctl[worker.index, ACC_DONE] != worker.acc_posted
                           and not self._wait(worker, ACC_DONE)):
            self._lost(worker)
            return
        table = self._tokens[worker.index]
        if pairs is None:
            table[0] = BY_ROW
        else:
            table[0] = len(pairs) // 2
            table[1 : 1 + len(pairs)] = pairs
        worker.acc_posted += 1
        self._post(worker, ACC_POSTED, worker.acc_posted)

    def _post(self, worker: _Worker, column: int, count: int) -> None:
        """Publish a post whose table is written, and wake the worker if it sleeps."""
        _fence()
        self._ctl[worker.index, column] = count
        _fence()
        if self._ctl[worker.index, SLEEPING]:
            self._send(worker, ("wake",))

    def _wait(self, worker: _Worker, column: int) -> bool:
        """Spin until the worker has done its last post of a kind (ACC_DONE or ROW_DONE); False if it died."""
        ctl = self._ctl[worker.index]
        want = worker.acc_posted if column == ACC_DONE else worker.row_posted
        spins = 0
        while ctl[column] != want:
            spins += 1
            if spins % _LIVENESS_SPINS == 0 and not worker.process.is_alive():
                return False
            os.sched_yield()
        _fence()
        return True

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
        self._unchanged = False
        if self._closing:  # killed with the server (a signal to its process group), not lost
            return
        log.error("grammar worker process %s died (exit code %s); its sequences are aborted",
                  worker.process.pid, worker.process.exitcode)
        for e in self._entries.values():
            if e.worker is worker:
                e.failed = True
        self._workers[self._workers.index(worker)] = self._start(worker.index)

    def _fail_rows(self, rows: list[tuple[int, _Entry]]) -> None:
        for _, e in rows:
            e.failed = True
        self._unchanged = False

    def _unpin(self) -> None:
        if self._pin:
            torch.cuda.cudart().cudaHostUnregister(self._shared.bitmask.data_ptr())

    def _grow(self, rows: int) -> None:
        """More rows than the shared arrays hold (never at the engine's own batch limits): bigger ones, once every
        worker is done with the old ones."""
        for w in self._workers:
            if not (self._wait(w, ACC_DONE) and self._wait(w, ROW_DONE)):
                self._lost(w)
        self._unpin()
        self._shared = SharedArrays.allocate(len(self._workers), rows, self.words, self._shared.ctl)
        self._use_shared()
        self._unchanged = False
        for w in self._workers:
            self._send(w, ("arrays", self._shared))
