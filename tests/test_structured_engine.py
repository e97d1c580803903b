"""Guided decoding inside the engine (no server): constrained sequences emit only tokens xgrammar's matcher
accepts for the same schema, free sequences in the same batches are unchanged, preemption and n > 1 forks keep
each sequence's matcher right, and the grammar worker stops over-budget compiles."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import jsonschema
import pytest
import xgrammar

from treadle.engine import grammar_procs
from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.guided import GrammarCompileTimeout, GrammarSpec, GrammarWorker, GuidedDecoder
from treadle.engine.loader import load_model
from treadle.engine.sampling_params import SamplingParams
from treadle.engine.sequence import Request

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
REGEX = r"[A-Z][a-z]{2,8}, [0-9]{2}"


@pytest.fixture(scope="module")
def loaded():
    return load_model(EngineConfig(dtype="float32"), progress=False)


def make_engine(loaded, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", num_pages=kw.pop("num_pages", 256), **kw), loaded)


def prompt(engine: LLMEngine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[tuple[str, int], list]:
    for rid, ids, params in requests:
        engine.add_request(Request(rid, ids, params))
    tokens: dict[tuple[str, int], list] = {}
    while engine.has_work():
        for out in engine.step():
            for o in out.outputs:
                tokens.setdefault((out.request_id, o.index), []).extend(o.token_ids)
                if o.finish_reason is not None:
                    tokens[out.request_id, o.index].append(o.finish_reason)
    assert engine.kv.num_free_pages == engine.kv.num_pages
    return tokens


@pytest.fixture(scope="module")
def xgr_compiler(loaded):
    info = xgrammar.TokenizerInfo.from_huggingface(loaded.tokenizer.hf, vocab_size=loaded.config.vocab_size,
                                                   stop_token_ids=loaded.tokenizer.eos_token_ids)
    return xgrammar.GrammarCompiler(info)


def assert_xgrammar_accepts(compiled, tokens: list[int]) -> None:
    matcher = xgrammar.GrammarMatcher(compiled)
    for t in tokens:
        assert matcher.accept_token(t), (t, tokens)
    assert matcher.is_terminated()


def requests(engine: LLMEngine, schema_grammar, regex_grammar):
    person = prompt(engine, "Describe a person as JSON with a name and an age.")
    city = prompt(engine, "Name a city and a number.")
    free = [prompt(engine, "Name three colors of the rainbow."), prompt(engine, "Count to five.")]
    return [
        ("json", person, SamplingParams(temperature=0, max_tokens=40, grammar=schema_grammar)),
        ("sampled", person, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40, grammar=schema_grammar)),
        ("regex", city, SamplingParams(temperature=0, max_tokens=16, grammar=regex_grammar)),
        ("free0", free[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
        ("free1", free[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
    ]


@pytest.fixture(scope="module")
def reference(loaded):
    """The requests with plenty of KV; plus the free ones alone."""
    engine = make_engine(loaded)
    schema_grammar = asyncio.run(engine.guided.compile(GrammarSpec("json_schema", SCHEMA), 60))
    regex_grammar = asyncio.run(engine.guided.compile(GrammarSpec("regex", REGEX), 60))
    reqs = requests(engine, schema_grammar, regex_grammar)
    alone = run(engine, [r for r in reqs if r[0].startswith("free")])
    return run(engine, reqs), alone, (schema_grammar, regex_grammar)


def test_constrained_tokens_follow_the_grammar_and_free_rows_are_unchanged(loaded, reference, xgr_compiler):
    tokens, alone, _ = reference
    eos = loaded.tokenizer.eos_token_ids
    schema_ref = xgr_compiler.compile_json_schema(json.dumps(SCHEMA))
    regex_ref = xgr_compiler.compile_regex(REGEX)
    for key in [("json", 0), ("sampled", 0), ("sampled", 1), ("regex", 0)]:
        *ids, finish = tokens[key]
        assert finish == "stop" and ids[-1] in eos, key
        assert_xgrammar_accepts(regex_ref if key[0] == "regex" else schema_ref, ids)
        text = loaded.tokenizer.decode(ids)
        if key[0] == "regex":
            assert re.fullmatch(REGEX, text)
        else:
            jsonschema.validate(json.loads(text), SCHEMA)
    assert tokens["sampled", 0] != tokens["sampled", 1]  # each choice has its own matcher and draws
    for rid in ("free0", "free1"):
        assert tokens[rid, 0] == alone[rid, 0]


def test_preemption_and_chunked_prefill_keep_matchers_in_step(loaded, reference):
    tokens, _, grammars = reference
    # Two prompts' KV (no prefix sharing) fill most of the pool: as the three sequences grow, some are preempted
    # and recomputed, with prefills chunked.
    engine = make_engine(loaded, num_pages=24, page_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    constrained = requests(engine, *grammars)[:2]
    again = run(engine, constrained)
    assert engine.scheduler.num_preemptions > 0
    assert again == {k: v for k, v in tokens.items() if k[0] in ("json", "sampled")}


def test_worker_processes_give_the_same_tokens_and_free_their_matchers(loaded, reference):
    """Matchers in worker processes (the GPU default): the same tokens as the in-process thread, the n = 2 forks
    included; a stop token is accepted at once; matchers go when their sequences finish or are aborted, and the
    processes with close()."""
    tokens, _, _ = reference
    engine = make_engine(loaded, grammar_workers=2, max_num_seqs=8)
    guided = engine.guided
    grammars = [asyncio.run(guided.compile(GrammarSpec(k, v), 60)) for k, v in (("json_schema", SCHEMA),
                                                                                 ("regex", REGEX))]
    try:
        assert run(engine, requests(engine, *grammars)) == tokens
        assert guided._pool.live_matchers() == 0
        engine.add_request(Request("gone", prompt(engine, "Describe a person as JSON."),
                                   SamplingParams(temperature=0, max_tokens=40, grammar=grammars[0])))
        for _ in range(3):
            engine.step()
        assert guided._pool.live_matchers() == 1
        engine.abort("gone")
        assert guided._pool.live_matchers() == 0 and engine.kv.num_free_pages == engine.kv.num_pages
        processes = [w.process for w in guided._pool._workers]
    finally:
        engine.close()
    assert all(not p.is_alive() for p in processes)


class _Seq:
    """Stands in for an engine Sequence: the decoder only keys matchers by it."""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_token_outside_the_grammar_aborts_the_sequence_one_token_later(loaded, workers):
    tok = loaded.tokenizer
    guided = GuidedDecoder(tok, loaded.config.vocab_size, workers, max_rows=2)
    try:
        compiled = asyncio.run(guided.compile(GrammarSpec("regex", "[a-z]+"), 60))
        (good,), (bad,), eos = tok.encode("abc", add_special_tokens=False), tok.encode("7", add_special_tokens=False), \
            tok.eos_token_ids[0]
        seqs = [_Seq(), _Seq()]
        for s in seqs:
            guided.add(s, compiled)
        mask = guided.finish_masks(guided.start_masks(seqs), [0, 1])
        allowed = lambda row, t: bool(mask[row, t // 32] >> (t % 32) & 1)  # noqa: E731
        assert allowed(0, good) and not allowed(0, bad) and not allowed(1, eos)
        guided.sampled(seqs, [good, bad])
        assert guided.accept(seqs[0], good) is None
        assert guided.accept(seqs[1], bad) is None  # accepted with the next fill, which finds it breaks the grammar
        mask = guided.finish_masks(guided.start_masks(seqs), [0, 1])
        assert allowed(0, eos) and allowed(1, good) and allowed(1, bad)  # a failed row is left unmasked
        guided.sampled(seqs, [eos, good])
        assert guided.accept(seqs[1], good) == "abort"
        assert guided.accept(seqs[0], eos) == "stop"
    finally:
        guided.close()


def test_sequences_of_one_grammar_share_a_worker_process_until_it_is_full(loaded, monkeypatch):
    """Masks are cached per process, so one grammar's sequences stay together (AFFINITY_ROWS at a time); each row
    still gets its own matcher's mask, and released sequences leave no bookkeeping behind."""
    monkeypatch.setattr(grammar_procs, "AFFINITY_ROWS", 2)
    tok = loaded.tokenizer
    guided = GuidedDecoder(tok, loaded.config.vocab_size, 2, max_rows=4)
    try:
        letters, digits = (asyncio.run(guided.compile(GrammarSpec("regex", r), 60)) for r in ("[a-z]+", "[0-9]+"))
        (a,), (seven,) = tok.encode("abc", add_special_tokens=False), tok.encode("7", add_special_tokens=False)
        seqs = [_Seq() for _ in range(4)]
        for s, c in zip(seqs, (letters, letters, letters, digits)):
            guided.add(s, c)
        pool = guided._pool
        workers = [pool._entries[s].worker for s in seqs]
        assert workers[0] is workers[1] and workers[2] is not workers[0] and workers[3] is workers[2]
        allowed = lambda mask, row, t: bool(mask[row, t // 32] >> (t % 32) & 1)  # noqa: E731
        for _ in range(2):  # the second step reposts the first one's rows as they are
            mask = guided.finish_masks(guided.start_masks(seqs), [0, 1, 2, 3])
            assert [allowed(mask, r, a) for r in range(4)] == [True, True, True, False]
            assert [allowed(mask, r, seven) for r in range(4)] == [False, False, False, True]
            guided.sampled(seqs, [a, a, a, seven])
            assert [guided.accept(s, t) for s, t in zip(seqs, [a, a, a, seven])] == [None] * 4
        guided.release(seqs[1])
        rest = [seqs[3], seqs[0], seqs[2]]  # another batch: laid out afresh
        mask = guided.finish_masks(guided.start_masks(rest), [0, 1, 2])
        assert [allowed(mask, r, a) for r in range(3)] == [False, True, True]
        assert [allowed(mask, r, seven) for r in range(3)] == [True, False, False]
        for s in seqs:
            guided.release(s)
        assert all(not w.grammars for w in pool._workers)
        assert pool.live_matchers() == 0
    finally:
        guided.close()


def test_masks_placed_early_survive_the_shared_arrays_growing(loaded):
    """After an accept post by row a worker puts the next masks in place at once; when the next step needs more
    rows than the shared arrays hold, new arrays replace them, and a worker whose rows did not change must still
    write its masks there."""
    tok = loaded.tokenizer
    guided = GuidedDecoder(tok, loaded.config.vocab_size, 2, max_rows=1)
    try:
        letters, digits = (asyncio.run(guided.compile(GrammarSpec("regex", r), 60)) for r in ("[a-z]+", "[0-9]+"))
        (a,), (seven,) = tok.encode("abc", add_special_tokens=False), tok.encode("7", add_special_tokens=False)
        first, second = _Seq(), _Seq()
        guided.add(first, letters)
        mask = guided.finish_masks(guided.start_masks([first]), [0])
        guided.sampled([first], [a])
        assert guided.accept(first, a) is None
        guided.add(second, digits)  # another worker: the first one's rows stay [(0, its matcher)]
        mask = guided.finish_masks(guided.start_masks([first, second]), [0, 1])
        allowed = lambda row, t: bool(mask[row, t // 32] >> (t % 32) & 1)  # noqa: E731
        assert allowed(0, a) and not allowed(0, seven) and allowed(1, seven) and not allowed(1, a)
    finally:
        guided.close()


def test_a_dead_worker_process_aborts_its_sequences_and_is_replaced(loaded):
    tok = loaded.tokenizer
    guided = GuidedDecoder(tok, loaded.config.vocab_size, 2, max_rows=1)  # two rows grow the shared arrays
    try:
        compiled = [asyncio.run(guided.compile(GrammarSpec("regex", r), 60)) for r in ("[a-z]+", "[a-z]+!")]
        (good,), (bad,) = tok.encode("abc", add_special_tokens=False), tok.encode("7", add_special_tokens=False)
        allowed = lambda mask, row, t: bool(mask[row, t // 32] >> (t % 32) & 1)  # noqa: E731
        seqs = [_Seq(), _Seq()]
        for s, c in zip(seqs, compiled):  # two grammars: one process each
            guided.add(s, c)
        pool = guided._pool
        doomed = pool._entries[seqs[0]].worker
        assert doomed is not pool._entries[seqs[1]].worker
        mask = guided.finish_masks(guided.start_masks(seqs), [0, 1])
        assert not allowed(mask, 0, bad) and not allowed(mask, 1, bad)
        guided.sampled(seqs, [good, good])
        for s in seqs:
            assert guided.accept(s, good) is None
        doomed.process.kill()
        doomed.process.join()
        mask = guided.finish_masks(guided.start_masks(seqs), [0, 1])
        assert allowed(mask, 0, bad) and not allowed(mask, 1, bad)  # the lost row is left unmasked
        guided.sampled(seqs, [good, good])
        assert guided.accept(seqs[0], good) == "abort" and guided.accept(seqs[1], good) is None
        fresh = _Seq()
        guided.add(fresh, compiled[0])
        assert pool._entries[fresh].worker.process.is_alive()
        mask = guided.finish_masks(guided.start_masks([seqs[1], fresh]), [0, 1])
        assert not allowed(mask, 0, bad) and not allowed(mask, 1, bad) and allowed(mask, 1, good)
        for s in (*seqs, fresh):
            guided.release(s)
        assert pool.live_matchers() == 0
    finally:
        guided.close()


def test_worker_interrupts_only_interruptible_running_jobs():
    worker = GrammarWorker()
    spinning = threading.Event()

    def spin():
        spinning.set()
        while True:
            pass

    runaway = worker.submit(spin, interruptible=True)
    queued = worker.submit(lambda: "never")
    spinning.wait()
    worker.interrupt(queued)
    assert queued.cancelled()
    worker.interrupt(runaway)
    with pytest.raises(GrammarCompileTimeout):
        runaway.result(timeout=30)
    started = threading.Event()
    steady = worker.submit(lambda: started.set() or time.sleep(0.2) or "done")
    started.wait()
    worker.interrupt(steady)  # not interruptible: runs to the end
    assert steady.result(timeout=30) == "done"
    assert worker.submit(lambda: 42, interruptible=True).result(timeout=30) == 42


def test_over_budget_compile_fails_fast_and_later_compiles_work(loaded):
    engine = make_engine(loaded)
    guided = engine.guided
    huge = GrammarSpec("json_schema", {"type": "object",
                                       "properties": {f"f{i}": {"type": "integer"} for i in range(20000)}})
    with pytest.raises(GrammarCompileTimeout, match="0.05 s"):
        asyncio.run(guided.compile(huge, 0.05))
    with pytest.raises(GrammarCompileTimeout, match="already exceeded"):
        asyncio.run(guided.compile(huge, 60))
    compiled = asyncio.run(guided.compile(GrammarSpec("regex", REGEX), 60))
    out = run(engine, [("r", prompt(engine, "A city and a number?"),
                        SamplingParams(temperature=0, max_tokens=16, grammar=compiled))])
    *ids, finish = out["r", 0]
    assert finish == "stop" and re.fullmatch(REGEX, loaded.tokenizer.decode(ids))


def test_a_grammar_compiled_before_is_served_while_the_grammar_thread_is_busy(loaded):
    """A cached grammar must not queue behind another request's compile (up to its budget, seconds) on the one
    grammar thread, and must be the same object: its workers and masks are already set up."""
    engine = make_engine(loaded)
    guided = engine.guided
    spec = GrammarSpec("regex", REGEX)
    first = asyncio.run(guided.compile(spec, 60))
    release = threading.Event()
    blocker = guided._worker.submit(lambda: release.wait(30))
    try:
        t = time.perf_counter()
        again = asyncio.run(guided.compile(GrammarSpec("regex", REGEX), 60))
        assert time.perf_counter() - t < 1.0
        assert again is first
    finally:
        release.set()
        blocker.result(timeout=30)
    out = run(engine, [("r", prompt(engine, "A city and a number?"),
                        SamplingParams(temperature=0, max_tokens=16, grammar=again))])
    *ids, finish = out["r", 0]
    assert finish == "stop" and re.fullmatch(REGEX, loaded.tokenizer.decode(ids))
