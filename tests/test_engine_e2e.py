"""The engine loop on the real default model: batching, chunking, preemption, prefix reuse and forks must not
change greedy tokens, and every KV page comes back."""

import pytest

from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.loader import load_model
from treadle.engine.sampling_params import SamplingParams
from treadle.engine.sequence import Request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "List three colors:",
]


@pytest.fixture(scope="module")
def loaded():
    return load_model(EngineConfig(dtype="float32"), progress=False)


def make_engine(loaded, **kw) -> LLMEngine:
    cfg = EngineConfig(dtype="float32", num_pages=kw.pop("num_pages", 256), page_size=kw.pop("page_size", 16), **kw)
    return LLMEngine(cfg, loaded)


def run(engine: LLMEngine, prompts, params: SamplingParams, rid="r") -> dict[str, dict[int, list[int]]]:
    tok = engine.tokenizer
    results: dict[str, dict[int, list[int]]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"{rid}{i}", tok.encode(p), params))
    while engine.has_work():
        for out in engine.step():
            for o in out.outputs:
                results.setdefault(out.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
    assert engine.kv.num_free_pages == engine.kv.num_pages
    return results


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(loaded):
    """Each prompt alone, one big prefill chunk, plenty of KV."""
    engine = make_engine(loaded)
    return {i: run(engine, [p], GREEDY, rid=f"ref{i}_")[f"ref{i}_0"][0] for i, p in enumerate(PROMPTS)}


def test_batched_chunked_preempted_and_cached_runs_match_alone(loaded, reference):
    # Batched together with a tiny token budget (chunked prefill mixed with decodes) and a KV pool so small that
    # sequences get preempted and recomputed, with page size 1; then again, hitting the prefix cache.
    engine = make_engine(loaded, num_pages=60, page_size=1, max_num_batched_tokens=7)
    for attempt in ("cold", "warm"):
        got = run(engine, PROMPTS, GREEDY, rid=attempt)
        for i in range(len(PROMPTS)):
            assert got[f"{attempt}{i}"][0] == reference[i], (attempt, PROMPTS[i])
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.prefix_cache_hits > 0


def test_n_choices_fork_the_prompt_and_seeds_reproduce(loaded, reference):
    engine = make_engine(loaded)
    params = SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True)
    got = run(engine, PROMPTS[:1], params)["r0"]
    assert sorted(got) == [0, 1, 2] and all(got[i] == reference[0] for i in range(3))
    sampled = SamplingParams(n=2, temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    a = run(engine, PROMPTS[:2], sampled, rid="a")
    b = run(engine, PROMPTS[1:2], sampled, rid="b")  # different batch company, same seed
    assert a["a1"] == b["b0"]
    assert a["a1"][0] != a["a1"][1]  # choices use different seeds


def test_abort_frees_kv_and_stop_strings_end_generation(loaded):
    engine = make_engine(loaded)
    tok = engine.tokenizer
    engine.add_request(Request("long", tok.encode(PROMPTS[2]), SamplingParams(temperature=0, max_tokens=50)))
    engine.step()
    engine.step()
    assert engine.kv.num_free_pages < engine.kv.num_pages
    engine.abort("long")
    assert not engine.has_work() and engine.kv.num_free_pages == engine.kv.num_pages

    text = tok.decode(run(engine, PROMPTS[:1], GREEDY)["r0"][0])
    stop = text.strip().split()[1]
    engine.add_request(Request("s", tok.encode(PROMPTS[0]), SamplingParams(temperature=0, max_tokens=12, stop=[stop])))
    pieces, reasons = [], []
    while engine.has_work():
        for out in engine.step():
            pieces += [o.text for o in out.outputs]
            reasons += [(o.finish_reason, o.stop_reason) for o in out.outputs if o.finish_reason]
    assert reasons == [("stop", stop)]
    assert "".join(pieces) == text[: text.index(stop)]
    assert engine.kv.num_free_pages == engine.kv.num_pages
