"""Per-request generation parameters, validated once at the door so the engine loop never sees bad values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treadle.grammars import CompiledGrammar


class InvalidParameterError(ValueError):
    """A request parameter is out of range; `param` names it (the server turns this into a 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ParallelParams:
    """Multiverse generation (engine/multiverse.py): the model forks parallel paths at `</Goal>` and merges them.

    With it on, `SamplingParams.max_tokens` bounds depth (positions after the prompt), not the token count.
    """

    enabled: bool = True
    max_paths: int = 8  # an outline with more entries is not forked: the model writes its paths one by one
    max_depth: int = 2  # nesting levels of forked blocks
    max_total_tokens: int | None = None  # tokens over every path together; None: no bound beyond max_tokens
    min_fork_budget: int = 30  # positions (and, per path, total tokens) that must be left for a fork

    def validate(self) -> None:
        if self.max_paths < 1:
            raise InvalidParameterError("parallel.max_paths must be at least 1", "parallel.max_paths")
        if self.max_depth < 0:
            raise InvalidParameterError("parallel.max_depth must be non-negative", "parallel.max_depth")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise InvalidParameterError("parallel.max_total_tokens must be at least 1", "parallel.max_total_tokens")
        if self.min_fork_budget < 0:
            raise InvalidParameterError("parallel.min_fork_budget must be non-negative", "parallel.min_fork_budget")


@dataclass
class ApeParams:
    """APE cached contexts (engine/ape.py): each context is encoded once after the model's shared prefix, at the
    same positions as the others, and every query/generated token attends their union with temperature
    `temperature`, its attention mass scaled by `scale` (features brief B1; T = S = 1 is naive parallel encoding).
    """

    contexts: list[list[int]]  # token ids of each context, without the shared prefix
    temperature: float = 0.9
    scale: float = 0.9

    def validate(self) -> None:
        if not self.contexts or any(not c for c in self.contexts):
            raise InvalidParameterError("contexts must be a non-empty list of non-empty contexts", "contexts")
        if not self.temperature > 0:
            raise InvalidParameterError("ape.temperature must be positive", "ape.temperature")
        if not self.scale > 0:
            raise InvalidParameterError("ape.scale must be positive", "ape.scale")


# Offline-API hook: (the sequence's token ids so far, its [vocab] logits) -> logits to sample from.
LogitsProcessor = Callable[[list[int], Any], Any]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = None  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus k alternatives
    skip_special_tokens: bool = True
    grammar: CompiledGrammar | None = None  # output constraint, compiled by the server (engine/guided.py)
    parallel: ParallelParams | None = None  # Multiverse generation; None or disabled: off
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # offline API only, never from HTTP
    ape: ApeParams | None = None  # attend cached contexts (engine/ape.py); None: an ordinary prompt

    def validate(self, max_logprobs: int = 20) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidParameterError(msg, param)

        if self.n < 1:
            bad("n must be at least 1", "n")
        if self.temperature < 0:
            bad("temperature must be non-negative", "temperature")
        if not 0 < self.top_p <= 1:
            bad("top_p must be in (0, 1]", "top_p")
        if self.top_k < -1:
            bad("top_k must be -1 (off), 0 (off) or positive", "top_k")
        if not 0 <= self.min_p <= 1:
            bad("min_p must be in [0, 1]", "min_p")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty must be positive", "repetition_penalty")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty must be in [-2, 2]", "presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty must be in [-2, 2]", "frequency_penalty")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens must be at least 1", "max_tokens")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens must be in [0, max_tokens]", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            bad(f"top_logprobs must be in [0, {max_logprobs}]", "top_logprobs")
        if any(not s for s in self.stop):
            bad("stop strings must be non-empty", "stop")
        if self.parallel_enabled:
            self.parallel.validate()
            if self.logprobs is not None:
                bad("logprobs are not supported with parallel generation", "logprobs")
        if self.ape is not None:
            self.ape.validate()
            if self.parallel_enabled:
                bad("contexts are not supported with parallel generation", "contexts")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def parallel_enabled(self) -> bool:
        return self.parallel is not None and self.parallel.enabled
