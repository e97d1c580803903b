"""Request and sequence state owned by the engine loop (one thread touches it)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from .kv_cache import SeqKV
from .sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SUSPENDED = "suspended"  # holds its KV but is not scheduled: a parent waiting for its parallel paths, or a
    # path waiting for its siblings
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its tokens, its KV index and its decoding state."""

    request: Request
    index: int  # choice index within the request
    token_ids: list[int]  # prompt + generated
    kv: SeqKV = field(default_factory=SeqKV)
    num_computed: int = 0  # leading tokens whose KV is in the cache
    status: SeqStatus = SeqStatus.WAITING
    sampling: Any = None  # SeqSamplingState
    detokenizer: Any = None  # IncrementalDetokenizer
    stop_checker: Any = None  # StopChecker
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    # Parallel generation (engine/multiverse.py). A path's KV extends its suspended parent's, so preemption
    # re-forks it from `fork_base` and recomputes only its own tokens. Once a sequence's KV index holds a merge
    # (paths that do not see each other), no causal prefill can rebuild it: it is never a preemption victim.
    fork_base: Sequence | None = None
    recomputable: bool = True
    parallel: Any = None  # multiverse.PathState
    # APE (engine/ape.py): `ape` is the request's view of its cached contexts (its positions jump past the longest
    # context after the shared prefix); `encodes` marks the prefill that computes one context's KV (never samples).
    ape: Any = None  # ape.ApeState
    encodes: Any = None  # ape.CachedContext

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Scheduling order: lower priority value first, then arrival, then choice index (FCFS with priority)."""
        return (self.request.priority, self.request.arrival_order, self.index)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


_arrivals = itertools.count()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0
    max_tokens: int = 0  # resolved: params.max_tokens or what the context leaves
    on_output: Callable[[Any], None] | None = None  # called on the engine thread with each RequestOutput
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1 choices have been forked from the prompt's sequence
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    num_context_tokens: int = 0  # APE contexts the prompt attends: part of the prompt, as OpenAI's usage counts it
    num_cached_context_tokens: int = 0  # of those, found already encoded
    arrival_order: int = field(default_factory=lambda: next(_arrivals))

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs)
