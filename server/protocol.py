"""Request and response bodies of the OpenAI API (plus vLLM's sampling extras), as pydantic models.

Requests allow unknown fields (clients send vendor extras freely) but reject known fields this server cannot
honour yet, so a client never gets an answer that silently ignored what it asked for. Responses are dumped with
`exclude_unset`, so a field appears exactly when a handler sets it, as in OpenAI's own streams.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from treadle.engine.sampling_params import InvalidParameterError, ParallelParams, SamplingParams

from .errors import bad_request

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI-compatible servers clamp here


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


# ---- structured outputs -----------------------------------------------------------------------------------------
class _Closed(BaseModel):
    """Option objects whose every key changes the output: an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JSONSchemaSpec(_Request):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool | str = Field(alias="schema")
    strict: bool | None = None


class TextFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


class StructuralTagFormat(_Request):
    """xgrammar's structural tag: {"type": "structural_tag", "format": {...}}."""

    type: Literal["structural_tag"]
    format: dict[str, Any]


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat | StructuralTagFormat,
                           Field(discriminator="type")]


class StructuredOutputs(_Closed):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_schema: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None


class ParallelOptions(_Closed):
    """treadle's `parallel` extra: Multiverse generation (engine/multiverse.py). Unsent keys keep the server's
    defaults (`parallel` in the serve config), else ParallelParams' own.

    Answers: `content` (`text` for completions) is the whole document in order, paths in outline order;
    `branches` lists every path's whole text as {"path": "1", "text": ...}, nested paths as "1/1.2";
    `usage.completion_tokens` counts the tokens of every path, `usage.completion_depth` the positions used (what
    `max_tokens` bounds). Streams: `delta.content` (`text`) carries the document in order, so a plain client reads
    the same text (a path's text waits until the paths before it are done); `delta.paths` (`paths` on a
    completions choice) carries each path's new text as it is generated, as [{"path": "2", "text": "..."}].
    """

    enabled: bool | None = None
    max_paths: int | None = None
    max_depth: int | None = None
    max_total_tokens: int | None = None
    min_fork_budget: int | None = None

    def params(self, default: ParallelParams | None) -> ParallelParams:
        return dataclasses.replace(default or ParallelParams(), **self.model_dump(exclude_none=True))


class InlineContext(_Closed):
    """A context given by its text in the request: encoded on the fly and cached by content (engine/ape.py)."""

    text: str = Field(min_length=1)


class ApeOptions(_Closed):
    """treadle's `ape` extra: temperature T and scale S of the cached contexts' attention (features brief B1);
    unsent keys keep the served model's defaults (`ape_temperature`, `ape_scale` in the serve config)."""

    temperature: float | None = Field(default=None, gt=0)
    scale: float | None = Field(default=None, gt=0)


class _GenerationRequest(_Request):
    """Fields shared by chat and text completions; None means "not sent", i.e. the OpenAI default."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    priority: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None  # vLLM's older spellings of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    parallel: ParallelOptions | None = None
    # APE cached contexts (server/contexts.py): ids from POST /v1/contexts or inline texts, encoded after the
    # model's shared prefix; the request's own prompt after the prefix is the query.
    contexts: list[str | InlineContext] | None = Field(default=None, min_length=1)
    ape: ApeOptions | None = None

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options can only be set when stream is true", "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, max_logprobs: int,
                         parallel: ParallelParams | None) -> SamplingParams:
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            n=self.n,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            parallel=self.parallel.params(parallel) if self.parallel is not None else parallel,
            **{k: v for k, v in given.items() if v is not None},
        )
        params.validate(max_logprobs)
        return params


# ---- chat completions -------------------------------------------------------------------------------------------
class ContentPart(_Request):
    type: str
    text: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def template_dict(self, position: int) -> dict[str, Any]:
        """The message as chat templates expect it: content flattened to one string (tool calls are kept as
        sent; server/tools.py adapts them to the template)."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"content parts of type '{part.type}' are not supported; send text parts",
                                      f"messages.{position}.content")
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        return {**self.model_dump(exclude_none=True), "content": content}


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True

    def to_sampling_params(self, max_logprobs: int, parallel: ParallelParams | None = None) -> SamplingParams:
        """`parallel`: the server's default for requests that do not send the field."""
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, max_logprobs, parallel)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class PathText(BaseModel):
    """One parallel path's text; `path` joins outline ids from the outermost block in ("2", "1/1.2")."""

    path: str
    text: str


class ChatResponseMessage(BaseModel):
    role: str
    content: str | None
    tool_calls: list[ToolCall] | None = None  # left out (unset) when the answer has none
    branches: list[PathText] | None = None  # parallel generation: every path's whole text, in document order


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_depth: int | None = None  # parallel generation: positions used (completion_tokens counts every path)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """The first delta of a call has id, type and name; later ones only argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    paths: list[PathText] | None = None  # parallel generation: each path's new text, as generated


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- text completions -------------------------------------------------------------------------------------------
class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling_params(self, max_logprobs: int, parallel: ParallelParams | None = None) -> SamplingParams:
        """`parallel`: the server's default for requests that do not send the field."""
        self._check_common()
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (it must equal n)", "best_of")
        try:
            return self._sampling_params(self.max_tokens if self.max_tokens is not None else 16, self.logprobs,
                                         max_logprobs, parallel)
        except InvalidParameterError as exc:
            if exc.param == "top_logprobs":  # the completions API calls it `logprobs`
                raise InvalidParameterError(f"logprobs must be in [0, {max_logprobs}]", "logprobs") from None
            raise


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    paths: list[PathText] | None = None  # as in ChatDelta (streaming) and ChatResponseMessage
    branches: list[PathText] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- tokenizer endpoints ----------------------------------------------------------------------------------------
class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "treadle"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- cached contexts (treadle's APE extra) ----------------------------------------------------------------------
class ContextCreateRequest(_Request):
    """POST /v1/contexts: exactly one of `text` (encoded without special tokens) and `tokens`."""

    model: str | None = None
    text: str | None = None
    tokens: list[int] | None = None


class ContextObject(BaseModel):
    id: str
    object: Literal["context"] = "context"
    created: int
    tokens: int
    cached: bool  # its KV is in the pool now (it is encoded again on next use otherwise)


class ContextList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ContextObject]


class ContextDeleted(BaseModel):
    id: str
    object: Literal["context.deleted"] = "context.deleted"
    deleted: bool = True
