"""Multiverse generation through the HTTP API, with the official `openai` client: the `parallel` extra, document-order
content with `branches`, path-tagged streaming, usage depth, metrics, a disconnect mid-branch and bad input.

The server runs in-process on a tiny random Llama, and the control tags come from a scripted logits processor
attached to parallel requests on the engine side: the offline seam, which HTTP cannot reach.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from inprocess_server import metric_samples, openai_client, serving
from multiverse_testing import Rule, Script, save_tiny_llama
from treadle.engine.async_engine import AsyncEngine
from treadle.engine.config import EngineConfig
from treadle.engine.multiverse_tags import MultiverseTags
from treadle.engine.sampling_params import ParallelParams
from treadle.server.serve_config import ConfigError, build_serve_config

TAGS = MultiverseTags()
USER = [{"role": "user", "content": "Plan a trip."}]
ENDLESS = [{"role": "user", "content": "Keep going."}]  # the script never closes these paths
PARALLEL = {"parallel": {"enabled": True, "min_fork_budget": 8}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread) -> Iterator[tuple[str, AsyncEngine]]:
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_llama(path)
    engine = AsyncEngine(EngineConfig(model=path, served_model_name="m", dtype="float32", num_pages=256,
                                       num_threads=1), progress=False)
    enc = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)
    close, conclusion, endless = enc("</Path>"), enc(TAGS.conclusion_header), enc(ENDLESS[0]["content"])
    script = Script([
        Rule(enc("<|im_start|>assistant\n"), 2, enc("<Parallel>\n<Goal>\n<Outline> 1: a</Outline>\n"
                                                      "<Outline> 2: b</Outline>\n</Goal>")),
        Rule(enc(TAGS.header("1")), 6, close, unless=endless),
        Rule(enc(TAGS.header("2")), 9, close, unless=endless),
        Rule(conclusion, 3, enc("</Conclusion>\n</Parallel>") + engine.tokenizer.eos_token_ids),
    ])
    add_request = engine.engine.add_request

    def add_scripted(req):
        if req.params.parallel_enabled:
            req.params.logits_processors = [script]
        add_request(req)

    engine.engine.add_request = add_scripted
    with serving(engine) as base_url:
        yield base_url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server[0])


def metrics(base_url: str) -> dict[str, float]:
    return metric_samples(base_url, "treadle:")


def test_content_in_document_order_with_branches_and_depth(server, client):
    r = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=200, extra_body=PARALLEL)
    choice = r.choices[0]
    branches = {b["path"]: b["text"] for b in choice.message.model_extra["branches"]}
    assert list(branches) == ["1", "2"] and choice.finish_reason == "stop"
    text = choice.message.content
    assert text.index("</Goal>") < text.index(branches["1"]) < text.index(branches["2"]) < text.index("<Conclusion>")
    assert branches["1"].startswith(TAGS.header("1")) and branches["2"].endswith("</Path>")
    usage = r.usage.model_extra
    assert usage["completion_depth"] < r.usage.completion_tokens  # the paths overlap in position

    plain = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=5)
    assert "completion_depth" not in plain.usage.model_extra and "branches" not in plain.choices[0].message.model_extra


def test_stream_reads_like_the_answer_and_tags_path_deltas(server, client):
    whole = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=200,
                                           extra_body=PARALLEL)
    stream = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=200, stream=True,
                                            stream_options={"include_usage": True}, extra_body=PARALLEL)
    content, live, usage = "", {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in (c.delta.model_extra or {}).get("paths") or []:
                live[d["path"]] = live.get(d["path"], "") + d["text"]
    assert content == whole.choices[0].message.content
    assert live == {b["path"]: b["text"] for b in whole.choices[0].message.model_extra["branches"]}
    assert usage.model_extra["completion_depth"] == whole.usage.model_extra["completion_depth"]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completions_api_and_metrics(server, client):
    before = metrics(server[0])
    r = client.completions.create(model="m", prompt="<|im_start|>assistant\n", temperature=0, max_tokens=200,
                                  extra_body=PARALLEL)
    assert [b["path"] for b in r.choices[0].model_extra["branches"]] == ["1", "2"]
    after = metrics(server[0])
    assert after["treadle:parallel_forks_total"] == before["treadle:parallel_forks_total"] + 1
    assert after["treadle:parallel_merges_total"] == before["treadle:parallel_merges_total"] + 1
    assert after["treadle:parallel_paths_running"] == 0 and after["treadle:parallelism"] > 1


def test_disconnect_mid_branch_frees_everything(server):
    base_url, engine = server
    body = {"model": "m", "messages": ENDLESS, "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True, **PARALLEL}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: dropping the iterator closes the connection
        while '"paths"' not in next(lines):
            pass  # until the paths are decoding
        assert metrics(base_url)["treadle:parallel_paths_running"] == 2
    deadline = time.monotonic() + 30
    while (m := metrics(base_url))["treadle:kv_cache_usage_perc"] or m["treadle:num_requests_running"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["treadle:parallel_paths_running"] == 0
    assert engine.engine.kv.num_free_pages == engine.engine.kv.num_pages


@pytest.mark.parametrize("extra, param", [
    ({"parallel": {"max_paths": 0}}, "parallel.max_paths"),
    ({"parallel": {"enabled": True, "paths": 2}}, None),  # unknown key: rejected, not ignored
    ({**PARALLEL, "response_format": {"type": "json_object"}}, "parallel"),
    ({**PARALLEL, "logprobs": True}, "logprobs"),
])
def test_bad_parallel_requests_are_400(server, client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=USER, max_tokens=5, extra_body=extra)
    if param is not None:
        assert e.value.body["param"] == param


def test_serve_config_parallel_defaults_and_tags(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps({"parallel": {"max_paths": 4}, "multiverse_tags": {"path_header": "<Path> {id}:"}}))
    cfg = build_serve_config({"device": "cpu"}, str(path))
    assert cfg.parallel == ParallelParams(max_paths=4) and cfg.multiverse_tags.header("3") == "<Path> 3:"
    path.write_text(json.dumps({"parallel": {"max_depth": -1}}))
    with pytest.raises(ConfigError, match="max_depth"):
        build_serve_config({"device": "cpu"}, str(path))
    path.write_text(json.dumps({"multiverse_tags": {"path_header": "no id"}}))
    with pytest.raises(ConfigError, match="path_header"):
        build_serve_config({"device": "cpu"}, str(path))
