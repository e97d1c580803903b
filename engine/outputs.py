"""What the engine hands back to the server: incremental deltas per choice, plus per-request timing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class CompletionOutput:
    """Delta for one choice since the previous RequestOutput of the same request."""

    index: int
    text: str  # new, safe-to-show text (a possible partial stop string is held back)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    num_generated_tokens: int = 0  # cumulative


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]  # only the choices that have news
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    finished: bool = False  # every choice finished
    arrival_time: float = 0.0  # time.monotonic() at admission
    first_token_time: float | None = None


@dataclass
class EngineStats:
    """A snapshot read by the metrics exporter; counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV pages in use by live sequences
    num_free_pages: int = 0
    num_total_pages: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found cached
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
