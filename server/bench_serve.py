"""`treadle bench serve`: a load generator for any OpenAI-compatible streaming server.

The metrics use the definitions of vLLM's `vllm bench serve`, so numbers are comparable across engines:

- TTFT: from sending the request to the first streamed chunk that carries output. A chat stream's opening
  role chunk (`{"role": "assistant", "content": ""}`) carries none; some servers send it before prefill.
- TPOT per request: (E2E latency - TTFT) / (output tokens - 1), only for outputs of more than one token.
  For goodput, a request with one output token counts as TPOT 0.
- ITL: every gap between consecutive output chunks, pooled over requests. One chunk may hold several tokens,
  so ITL and TPOT can differ.
- E2E latency: from sending the request to the last chunk with choices. The trailing usage chunk is excluded.
- Output tokens: `usage.completion_tokens` (requested through `stream_options.include_usage`). Without
  usage, the number of output chunks is used instead.
- Goodput: completed requests per second that meet every given SLO (`--goodput ttft:MS tpot:MS e2el:MS`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")

# Common English words. With byte-level BPE each one is usually a single token after a space, so a prompt of
# N words is close to N tokens even when the server cannot tokenize for us.
WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be not or have had"
    " one first new their after who they has two its also been but her more time other into all some may over"
    " year city most years only there people when world these state three known about during team later made"
    " because part war under would he she can where used between many name such them season while each number"
    " being country before both family then through school since around series like same national several"
    " history work music group area did well river four long game life company however film album house church"
    " line second five best until based early government local public way water north south east west small"
    " large place day end village named found high final major general main support form league original began"
    " court member following period own days released position members children station single within against"
    " including among road another even free left right power system county point open building without last"
    " population along great center town played half next became language island light field media table paper"
    " market order class study service garden bridge window simple quiet bright story letter morning evening"
    " winter summer autumn spring"
).split()

PromptCodec = tuple[Callable[[str], Awaitable[list[int]]], Callable[[list[int]], Awaitable[str]]]


@dataclass
class BenchRequest:
    """One prompt to send. `prompt_len` is its size in tokens when known (0 otherwise; usage fills it)."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    """What the client saw for one request; times are seconds from `time.perf_counter()`."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


@dataclass
class LatencyStats:
    """Mean, median, std and chosen percentiles of one latency metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[str, float]


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None  # None when no SLO was given
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float  # busiest one-second bucket of output chunks
    max_concurrent_requests: int  # peak number of requests in flight at once
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats

    def to_dict(self) -> dict:
        """Flat keys as vLLM writes them (`mean_ttft_ms`, `p99_itl_ms`, ...), so tooling can read both."""
        out = {k: v for k, v in asdict(self).items() if k not in ("ttft", "tpot", "itl", "e2el")}
        for name in ("ttft", "tpot", "itl", "e2el"):
            stats: LatencyStats = getattr(self, name)
            out[f"mean_{name}_ms"] = stats.mean_ms
            out[f"median_{name}_ms"] = stats.median_ms
            out[f"std_{name}_ms"] = stats.std_ms
            for key, value in stats.percentiles_ms.items():
                out[f"{key}_{name}_ms"] = value
        return out


@dataclass
class BenchConfig:
    """How to drive the server; `model=None` takes the first entry of `/v1/models`."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None
    api_key: str | None = None
    request_rate: float = math.inf  # requests/s; inf sends everything at t=0
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1.0 is Poisson
    max_concurrency: int | None = None
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> SLO in ms
    seed: int = 0
    request_timeout_s: float = 6 * 3600.0
    progress: bool = True


@dataclass
class BenchmarkResult:
    metrics: BenchmarkMetrics
    results: list[RequestResult]
    model: str


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def latency_stats(values_s: list[float], percentiles: list[float]) -> LatencyStats:
    """Statistics in ms; an empty list gives zeros, as vLLM reports when a metric has no samples."""
    arr = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    return LatencyStats(
        mean_ms=float(arr.mean()),
        median_ms=float(np.median(arr)),
        std_ms=float(arr.std()),
        percentiles_ms={percentile_key(p): float(np.percentile(arr, p)) for p in percentiles},
    )


