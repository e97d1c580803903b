"""The default model through our loader and ModelRunner against transformers' own GGUF loading (fp32)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from treadle.engine import loader as loader_module
from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig
from treadle.engine.loader import cache_dirs, default_model_path, load_model
from treadle.engine.model_runner import ModelRunner
from treadle.engine.models.int4_cpu import Int4Linear

NUM_SLOTS = 2048
NEW_TOKENS = 32
MESSAGES = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering.",
]


@pytest.fixture(scope="module")
def engine_config(tmp_path_factory) -> EngineConfig:
    return EngineConfig(dtype="float32", weights_cache_dir=str(tmp_path_factory.mktemp("weights_cache")))


@pytest.fixture(scope="module")
def loaded(engine_config):
    return load_model(engine_config, progress=False)


@pytest.fixture(scope="module")
def runner(loaded, engine_config) -> ModelRunner:
    return ModelRunner(loaded.model, loaded.config, engine_config, NUM_SLOTS)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}])) for m in MESSAGES]


@pytest.fixture(scope="module")
def reference_tokens(reference, prompts) -> list[list[int]]:
    """Greedy continuations from transformers' forward with its own KV cache, EOS ignored."""
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            out = reference(torch.tensor([ids]), use_cache=True)
            toks = [int(out.logits[0, -1].argmax())]
            for _ in range(NEW_TOKENS - 1):
                out = reference(torch.tensor([[toks[-1]]]), cache=out.cache, use_cache=True)
                toks.append(int(out.logits[0, -1].argmax()))
            outs.append(toks)
    return outs


def scattered_slots(lengths: list[int], seed: int) -> list[list[int]]:
    """Disjoint, non-contiguous, unordered slot lists, as a page manager after churn might hand out."""
    pool = list(range(1, NUM_SLOTS))
    random.Random(seed).shuffle(pool)
    out, start = [], 0
    for n in lengths:
        out.append(pool[start : start + n])
        start += n
    return out


def greedy(runner: ModelRunner, prompts: list[list[int]], slots: list[list[int]]) -> list[list[int]]:
    """Prefill every prompt in one step, then decode all sequences together, one token per step."""
    chunks = [SeqChunk(p, list(range(len(p))), s[: len(p)], True) for p, s in zip(prompts, slots)]
    outs = [[int(row.argmax())] for row in runner.execute(chunks)]
    for _ in range(NEW_TOKENS - 1):
        chunks = []
        for p, s, o in zip(prompts, slots, outs):
            n = len(p) + len(o)
            chunks.append(SeqChunk([o[-1]], [n - 1], s[:n], True))
        for o, row in zip(outs, runner.execute(chunks)):
            o.append(int(row.argmax()))
    return outs


def test_greedy_parity_alone(runner, prompts, reference_tokens):
    for i, (p, ref) in enumerate(zip(prompts, reference_tokens)):
        slots = scattered_slots([len(p) + NEW_TOKENS], seed=i)
        assert greedy(runner, [p], slots) == [ref]


def test_greedy_parity_batched(runner, prompts, reference_tokens):
    slots = scattered_slots([len(p) + NEW_TOKENS for p in prompts], seed=100)
    assert greedy(runner, prompts, slots) == reference_tokens


def test_positions_follow_position_ids(runner, reference, prompts):
    """Position ids, not KV-index order, drive RoPE: an offset start matches transformers given the same ids."""
    ids, offset = prompts[0], 500
    with torch.inference_mode():
        ref = reference(torch.tensor([ids]), position_ids=torch.arange(offset, offset + len(ids))[None]).logits[0, -1]
    slots = scattered_slots([len(ids)], seed=7)[0]
    ours = runner.execute([SeqChunk(ids, list(range(offset, offset + len(ids))), slots, True)])[0]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


def test_logits_independent_of_slot_placement(runner, prompts):
    ids = prompts[2]
    n = len(ids)
    contiguous = runner.execute([SeqChunk(ids, list(range(n)), list(range(n)), True)])[0]
    scattered = runner.execute([SeqChunk(ids, list(range(n)), scattered_slots([n], seed=3)[0], True)])[0]
    torch.testing.assert_close(scattered, contiguous, atol=1e-4, rtol=1e-5)


