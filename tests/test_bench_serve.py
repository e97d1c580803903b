"""`treadle bench serve`: metric math on hand-made timings, the arrival schedule, and the streaming client
against a real HTTP server that speaks OpenAI-style SSE."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from treadle.server import bench_serve as bs


def _result(start, ttft, itl, latency, out, prompt):
    return bs.RequestResult(
        success=True, start_time=start, ttft=ttft, itl=itl, latency=latency, output_tokens=out, prompt_len=prompt
    )


HAND_MADE = [
    _result(0.0, 0.1, [0.02, 0.03, 0.05], 0.2, 4, 10),  # chunks at 0.1, 0.12, 0.15, 0.2
    _result(0.05, 0.2, [], 0.2, 1, 20),  # one token: no TPOT sample, TPOT 0 for goodput
    bs.RequestResult(success=False, error="HTTP 500"),
    _result(0.5, 0.3, [0.1, 0.3], 1.5, 5, 30),  # usage says 5 tokens in 3 chunks; chunks at 0.8, 0.9, 1.2
]


def test_metrics_follow_vllm_definitions():
    m = bs.compute_metrics(HAND_MADE, duration_s=2.0, percentiles=[50, 99], goodput={})
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 10)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(5.0)
    assert m.total_token_throughput == pytest.approx(35.0)
    assert m.request_goodput is None

    # TTFT 100/200/300 ms: std is the population std, p99 interpolates linearly between 200 and 300.
    assert m.ttft.mean_ms == pytest.approx(200.0)
    assert m.ttft.median_ms == pytest.approx(200.0)
    assert m.ttft.std_ms == pytest.approx(math.sqrt(20000 / 3))
    assert m.ttft.percentiles_ms == pytest.approx({"p50": 200.0, "p99": 298.0})
    # TPOT only for outputs > 1 token: (200-100)/3 and (1500-300)/4.
    assert m.tpot.mean_ms == pytest.approx((100 / 3 + 300) / 2)
    # ITL pools every chunk gap: 20, 30, 50, 100, 300.
    assert m.itl.mean_ms == pytest.approx(100.0)
    assert m.itl.median_ms == pytest.approx(50.0)
    assert m.e2el.mean_ms == pytest.approx(1900 / 3)
    assert m.max_concurrent_requests == 2
    assert m.max_output_tokens_per_s == 7  # all chunks but the one at 1.2 s fall in the first second

    flat = m.to_dict()
    assert flat["p99_ttft_ms"] == pytest.approx(298.0)
    assert flat["median_itl_ms"] == pytest.approx(50.0)
    assert "ttft" not in flat and flat["completed"] == 3


@pytest.mark.parametrize(
    "slo, good",
    [
        ({"ttft": 250, "tpot": 100}, 2),  # the third completed request misses TTFT
        ({"e2el": 300}, 2),
        ({"ttft": 150, "e2el": 300}, 1),
        ({"tpot": 30}, 1),  # 33 ms and 300 ms miss; the one-token request counts as TPOT 0
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slo, good):
    m = bs.compute_metrics(HAND_MADE, duration_s=2.0, percentiles=[99], goodput=slo)
    assert m.request_goodput == pytest.approx(good / 2.0)


def test_no_completed_requests_gives_zeros():
    m = bs.compute_metrics([bs.RequestResult(error="x")] * 2, 1.0, [99], {"ttft": 1})
    assert (m.completed, m.failed, m.request_goodput, m.ttft.mean_ms, m.max_concurrent_requests) == (0, 2, 0, 0, 0)


def test_peak_concurrency_uses_half_open_intervals():
    back_to_back = [_result(0.0, 0.1, [], 1.0, 1, 1), _result(1.0, 0.1, [], 1.0, 1, 1)]
    assert bs.compute_metrics(back_to_back, 2.0, [99], {}).max_concurrent_requests == 1


def test_arrivals():
    rng = np.random.default_rng(0)
    assert not bs.arrival_offsets(5, math.inf, 1.0, rng).any()
    even = bs.arrival_offsets(4, 2.0, math.inf, rng)
    assert even == pytest.approx([0.5, 1.0, 1.5, 2.0])
    poisson = bs.arrival_offsets(20000, 50.0, 1.0, np.random.default_rng(1))
    bursty = bs.arrival_offsets(20000, 50.0, 0.25, np.random.default_rng(1))
    for offsets in (poisson, bursty):
        assert offsets[-1] == pytest.approx(20000 / 50.0)  # rescaled so the rate is exact
        assert (np.diff(offsets) >= 0).all()
    # Gamma gaps with shape k have a coefficient of variation of 1/sqrt(k): 1 for Poisson, 2 at burstiness 0.25.
    cv = lambda x: np.diff(x).std() / np.diff(x).mean()  # noqa: E731
    assert cv(poisson) == pytest.approx(1.0, rel=0.05)
    assert cv(bursty) == pytest.approx(2.0, rel=0.1)
    assert bs.arrival_offsets(10, 3.0, 0.5, np.random.default_rng(7)) == pytest.approx(
        bs.arrival_offsets(10, 3.0, 0.5, np.random.default_rng(7))
    )


def test_sample_lengths_respect_range_ratio():
    lens = bs.sample_lengths(5000, 100, 0.25, np.random.default_rng(0))
    assert lens.min() == 75 and lens.max() == 125
    assert (bs.sample_lengths(10, 3, 0.0, np.random.default_rng(0)) == 3).all()
    assert bs.sample_lengths(100, 1, 0.9, np.random.default_rng(0)).min() >= 1


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b", "output_len": 3}\n\n{"prompt": "c"}\n')
    reqs = bs.read_jsonl_requests(path, default_output_len=9)
    assert [(r.prompt, r.output_len) for r in reqs] == [("a b", 3), ("c", 9)]
    cases = [('{"prompt": 1}', "string"), ("{oops", "not valid JSON"), ('{"prompt": "x", "output_len": 0}', "positive")]
    for bad, msg in cases:
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=msg):
            bs.read_jsonl_requests(path, 9)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    bs.add_arguments(parser)
    return parser


@pytest.mark.parametrize(
    "argv",
    [
        ["--goodput", "latency:5"],
        ["--goodput", "ttft:-1"],
        ["--percentiles", "0,50"],
        ["--extra-body", "[1]"],
        ["--request-rate", "0"],
        ["--range-ratio", "1"],
        ["--endpoint", "/v1/embeddings"],
    ],
)
def test_bad_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert "error" in capsys.readouterr().err


# ---- A real HTTP server speaking OpenAI-style SSE -------------------------------------------------------------

received: list[dict] = []


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _events(body: dict):
    """Chunks scripted by the prompt, so one server covers the normal path and every failure mode."""
    script = body.get("prompt") or body["messages"][0]["content"]
    chat = "messages" in body
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}

    def chunk(text=None, finish=None):
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {"object": "chat.completion.chunk", "choices": [choice]}
        return {"object": "text_completion", "choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}

    if chat:
        yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    yield ": keep-alive comment\n\n"
    for piece in ("Hel", "lo", " world"):
        await asyncio.sleep(0.005)
        yield _sse(chunk(piece))
        if script == "error midway":
            yield _sse({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
            yield _sse("[DONE]")
            return
        if script == "truncated":
            return
    yield _sse(chunk(finish="length"))
    if script != "no usage":
        yield _sse({"choices": [], "usage": usage})
    yield _sse("[DONE]")


async def _completions(request: Request):
    body = await request.json()
    received.append({"body": body, "auth": request.headers.get("authorization")})
    if (body.get("prompt") or body.get("messages", [{}])[0].get("content")) == "overload":
        return JSONResponse({"error": {"message": "busy", "code": 429}}, status_code=429)
    return StreamingResponse(_events(body), media_type="text/event-stream")


VOCAB: dict[str, int] = {}


async def _tokenize(request: Request):
    body = await request.json()
    return JSONResponse({"tokens": [VOCAB.setdefault(w, len(VOCAB)) for w in body["prompt"].split()]})


async def _detokenize(request: Request):
    words = {i: w for w, i in VOCAB.items()}
    return JSONResponse({"prompt": " ".join(words[i] for i in (await request.json())["tokens"])})


async def _models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sse_server():
    app = Starlette(
        routes=[
            Route("/v1/completions", _completions, methods=["POST"]),
            Route("/v1/chat/completions", _completions, methods=["POST"]),
            Route("/v1/models", _models),
            Route("/tokenize", _tokenize, methods=["POST"]),
            Route("/detokenize", _detokenize, methods=["POST"]),
        ]
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def _send(base_url: str, endpoint: str, prompt: str, **cfg_kw) -> bs.RequestResult:
    cfg = bs.BenchConfig(base_url=base_url, endpoint=endpoint, model="fake-model", progress=False, **cfg_kw)
    req = bs.BenchRequest(prompt=prompt, prompt_len=3, output_len=5)
    return asyncio.run(bs.run_benchmark(cfg, [req])).results[0]


@pytest.mark.parametrize("endpoint", bs.ENDPOINTS)
def test_client_times_output_chunks_and_reads_usage(sse_server, endpoint):
    received.clear()
    res = _send(sse_server, endpoint, "normal", ignore_eos=True, api_key="k", extra_body={"temperature": 0})
    assert res.success, res.error
    assert res.generated_text == "Hello world"
    assert res.output_tokens == 7 and res.prompt_len == 11  # from usage, not from counting chunks
    assert len(res.itl) == 2  # three output chunks; the role and finish chunks carry no output
    assert 0 < res.ttft <= res.latency
    assert res.latency >= res.ttft + sum(res.itl) - 1e-9  # the finish chunk still ends the request

    sent = received[-1]
    assert sent["auth"] == "Bearer k"
    body = sent["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0
    assert body["max_completion_tokens" if "chat" in endpoint else "max_tokens"] == 5


def test_client_counts_chunks_without_usage(sse_server):
    res = _send(sse_server, "/v1/chat/completions", "no usage")
    assert res.success and res.output_tokens == 3 and res.prompt_len == 3


@pytest.mark.parametrize(
    "prompt, error", [("error midway", "error event"), ("truncated", "[DONE]"), ("overload", "HTTP 429")]
)
def test_client_records_failures(sse_server, prompt, error):
    res = _send(sse_server, "/v1/completions", prompt)
    assert not res.success and error in res.error


def test_random_prompts_are_sized_by_the_server_tokenizer(sse_server):
    async def build():
        async with httpx.AsyncClient() as client:
            codec = bs.server_codec(client, sse_server, "fake-model", None)
            assert await bs.probe_codec(codec)
            reqs = await bs.random_requests(6, 40, 8, 0.5, np.random.default_rng(3), codec)
            return reqs, [len(await codec[0](r.prompt)) for r in reqs]

    reqs, lens = asyncio.run(build())
    assert lens == [r.prompt_len for r in reqs]
    assert all(20 <= n <= 60 for n in lens) and len(set(lens)) > 1
    assert len({r.prompt for r in reqs}) == 6
    assert all(4 <= r.output_len <= 12 for r in reqs)


def test_cli_end_to_end(sse_server, tmp_path, capsys):
    out = tmp_path / "res.json"
    argv = ["--base-url", sse_server, "--num-prompts", "4", "--input-len", "16", "--output-len", "8"]
    argv += ["--max-concurrency", "2", "--request-rate", "100", "--burstiness", "0.5", "--num-warmups", "1"]
    argv += ["--goodput", "ttft:10000", "--result-file", str(out), "--disable-tqdm"]
    assert bs.main(_parser().parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "Output token throughput" in printed and "P99 TTFT" in printed
    result = json.loads(out.read_text())
    assert result["model_id"] == "fake-model" and result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 28 and result["request_goodput"] > 0
    assert result["max_concurrent_requests"] <= 2
    assert len(result["itls"]) == 4 and "api_key" not in result


def test_cli_file_dataset(sse_server, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "no usage", "output_len": 4}) + "\n" for _ in range(4)))
    out = tmp_path / "res.json"
    argv = ["--base-url", sse_server, "--dataset", "file", "--dataset-path", str(data), "--disable-tqdm"]
    argv += ["--num-prompts", "3", "--num-warmups", "1", "--result-file", str(out)]
    assert bs.main(_parser().parse_args(argv)) == 0
    result = json.loads(out.read_text())
    assert result["input_lens"] == [2] * 3  # counted through /tokenize, the server sends no usage
    assert result["output_lens"] == [3] * 3  # three output chunks
    assert received[-1]["body"]["max_tokens"] == 4

    argv[argv.index("3")] = "4"  # 4 prompts + 1 warmup: the file is one short
    assert bs.main(_parser().parse_args(argv)) == 2
    assert "holds 4 prompts; 5 are needed" in capsys.readouterr().out


def test_cli_reports_unreachable_server(capsys):
    argv = ["--base-url", f"http://127.0.0.1:{_free_port()}", "--num-prompts", "1", "--disable-tqdm"]
    assert bs.main(_parser().parse_args(argv)) == 2
    assert "server request failed" in capsys.readouterr().out


# ---- The load generator against a real `treadle serve` ----------------------------------------------------------


@pytest.fixture(scope="module")
def treadle_server():
    cmd = [sys.executable, "-m", "treadle.server.cli", "serve", "--port", "0", "--num-pages", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    drain = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    drain.start()
    url, seen, deadline = None, [], time.monotonic() + 120
    while url is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if m := re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line):
            url = m.group(1)
    try:
        assert url, "treadle serve did not start:\n" + "".join(seen[-20:])
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_bench_serve_against_treadle(treadle_server, tmp_path):
    """4 prompts x 8 tokens on each endpoint: prompts sized exactly through /tokenize, lengths fixed by ignore_eos."""
    for endpoint in bs.ENDPOINTS:
        out = tmp_path / "result.json"
        argv = ["--base-url", treadle_server, "--endpoint", endpoint, "--num-prompts", "4", "--input-len", "16"]
        argv += ["--output-len", "8", "--ignore-eos", "--max-concurrency", "4", "--disable-tqdm"]
        argv += ["--extra-body", '{"temperature": 0}', "--result-file", str(out)]
        assert bs.main(_parser().parse_args(argv)) == 0
        result = json.loads(out.read_text())
        assert result["errors"] == [""] * 4
        assert result["output_lens"] == [8] * 4
        if endpoint == "/v1/completions":
            assert result["input_lens"] == [16] * 4  # usage.prompt_tokens: the sizing was exact
        else:
            assert all(n > 16 for n in result["input_lens"])  # the chat template adds its tokens
        assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
        assert len(result["itls"][0]) >= 1 and result["total_output_tokens"] == 32
