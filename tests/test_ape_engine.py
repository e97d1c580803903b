"""APE cached contexts in the engine (fp32, a tiny random Llama with SmolLM2's tokenizer):

- one context with T = S = 1 is sequential encoding of prefix + context + query (same greedy tokens and logits);
- several contexts match transformers running the query with an attention function written here from the formula,
  over the very KV the engine cached for the prefix and the contexts;
- reuse, sharing between concurrent requests, eviction under KV pressure, and exact page accounting.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.sampling_params import ApeParams, SamplingParams
from treadle.engine.sequence import Request

QUERY = "<|im_start|>user\nWhich city is the capital?<|im_end|>\n<|im_start|>assistant\n"
DOCS = ["The capital of Freedonia is Alba. ", "Rivers in Sylvania run north to the sea. ",
        "Bob keeps three green parrots named after kings, queens and jesters. "]

pytestmark = pytest.mark.usefixtures("one_thread")


def engine_for(tiny, num_pages: int = 256, page_size: int = 16) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", page_size=page_size, num_pages=num_pages), tiny[0])


class LogitsRecorder:
    """A logits processor that keeps a copy of every row it sees (the engine's logits before sampling)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.rows.append(logits.clone())
        return logits


def enc(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        for out in engine.step():
            for c in out.outputs:
                tokens.setdefault(f"{out.request_id}/{c.index}", []).extend(c.token_ids)
    return tokens


def request(rid: str, prompt: list[int], ape: ApeParams | None = None, n: int = 1, max_tokens: int = 6,
            recorder: LogitsRecorder | None = None) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n, ape=ape,
                            logits_processors=[recorder] if recorder else [])
    return Request(rid, prompt, params)


def delete_all(engine: LLMEngine) -> None:
    for key in list(engine.ape.entries):
        engine.ape.delete(key)
    assert engine.kv.num_free_pages == engine.kv.num_pages


@pytest.mark.parametrize("page_size", [1, 16])
def test_one_context_at_unit_temperature_and_scale_is_sequential_encoding(tiny, page_size):
    engine = engine_for(tiny, num_pages=4096 // page_size, page_size=page_size)
    prefix = list(engine.ape.layout.prefix_ids)
    assert prefix and engine.tokenizer.decode(prefix, skip_special_tokens=False).endswith("user\n")
    doc, query = enc(engine, DOCS[0] * 3), enc(engine, QUERY)
    seq_rec, ape_rec = LogitsRecorder(), LogitsRecorder()
    ape = ApeParams([doc], temperature=1.0, scale=1.0)
    out = run(engine, [request("seq", prefix + doc + query, recorder=seq_rec)])
    out |= run(engine, [request("ape", prefix + query, ape, recorder=ape_rec)])
    assert out["ape/0"] == out["seq/0"]
    for a, s in zip(ape_rec.rows, seq_rec.rows, strict=True):
        torch.testing.assert_close(a, s, atol=2e-4, rtol=1e-4)
    delete_all(engine)


# ---- the reference: transformers with the formula as its attention function ------------------------------------
def ape_reference_attention(p: int, num_ctx: int, temperature: float, scale: float):
    """Keys are laid out [shared prefix (p) | contexts (num_ctx) | query and generated]; the formula of the
    features brief, B1, over that layout."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        s = query @ k.transpose(-1, -2) * scaling  # [B, H, n, L]
        n, length = s.shape[-2], s.shape[-1]
        ctx = torch.zeros(length, dtype=torch.bool)
        ctx[p : p + num_ctx] = True
        own = ~ctx & (torch.arange(length) <= torch.arange(length - n, length)[:, None])  # causal over R
        z_c = torch.logsumexp((s / temperature).masked_fill(~ctx, -math.inf), dim=-1, keepdim=True)
        z_r = torch.logsumexp(s.masked_fill(~own, -math.inf), dim=-1, keepdim=True)
        o_c = torch.softmax((s / temperature).masked_fill(~ctx, -math.inf), dim=-1) @ v
        o_r = torch.softmax(s.masked_fill(~own, -math.inf), dim=-1) @ v
        w_c, w_r = torch.exp(scale * temperature * z_c), torch.exp(z_r)  # Z_C^(S·T), Z_R
        out = (w_c * o_c + w_r * o_r) / (w_c + w_r)
        return out.transpose(1, 2).contiguous(), None

    return attend


def reference_tokens(reference, engine: LLMEngine, contexts: list, query: list[int], offset: int,
                     temperature: float, scale: float, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    p = len(engine.ape.layout.prefix_ids)
    first = contexts[0].encoder.kv.slots[:p]
    ctx_slots = [s for c in contexts for s in c.encoder.kv.slots[p:]]
    cache = DynamicCache()
    index = torch.tensor(first + ctx_slots)
    for layer, (k, v) in enumerate(engine.runner.kv_caches):
        cache.update(k[index].transpose(0, 1)[None].clone(), v[index].transpose(0, 1)[None].clone(), layer)
    AttentionInterface.register("ape_ref", ape_reference_attention(p, len(ctx_slots), temperature, scale))
    reference.config._attn_implementation = "ape_ref"
    try:
        ids, logits, out = list(query), [], []
        pos = p + offset
        with torch.inference_mode():
            for _ in range(steps):
                positions = torch.arange(pos, pos + len(ids))[None]
                row = reference(torch.tensor([ids]), position_ids=positions, cache=cache,
                                use_cache=True).logits[0, -1]
                pos += len(ids)
                logits.append(row)
                ids = [int(row.argmax())]
                out += ids
    finally:
        reference.config._attn_implementation = "eager"
    return out, logits


def test_several_contexts_match_the_formula_on_the_same_kv(tiny):
    engine = engine_for(tiny)
    prefix = list(engine.ape.layout.prefix_ids)
    docs = [enc(engine, d) for d in DOCS]
    query = enc(engine, QUERY)
    rec = LogitsRecorder()
    ape = ApeParams(docs, temperature=0.7, scale=0.8)
    out = run(engine, [request("ape", prefix + query, ape, recorder=rec)])
    contexts = [engine.ape.get(engine.ape.entries[k].key) for k in engine.ape.entries]
    tokens, logits = reference_tokens(tiny[1], engine, contexts, query, max(map(len, docs)), 0.7, 0.8, steps=6)
    assert out["ape/0"] == tokens
    for a, r in zip(rec.rows, logits, strict=True):
        torch.testing.assert_close(a, r, atol=2e-4, rtol=1e-4)
    delete_all(engine)


def test_reuse_concurrent_sharing_and_n(tiny):
    engine = engine_for(tiny)
    prefix = list(engine.ape.layout.prefix_ids)
    docs = [enc(engine, d) for d in DOCS[:2]]
    query = enc(engine, QUERY)
    ape = ApeParams(docs)
    # Two concurrent requests (one with n = 2) share one encoding of each context.
    first = run(engine, [request("a", prefix + query, ape), request("b", query, ape, n=2)])
    assert engine.ape.misses == 2 and engine.ape.hits == 2
    assert engine.ape.encoded_tokens == sum(len(prefix) + len(d) for d in docs)
    assert first["a/0"] == first["b/0"] == first["b/1"]  # a prompt without the prefix gets it in front
    assert all(e.users == 0 and e.ready for e in engine.ape.entries.values())
    # A later request reuses the cached KV: no context prefill at all.
    second = run(engine, [request("c", prefix + query, ApeParams(list(reversed(docs))))])
    assert engine.ape.encoded_tokens == sum(len(prefix) + len(d) for d in docs)
    assert engine.ape.hits == 4
    assert second["c/0"] == first["a/0"]  # context order does not matter
    delete_all(engine)


def test_eviction_under_pressure_keeps_serving_correctly(tiny):
    small = engine_for(tiny, num_pages=24)  # room for about two contexts and one request
    big = engine_for(tiny)
    prefix = list(small.ape.layout.prefix_ids)
    query = enc(small, QUERY)
    docs = [enc(small, d * 12)[:110] for d in DOCS]  # 9 pages each with the prefix
    results = []
    for engine in (small, big):
        results.append([run(engine, [request(f"r{i}", prefix + query, ApeParams([d]))])[f"r{i}/0"]
                        for i, d in enumerate(docs + docs[:1])])
    assert small.ape.evictions >= 2 and big.ape.evictions == 0
    assert small.ape.misses == 4 and big.ape.misses == 3
    assert results[0] == results[1]
    delete_all(small)
    delete_all(big)


def test_pinned_contexts_survive_eviction_and_deletion_waits_for_users(tiny):
    engine = engine_for(tiny, num_pages=24)
    prefix = list(engine.ape.layout.prefix_ids)
    query = enc(engine, QUERY)
    pinned = engine.ape.put(enc(engine, DOCS[0] * 8), pinned=True)
    run(engine, [])
    assert pinned.ready
    others = [enc(engine, d * 12)[:110] for d in DOCS[1:]]
    run(engine, [request(f"r{i}", prefix + query, ApeParams([d])) for i, d in enumerate(others)])
    assert engine.ape.get(pinned.key) is pinned and not pinned.ready  # evicted, still known
    engine.add_request(request("u", prefix + query, ApeParams([pinned.token_ids])))
    engine.step()
    assert engine.ape.delete(pinned.key) and pinned.users == 1
    assert engine.ape.get(pinned.key) is None
    run(engine, [])
    assert pinned.encoder is None
    delete_all(engine)


def test_abort_while_waiting_for_contexts_frees_everything(tiny):
    engine = engine_for(tiny)
    prefix = list(engine.ape.layout.prefix_ids)
    engine.add_request(request("x", prefix + enc(engine, QUERY), ApeParams([enc(engine, DOCS[2] * 20)])))
    engine.abort("x")
    run(engine, [])
    delete_all(engine)


def test_contexts_held_only_by_waiting_requests_give_way(tiny):
    """X and Y are cached; R1 needs X and Z, R2 needs Y and W, and Z fits only if Y's pages go. Y is held by R2, which
    cannot run before W is encoded: its KV is dropped and Y is encoded again later, so both requests finish."""
    engine = engine_for(tiny, num_pages=24)
    prefix = list(engine.ape.layout.prefix_ids)
    query = enc(engine, QUERY)
    x, y, z, w = (enc(engine, f"Document {name}. " + DOCS[i % 3] * 12)[:110] for i, name in enumerate("XYZW"))
    for doc in (x, y):
        engine.ape.put(doc, pinned=True)
    run(engine, [])
    requests = [request("r1", prefix + query, ApeParams([x, z])), request("r2", prefix + query, ApeParams([y, w]))]
    for r in requests:
        engine.add_request(r)
    done: dict[str, list[int]] = {}
    for _ in range(200):
        if not engine.has_work():
            break
        for out in engine.step():
            for c in out.outputs:
                done.setdefault(out.request_id, []).extend(c.token_ids)
    assert not engine.has_work() and sorted(done) == ["r1", "r2"]
    delete_all(engine)
