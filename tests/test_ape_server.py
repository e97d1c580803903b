"""APE cached contexts through HTTP on a live server (tiny random Llama, fp32): the /v1/contexts routes with httpx,
the `contexts` / `ape` extras with the official openai client (streaming, n, stop, logprobs), OpenAI-shaped 404 and
400 errors, the metrics, and every KV page back once contexts are deleted."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from inprocess_server import metric_samples, openai_client, serving
from multiverse_testing import save_tiny_llama
from treadle.engine.async_engine import AsyncEngine
from treadle.engine.config import EngineConfig

DOC = "The capital of Freedonia is Alba. The river Oro runs north. "
OTHER = "Bob keeps three green parrots named after kings. "
USER = [{"role": "user", "content": "What is the capital of Freedonia?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread) -> Iterator[tuple[str, AsyncEngine]]:
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_llama(path)
    engine = AsyncEngine(EngineConfig(model=path, served_model_name="m", dtype="float32", num_pages=64,
                                       num_threads=1), progress=False)
    with serving(engine) as base_url:
        yield base_url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server[0])


def metrics(base_url: str) -> dict[str, float]:
    return metric_samples(base_url, "treadle:ape")


def test_context_routes_and_chat_with_contexts(server, client):
    base, engine = server
    created = httpx.post(base + "/v1/contexts", json={"text": DOC}, timeout=30).json()
    assert created["object"] == "context" and created["id"].startswith("ctx_")
    assert created["tokens"] == len(engine.tokenizer.encode(DOC, add_special_tokens=False))
    assert httpx.post(base + "/v1/contexts", json={"text": DOC}, timeout=30).json()["id"] == created["id"]
    listed = httpx.get(base + "/v1/contexts", timeout=30).json()
    assert listed["object"] == "list" and [c["id"] for c in listed["data"]] == [created["id"]]
    got = httpx.get(base + f"/v1/contexts/{created['id']}", timeout=30).json()
    assert got["id"] == created["id"] and got["cached"]  # encoded by the time a later call reaches the engine

    before = metrics(base)
    extra = {"contexts": [created["id"], {"text": OTHER}], "ape": {"temperature": 0.8, "scale": 0.9}}
    kw = {"model": "m", "messages": USER, "temperature": 0, "max_tokens": 8, "extra_body": extra}
    answer = client.chat.completions.create(n=2, logprobs=True, top_logprobs=2, **kw)
    # Usage counts the contexts as prompt tokens, the one found encoded as cached, as OpenAI counts cached prompts.
    plain = client.chat.completions.create(model="m", messages=USER, max_tokens=1).usage.prompt_tokens
    other_tokens = len(engine.tokenizer.encode(OTHER, add_special_tokens=False))
    assert answer.usage.prompt_tokens == plain + created["tokens"] + other_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens >= created["tokens"]
    assert answer.choices[0].message.content == answer.choices[1].message.content
    assert len(answer.choices[0].logprobs.content) == answer.usage.completion_tokens // 2
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == answer.choices[0].message.content
    after = metrics(base)
    assert after["treadle:ape_context_hits_total"] - before["treadle:ape_context_hits_total"] == 3
    assert after["treadle:ape_context_misses_total"] - before["treadle:ape_context_misses_total"] == 1
    assert after["treadle:ape_cached_contexts"] == 2

    stop = answer.choices[0].message.content[2:5]
    if stop.strip():
        stopped = client.chat.completions.create(stop=[stop], **kw).choices[0]
        assert stopped.finish_reason == "stop" and stop not in stopped.message.content


def test_one_context_at_unit_scale_equals_the_sequential_prompt(server, client):
    _, engine = server
    tok = engine.tokenizer
    layout = engine.engine.ape.layout
    query = tok.apply_chat_template(USER, add_generation_prompt=True)[len(layout.prefix_text):]
    ids = list(layout.prefix_ids) + tok.encode(DOC, add_special_tokens=False) + tok.encode(query,
                                                                                          add_special_tokens=False)
    sequential = client.completions.create(model="m", prompt=ids, temperature=0, max_tokens=8, logprobs=1)
    ape = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=8, logprobs=True,
                                         extra_body={"contexts": [{"text": DOC}],
                                                     "ape": {"temperature": 1.0, "scale": 1.0}})
    assert ape.choices[0].message.content == sequential.choices[0].text
    for a, s in zip(ape.choices[0].logprobs.content, sequential.choices[0].logprobs.token_logprobs, strict=True):
        assert a.logprob == pytest.approx(s, abs=1e-4)
    as_completion = client.completions.create(model="m", prompt=query, temperature=0, max_tokens=8,
                                              extra_body={"contexts": [{"text": DOC}],
                                                          "ape": {"temperature": 1.0, "scale": 1.0}})
    assert as_completion.choices[0].text == sequential.choices[0].text  # the shared prefix goes in front


@pytest.mark.parametrize("extra,status,param", [
    ({"contexts": ["ctx_nope"]}, 404, "contexts"),
    ({"contexts": [{"text": "word " * 3000}]}, 400, "contexts"),
    ({"ape": {"temperature": 0.5}}, 400, "ape"),
    ({"contexts": [{"text": DOC}], "ape": {"temperature": 0}}, 400, "ape.temperature"),
    ({"contexts": []}, 400, "contexts"),
])
def test_bad_context_requests(server, client, extra, status, param):
    error = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(error) as e:
        client.chat.completions.create(model="m", messages=USER, max_tokens=2, extra_body=extra)
    assert e.value.status_code == status and e.value.body["param"] == param


def test_bad_context_routes_and_custom_system_prompt(server, client):
    base, _ = server
    assert httpx.get(base + "/v1/contexts/ctx_nope", timeout=30).status_code == 404
    missing = httpx.delete(base + "/v1/contexts/ctx_nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "context_not_found"
    both = httpx.post(base + "/v1/contexts", json={"text": "a", "tokens": [1]}, timeout=30)
    assert both.status_code == 400 and both.json()["error"]["param"] == "text"
    huge = httpx.post(base + "/v1/contexts", json={"tokens": [5] * 5000}, timeout=30)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "contexts"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be terse."}, *USER],
                                       max_tokens=2, extra_body={"contexts": [{"text": DOC}]})
    assert e.value.body["param"] == "messages"


def test_delete_returns_every_page(server, client):
    base, engine = server
    ids = [c["id"] for c in httpx.get(base + "/v1/contexts", timeout=30).json()["data"]]
    for cid in ids:
        deleted = httpx.delete(base + f"/v1/contexts/{cid}", timeout=30).json()
        assert deleted == {"id": cid, "object": "context.deleted", "deleted": True}
    assert httpx.get(base + "/v1/contexts", timeout=30).json()["data"] == []
    # Inline contexts stay cached until evicted; squeeze them out with a context that needs most of the pool.
    for letter in "wv":  # about 33 pages each, of 64
        big = " ".join(f"{letter}{i}" for i in range(160))
        client.completions.create(model="m", prompt="Hi", max_tokens=1, extra_body={"contexts": [{"text": big}]})
    cid = httpx.post(base + "/v1/contexts", json={"text": big}, timeout=30).json()["id"]
    httpx.delete(base + f"/v1/contexts/{cid}", timeout=30)
    kv = engine.engine.kv
    assert metrics(base)["treadle:ape_context_evictions_total"] >= 1
    assert kv.num_free_pages == kv.num_pages
