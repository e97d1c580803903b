"""Continuous batching: which sequences run in the next forward pass, and how many tokens each.

Every step mixes decodes and chunked prefills under one token budget (`max_num_batched_tokens`) and a cap on
live sequences (`max_num_seqs`). Running sequences go first, in priority order; waiting ones are admitted while
budget, sequence slots and KV pages last. When a running sequence needs a page and none is free, the
lowest-ranked running sequence is preempted by recompute: its KV is dropped and it waits again with all its
tokens (the prefix cache usually gives most of them back on re-admission).

Parallel paths (engine/multiverse.py): a path keeps sharing its suspended parent's KV when preempted and
recomputes only its own tokens. A sequence whose KV holds a merge cannot be recomputed, so it is never a victim;
if it needs a page that no lower-ranked recomputable sequence can give up, it waits out the step.

APE cached contexts (engine/ape.py) hold pages outside the running batch; when pages run short, `reclaim` drops
the ones no request uses before any sequence is preempted. An APE sequence looks up only its shared prefix in the
prefix cache (the rest attends its contexts, so it is never published) and takes its own position ids.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager, SeqKV
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._waiting: list[tuple[tuple[int, int, int], int, Sequence]] = []  # heap by sort key
        self.running: list[Sequence] = []  # kept in sort-key order
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found cached
        # Keep a sliver of the pool free when admitting, so admissions don't force immediate preemptions.
        self._admit_reserve = max(1, kv.num_pages // 100)
        # Frees at least the given number of pages held by caches outside the batch, if it can (engine/ape.py).
        self.reclaim: Callable[[int], None] = lambda pages: None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        heapq.heappush(self._waiting, (seq.sort_key, seq.seq_id, seq))

    def add_running(self, seq: Sequence) -> None:
        """Insert a sequence that already holds KV (a fork) into the running set."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self.running.sort(key=lambda s: s.sort_key)

    def suspend(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch but keep its KV (a fork's parent, a finished parallel path)."""
        self.running.remove(seq)
        seq.status = SeqStatus.SUSPENDED

    def release(self, seq: Sequence) -> None:
        """Drop a sequence's KV and take it out of the queues, keeping its tokens (a swapped-out parallel document,
        recomputed path by path when its root runs again)."""
        self._dequeue(seq)
        self.kv.free(seq.kv)
        seq.kv = SeqKV()
        seq.num_computed = 0
        seq.status = SeqStatus.SUSPENDED

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and release its KV."""
        self._dequeue(seq)
        self.kv.free(seq.kv)
        seq.status = SeqStatus.FINISHED

    def _dequeue(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self._waiting = [e for e in self._waiting if e[2] is not seq]
            heapq.heapify(self._waiting)

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def _reset_kv(self, seq: Sequence) -> None:
        """Drop the sequence's own KV; a parallel path keeps sharing its suspended parent's."""
        self.kv.free(seq.kv)
        seq.kv = SeqKV() if seq.fork_base is None else self.kv.fork(seq.fork_base.kv)
        seq.num_computed = len(seq.kv)

    def _victim(self, seq: Sequence) -> Sequence | None:
        """The lowest-ranked running sequence, ranked no higher than `seq`, that can be recomputed."""
        for victim in reversed(self.running[self.running.index(seq) :]):
            if victim.recomputable:
                return victim
        return None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._reset_kv(seq)
        self.add(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _fits(self, seq: Sequence, n: int, reserve: int = 0) -> bool:
        if self.kv.can_append(seq.kv, n, reserve):
            return True
        self.reclaim(self.kv.pages_needed(seq.kv, n) + reserve - self.kv.num_free_pages)
        return self.kv.can_append(seq.kv, n, reserve)

    def _append(self, seq: Sequence, n: int) -> None:
        self.kv.append(seq.kv, n, None if seq.ape is None else seq.ape.positions(seq.num_computed, n))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while not self._fits(seq, n):
                victim = self._victim(seq)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING or not self.kv.can_append(seq.kv, n):
                continue
            self._append(seq, n)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n

        while self._waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._waiting[0][2]
            if not seq.kv.slots:
                if seq.ape is None:
                    hit = self.kv.match_prefix(seq.kv, seq.token_ids)
                else:
                    hit = self.kv.match_prefix(seq.kv, seq.token_ids[: seq.ape.prefix_len + 1])
                    seq.kv.cacheable = False
                seq.num_computed = hit
                if seq.index == 0 and not seq.request.forked and seq.num_generated == 0:
                    seq.request.num_cached_tokens = hit
            n = min(seq.num_uncomputed, budget)
            if not self._fits(seq, n, reserve=self._admit_reserve if self.running else 0):
                self._reset_kv(seq)  # give back the prefix pages; matching is repeated next time
                break
            heapq.heappop(self._waiting)
            self.prefix_cache_queries += len(seq.token_ids)
            self.prefix_cache_hits += seq.num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._append(seq, n)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        self.running.sort(key=lambda s: s.sort_key)
        return out