def compute_metrics(
    results: list[RequestResult], duration_s: float, percentiles: list[float], goodput: dict[str, float]
) -> BenchmarkMetrics:
    """Aggregate per-request results with vLLM bench serve's definitions (see the module docstring)."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    itls = [gap for r in ok for gap in r.itl]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)

    request_goodput = None
    if goodput:
        per_request = {
            "ttft": ttfts,
            "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok],
            "e2el": e2els,
        }
        good = sum(
            all(per_request[name][i] <= slo_ms / 1000.0 for name, slo_ms in goodput.items()) for i in range(len(ok))
        )
        request_goodput = good / duration_s

    max_tokens_per_s, peak = 0.0, 0
    if ok:
        t0 = min(r.start_time for r in ok)
        buckets = np.zeros(int(math.ceil(max(r.start_time + r.latency for r in ok) - t0)) + 1)
        for r in ok:
            chunk_times = r.start_time + r.ttft + np.concatenate(([0.0], np.cumsum(r.itl)))
            np.add.at(buckets, (chunk_times - t0).astype(np.int64), 1)
        max_tokens_per_s = float(buckets.max())
        # Half-open intervals [start, end): an end and a start at the same instant do not overlap.
        events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
        running = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)

    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(ok) / duration_s,
        request_goodput=request_goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=max_tokens_per_s,
        max_concurrent_requests=peak,
        ttft=latency_stats(ttfts, percentiles),
        tpot=latency_stats(tpots, percentiles),
        itl=latency_stats(itls, percentiles),
        e2el=latency_stats(e2els, percentiles),
    )


def arrival_offsets(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from the start) of n requests.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate, Poisson at burstiness 1, burstier
    below 1. As in vLLM the cumulative times are rescaled so the last one is exactly n/rate; then throughput does
    not drift with the seed.
    """
    if math.isinf(request_rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    return offsets * ((n / request_rate) / offsets[-1])


def sample_lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform integer lengths in [mean*(1-r), mean*(1+r)], at least 1, as vLLM's random dataset draws them."""
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


async def sized_prompt(target_len: int, rng: np.random.Generator, codec: PromptCodec | None) -> BenchRequest:
    """A prompt of random common words, cut to exactly `target_len` tokens when a tokenizer is at hand.

    Random words keep every prompt distinct, so a prefix cache cannot hide prefill cost. Decoding a token
    prefix can re-tokenize one token longer or shorter at the cut; vLLM accepts the same drift. The server's
    usage count corrects `prompt_len` after the request.
    """
    words = list(rng.choice(WORDS, size=target_len))
    if codec is None:
        return BenchRequest(prompt=" ".join(words), prompt_len=0, output_len=0)
    encode, decode = codec
    ids = await encode(" ".join(words))
    while len(ids) < target_len:
        words += list(rng.choice(WORDS, size=target_len - len(ids)))
        longer = await encode(" ".join(words))
        if len(longer) <= len(ids):
            raise RuntimeError("the server's /tokenize does not grow with the text; cannot size prompts")
        ids = longer
    return BenchRequest(prompt=await decode(ids[:target_len]), prompt_len=target_len, output_len=0)


async def random_requests(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    codec: PromptCodec | None,
) -> list[BenchRequest]:
    in_lens = sample_lengths(n, input_len, range_ratio, rng)
    out_lens = sample_lengths(n, output_len, range_ratio, rng)
    # One generator per prompt, drawn up front, so prompts do not depend on the order tokenize calls finish.
    seeds = rng.integers(0, 2**63 - 1, size=n)
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> BenchRequest:
        async with sem:
            req = await sized_prompt(int(in_lens[i]), np.random.default_rng(int(seeds[i])), codec)
        req.output_len = int(out_lens[i])
        return req

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def read_jsonl_requests(path: str | Path, default_output_len: int) -> list[BenchRequest]:
    """Prompts from a jsonl file: one object per line with "prompt" and optionally "output_len"."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f'{path}:{lineno}: expected an object with a string "prompt"')
            out_len = obj.get("output_len", default_output_len)
            if not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1:
                raise ValueError(f'{path}:{lineno}: "output_len" must be a positive integer')
            requests.append(BenchRequest(prompt=obj["prompt"], prompt_len=0, output_len=out_len))
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests


async def count_prompt_tokens(requests: list[BenchRequest], codec: PromptCodec) -> None:
    """Fill `prompt_len` of file prompts, a few tokenize calls at a time so the server is not flooded."""
    sem = asyncio.Semaphore(8)

    async def one(req: BenchRequest) -> None:
        async with sem:
            req.prompt_len = len(await codec[0](req.prompt))

    await asyncio.gather(*(one(r) for r in requests))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def server_codec(client: httpx.AsyncClient, base_url: str, model: str, api_key: str | None) -> PromptCodec:
    """Tokenize/detokenize through the server's vLLM-style `/tokenize` and `/detokenize` routes."""
    headers = _headers(api_key)

    async def encode(text: str) -> list[int]:
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        r = await client.post(f"{base_url}/tokenize", json=body, headers=headers)
        r.raise_for_status()
        return list(r.json()["tokens"])

    async def decode(ids: list[int]) -> str:
        r = await client.post(f"{base_url}/detokenize", json={"model": model, "tokens": ids}, headers=headers)
        r.raise_for_status()
        return str(r.json()["prompt"])

    return encode, decode


async def probe_codec(codec: PromptCodec) -> bool:
    """Whether the server's tokenizer routes answer in the expected shape."""
    encode, decode = codec
    try:
        return isinstance(await decode(await encode("hello world")), str)
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return False


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    r = await client.get(f"{base_url}/v1/models", headers=_headers(api_key))
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no models")
    return str(data[0]["id"])


def build_payload(cfg: BenchConfig, model: str, req: BenchRequest) -> dict:
    payload: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "/v1/chat/completions":
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(cfg.extra_body)
    return payload


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each server-sent event: comment lines skipped, multi-line data joined with newlines."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


def _chunk_output(choice: dict) -> str:
    """The output a streamed choice carries: completions text or a chat delta's content, reasoning or tool call."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
    if not text and delta.get("tool_calls"):
        return json.dumps(delta["tool_calls"])
    return text


async def send_request(
    client: httpx.AsyncClient, url: str, payload: dict, headers: dict[str, str], prompt_len: int
) -> RequestResult:
    """Stream one request and time every chunk; failures are recorded, never raised."""
    result = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    result.start_time = start
    first = last_token = last_choice = None
    chunks, usage_tokens, done = 0, None, False
    text: list[str] = []
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for data in sse_data(response):
                now = time.perf_counter()
                if data.strip() == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError(f"stream event is not a JSON object: {data[:200]}")
                if event.get("error") is not None:
                    result.error = f"error event: {json.dumps(event['error'])[:500]}"
                    return result
                if usage := event.get("usage"):
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_len = int(usage["prompt_tokens"])
                choices = event.get("choices") or []
                if not choices:
                    continue
                last_choice = now
                piece = _chunk_output(choices[0])
                if not piece:
                    continue
                if first is None:
                    first = now
                else:
                    result.itl.append(now - last_token)
                last_token = now
                chunks += 1
                text.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    if first is None:
        result.error = "the stream carried no output"
        return result
    if not done:
        result.error = "the stream ended without data: [DONE]"
        return result
    result.success = True
    result.ttft = first - start
    result.latency = last_choice - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.generated_text = "".join(text)
    return result


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s, connect=30.0), limits=limits)


async def run_benchmark(
    cfg: BenchConfig,
    requests: Sequence[BenchRequest],
    warmups: Sequence[BenchRequest] = (),
    client: httpx.AsyncClient | None = None,
) -> BenchmarkResult:
    """Send `warmups` (not measured), then `requests` on the configured arrival schedule; gather the metrics."""
    own_client = client is None
    client = client or make_client(cfg)
    try:
        model = cfg.model or await first_model(client, cfg.base_url, cfg.api_key)
        url = cfg.base_url + cfg.endpoint
        headers = _headers(cfg.api_key)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def one(req: BenchRequest, bar) -> RequestResult:
            payload = build_payload(cfg, model, req)
            if sem is None:
                res = await send_request(client, url, payload, headers, req.prompt_len)
            else:
                async with sem:
                    res = await send_request(client, url, payload, headers, req.prompt_len)
            if bar is not None:
                bar.update(1)
            return res

        if warmups:
            await asyncio.gather(*(one(r, None) for r in warmups))

        offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, np.random.default_rng(cfg.seed))
        bar = tqdm(total=len(requests), disable=not cfg.progress, desc="requests")
        start = time.perf_counter()
        tasks = []
        for req, offset in zip(requests, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, bar)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
    finally:
        if own_client:
            await client.aclose()
    return BenchmarkResult(compute_metrics(results, duration, cfg.percentiles, cfg.goodput), results, model)


def format_table(metrics: BenchmarkMetrics, title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("Successful requests", f"{metrics.completed}"),
        ("Failed requests", f"{metrics.failed}"),
        ("Benchmark duration (s)", f"{metrics.duration_s:.2f}"),
        ("Total input tokens", f"{metrics.total_input_tokens}"),
        ("Total output tokens", f"{metrics.total_output_tokens}"),
        ("Request throughput (req/s)", f"{metrics.request_throughput:.2f}"),
    ]
    if metrics.request_goodput is not None:
        rows.append(("Request goodput (req/s)", f"{metrics.request_goodput:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{metrics.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics.total_token_throughput:.2f}"),
        ("Peak output chunks in 1 s", f"{metrics.max_output_tokens_per_s:.0f}"),
        ("Peak concurrent requests", f"{metrics.max_concurrent_requests}"),
    ]
    for row in rows:
        table.add_row(*row)
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        stats: LatencyStats = getattr(metrics, name)
        table.add_section()
        table.add_row(f"Mean {label} (ms)", f"{stats.mean_ms:.2f}")
        table.add_row(f"Median {label} (ms)", f"{stats.median_ms:.2f}")
        table.add_row(f"Std {label} (ms)", f"{stats.std_ms:.2f}")
        for key, value in stats.percentiles_ms.items():
            table.add_row(f"{key.upper()} {label} (ms)", f"{value:.2f}")
    return table


def result_json(cfg: BenchConfig, result: BenchmarkResult, extra: dict) -> dict:
    """The JSON written by `--result-file`: settings, flat metrics and per-request detail (no API key)."""
    settings = asdict(cfg)
    settings.pop("api_key")
    settings["request_rate"] = "inf" if math.isinf(cfg.request_rate) else cfg.request_rate
    settings["burstiness"] = "inf" if math.isinf(cfg.burstiness) else cfg.burstiness
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_id": result.model,
        **settings,
        **extra,
        **result.metrics.to_dict(),
        "input_lens": [r.prompt_len for r in result.results],
        "output_lens": [r.output_tokens for r in result.results],
        "ttfts": [r.ttft for r in result.results],
        "itls": [r.itl for r in result.results],
        "errors": [r.error for r in result.results],
    }


def _goodput_arg(text: str) -> tuple[str, float]:
    name, sep, value = text.partition(":")
    if not sep or name not in GOODPUT_METRICS:
        raise argparse.ArgumentTypeError(f"expected METRIC:MS with METRIC one of {', '.join(GOODPUT_METRICS)}")
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number of milliseconds") from None
    if not ms >= 0 or math.isinf(ms):
        raise argparse.ArgumentTypeError(f"{name}: the SLO must be a finite, non-negative number of ms")
    return name, ms


def _percentiles_arg(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 50,90,99") from None
    if not values or not all(0 < p <= 100 for p in values):
        raise argparse.ArgumentTypeError("percentiles must lie in (0, 100]")
    return values


def _extra_body_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive(kind: type) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _range_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must lie in [0, 1)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `treadle bench serve` flags (names follow `vllm bench serve` where it has one)."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    parser.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY, then $TREADLE_API_KEY)")
    parser.add_argument("--dataset", default="random", choices=("random", "file"))
    parser.add_argument("--dataset-path", default=None, help='jsonl with "prompt" and optional "output_len"')
    parser.add_argument("--input-len", type=_positive(int), default=1024, help="random prompt length (tokens)")
    parser.add_argument("--output-len", type=_positive(int), default=128, help="max_tokens per request")
    parser.add_argument("--range-ratio", type=_range_ratio, default=0.0, help="lengths vary uniformly by ±ratio")
    parser.add_argument("--num-prompts", type=_positive(int), default=1000)
    parser.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests sent first")
    parser.add_argument("--request-rate", type=_positive(float), default=math.inf, help="req/s; inf: all at t=0")
    parser.add_argument("--burstiness", type=_positive(float), default=1.0, help="1: Poisson; <1 burstier")
    parser.add_argument("--max-concurrency", type=_positive(int), default=None, help="cap on requests in flight")
    parser.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--goodput", type=_goodput_arg, nargs="+", default=None, metavar="METRIC:MS", help="SLOs, e.g. ttft:500"
    )
    parser.add_argument("--percentiles", type=_percentiles_arg, default=[50.0, 90.0, 99.0], help="e.g. 50,90,99")
    parser.add_argument("--extra-body", type=_extra_body_arg, default={}, help="JSON merged into every request")
    parser.add_argument("--request-timeout", type=_positive(float), default=6 * 3600.0, help="seconds per request")
    parser.add_argument("--result-file", default=None, help="write the JSON result here")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


async def _main(args: argparse.Namespace) -> int:
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be non-negative")
    cfg = BenchConfig(
        base_url=args.base_url.rstrip("/"),
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("TREADLE_API_KEY"),
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos,
        extra_body=args.extra_body,
        percentiles=args.percentiles,
        goodput=dict(args.goodput or []),
        seed=args.seed,
        request_timeout_s=args.request_timeout,
        progress=not args.disable_tqdm,
    )
    total = args.num_prompts + args.num_warmups
    async with make_client(cfg) as client:
        cfg.model = cfg.model or await first_model(client, cfg.base_url, cfg.api_key)
        codec = server_codec(client, cfg.base_url, cfg.model, cfg.api_key)
        if not await probe_codec(codec):
            codec = None
        if args.dataset == "file":
            if not args.dataset_path:
                raise ValueError("--dataset file needs --dataset-path")
            prompts = read_jsonl_requests(args.dataset_path, args.output_len)
            if len(prompts) < total:
                raise ValueError(f"{args.dataset_path} holds {len(prompts)} prompts; {total} are needed")
            prompts = prompts[:total]
            if codec is not None:
                await count_prompt_tokens(prompts, codec)
        else:
            if codec is None:
                print("note: the server has no /tokenize; prompt lengths are approximate until usage reports them")
            rng = np.random.default_rng(args.seed)
            prompts = await random_requests(total, args.input_len, args.output_len, args.range_ratio, rng, codec)
        result = await run_benchmark(cfg, prompts[args.num_warmups :], prompts[: args.num_warmups], client)

    Console().print(format_table(result.metrics, f"treadle bench serve: {cfg.model} at {cfg.base_url}"))
    failed = [r.error for r in result.results if not r.success]
    for err in failed[:5]:
        print(f"failed request: {err}")
    if args.result_file:
        extra = {"dataset": args.dataset, "num_prompts": args.num_prompts, "num_warmups": args.num_warmups}
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(result_json(cfg, result, extra), indent=2) + "\n")
        print(f"wrote {args.result_file}")
    return 0 if result.metrics.completed else 1


def main(args: argparse.Namespace) -> int:
    """Run `treadle bench serve`; 0 when at least one request completed, 1 otherwise, 2 on bad settings."""
    try:
        return asyncio.run(_main(args))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"treadle bench serve: error: {e}")
        return 2
    except httpx.HTTPError as e:
        print(f"treadle bench serve: server request failed: {type(e).__name__}: {e}")
        return 2


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="treadle bench serve", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