def test_chunked_prefill_matches_single_chunk(runner, prompts):
    """A prompt prefilled in three chunks, each sharing its step with another sequence's decode, gives the same
    logits as one chunk."""
    ids = prompts[2]
    n = len(ids)
    slots = scattered_slots([n, len(prompts[0]) + 4], seed=11)
    whole = runner.execute([SeqChunk(ids, list(range(n)), slots[0], True)])[0]

    other = prompts[0]
    m = len(other)
    runner.execute([SeqChunk(other, list(range(m)), slots[1][:m], False)])
    cuts = [0, 5, 17, n]
    for step, (a, b) in enumerate(zip(cuts, cuts[1:])):
        last = b == n
        decode = SeqChunk([other[step]], [m + step], slots[1][: m + step + 1], True)
        logits = runner.execute([decode, SeqChunk(ids[a:b], list(range(a, b)), slots[0][:b], last)])
        assert logits.shape[0] == (2 if last else 1)
    torch.testing.assert_close(logits[1], whole, atol=1e-4, rtol=1e-5)


def test_logits_only_for_requested_rows(runner, prompts):
    p0, p1 = prompts[0], prompts[1]
    slots = scattered_slots([len(p0), len(p1)], seed=5)
    alone = runner.execute([SeqChunk(p1, list(range(len(p1))), slots[1], True)])
    both = runner.execute(
        [
            SeqChunk(p0, list(range(len(p0))), slots[0], False),
            SeqChunk(p1, list(range(len(p1))), slots[1], True),
        ]
    )
    assert both.shape == (1, alone.shape[1]) and both.dtype == torch.float32
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-5)


def test_second_load_hits_cache(engine_config, loaded, monkeypatch):
    assert all(os.path.isdir(d) for d in cache_dirs(engine_config, default_model_path(), int4=False))

    def no_conversion(*args, **kwargs):
        raise AssertionError("GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(loader_module, "gguf_state_dict", no_conversion)
    monkeypatch.setattr(loader_module.Tokenizer, "from_gguf", no_conversion)
    again = load_model(engine_config, progress=False)
    assert again.config == loaded.config
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    text = "Hello <|im_start|> wörld 12345 \n\n  code()"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    fresh, cached = loaded.tokenizer, again.tokenizer
    assert fresh.encode(text) == cached.encode(text)
    assert fresh.decode(fresh.encode(text)) == cached.decode(fresh.encode(text))
    assert fresh.apply_chat_template(messages) == cached.apply_chat_template(messages)
    assert fresh.eos_token_ids == cached.eos_token_ids == [2]
    assert fresh.bos_token_id == cached.bos_token_id
    assert fresh.all_special_ids == cached.all_special_ids
    assert fresh.vocab_size == cached.vocab_size == 49152


def test_cache_key_follows_dtype(engine_config):
    path = default_model_path()
    bf16 = EngineConfig(dtype="bfloat16", weights_cache_dir=engine_config.weights_cache_dir)
    (meta32, weights32), (meta16, weights16) = cache_dirs(engine_config, path, False), cache_dirs(bf16, path, False)
    assert meta32 == meta16 and weights32 != weights16 != cache_dirs(bf16, path, True)[1]


def test_bfloat16_on_cpu_serves_q4_matrices_4bit(engine_config, runner, prompts):
    """bfloat16 keeps the GGUF's Q4_1 projections 4-bit; its next-token distribution tracks the fp32 reference."""
    bf16 = EngineConfig(dtype="bfloat16", weights_cache_dir=engine_config.weights_cache_dir)
    loaded = load_model(bf16, progress=False)
    projections = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert all(isinstance(getattr(layer, n), Int4Linear) for layer in loaded.model.layers for n in projections)
    quantized = ModelRunner(loaded.model, loaded.config, bf16, NUM_SLOTS)
    for p in prompts:
        chunk = SeqChunk(p, list(range(len(p))), list(range(len(p))), True)
        ref, got = runner.execute([chunk])[0], quantized.execute([chunk])[0]
        assert int(ref.argmax()) in got.topk(3).indices.tolist()
        assert torch.corrcoef(torch.stack([ref, got]))[0, 1] > 0.99
