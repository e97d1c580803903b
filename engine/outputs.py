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
class PathText:
    """Text of one parallel path; `path` joins the outline ids from the outermost block in, e.g. "2" or "1/1.2"."""

    path: str
    text: str


@dataclass
class CompletionOutput:
    """Delta for one choice since the previous RequestOutput of the same request."""

    index: int
    text: str  # new, safe-to-show text (a possible partial stop string is held back)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    num_generated_tokens: int = 0  # cumulative; with parallel generation, over every path
    # Parallel generation only: `text` is the document in order (a path's text is held back until the paths
    # before it are done); `paths` is each path's new text as generated; `branches`, on the final output,
    # is every path's whole text in document order.
    depth: int | None = None  # cumulative positions used after the prompt
    paths: list[PathText] | None = None
    branches: list[PathText] | None = None


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
    parallel_forks: int = 0  # blocks forked into parallel paths
    parallel_merges: int = 0  # blocks merged back (conclusion prefilled on top of every path)
    parallel_branches: int = 0  # live path sequences (gauge)
    parallel_tokens: int = 0  # tokens of finished parallel documents, every path counted
    parallel_depth: int = 0  # positions those documents used; parallel_tokens / parallel_depth = parallelism
    ape_context_hits: int = 0  # contexts requests found cached (or being encoded)
    ape_context_misses: int = 0  # contexts requests had to encode
    ape_context_evictions: int = 0  # cached contexts whose KV was dropped for room
    ape_encoded_tokens: int = 0  # tokens computed by context encoders
    ape_cached_contexts: int = 0  # contexts whose KV is in the pool (gauge)
    ape_cached_context_tokens: int = 0  # their tokens (gauge)
