"""Multiverse parallel paths in the engine, against transformers fed the whole document with an explicit 4-D mask
(sibling paths masked from each other) and explicit position ids (paths restart after `</Goal>`, the conclusion
goes one past the furthest path): every token the engine sampled freely must be that reference's greedy token."""

from __future__ import annotations

import pytest
import torch
from multiverse_testing import Rule, Script
from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.multiverse import Block, PathNode, TagScanner
from treadle.engine.multiverse_tags import MultiverseTags
from treadle.engine.sampling_params import ParallelParams, SamplingParams
from treadle.engine.sequence import Request

TAGS = MultiverseTags()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pieces(tiny):
    tok = tiny[0].tokenizer

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    return {
        "prompt": enc("<|im_start|>user\nPlan a trip.<|im_end|>\n<|im_start|>assistant\n"),
        "goal": enc("<Parallel>\n<Goal>\n<Outline> 1: where</Outline>\n<Outline> 2: when</Outline>\n</Goal>"),
        "nested_goal": enc("<Parallel>\n<Goal>\n<Outline> 1.1: a</Outline>\n<Outline> 1.2: b</Outline>\n</Goal>"),
        "headers": {pid: enc(TAGS.header(pid)) for pid in ("1", "2", "1.1", "1.2")},
        "conclusion": enc(TAGS.conclusion_header),
        "close": enc("</Path>"),
        "end_block": enc("</Conclusion>\n</Parallel>"),
    }


def nested_script(p) -> Script:
    """Trunk forks paths 1 and 2; path 1 forks 1.1 and 1.2 (depth 2), concludes and closes; the root concludes."""
    h = p["headers"]
    return Script([
        Rule(p["prompt"][-3:], 3, p["goal"]),
        Rule(h["1"], 3, p["nested_goal"]),
        Rule(h["1.1"], 4, p["close"]),
        Rule(h["1.2"], 2, p["close"]),
        Rule(p["conclusion"], 3, p["end_block"] + p["close"], unless=h["2"]),  # path 1's own conclusion
        Rule(h["2"], 5, p["close"]),
        Rule(p["conclusion"], 4, p["end_block"]),  # the root's conclusion, then free tokens to max_tokens
    ])


def engine_for(tiny, page_size: int, num_pages: int | None = None, **kw) -> LLMEngine:
    pages = num_pages or 4096 // page_size
    return LLMEngine(EngineConfig(dtype="float32", page_size=page_size, num_pages=pages, **kw), tiny[0])


def parallel_params(script: Script, max_tokens: int = 130, **parallel) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logits_processors=[script],
                          parallel=ParallelParams(min_fork_budget=8, **parallel))


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, list]:
    outs: dict[str, list] = {}
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(out.outputs)
    assert engine.kv.num_free_pages == engine.kv.num_pages
    return outs


# ---- the reference ---------------------------------------------------------------------------------------------
def multiverse_layout(doc: list[int], p) -> tuple[torch.Tensor, list[int], set[int]]:
    """Mask [T, T], position ids and the indices of forced header tokens, per the Multiverse training rules, read
    off the token sequence: a path runs from its header through its `</Path>` tokens; a token right after a
    closed path that is not another header ends the block."""
    headers = list(p["headers"].values())
    close, conclusion = p["close"], p["conclusion"]
    n = len(doc)
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    positions: list[int] = []
    inserted: set[int] = set()
    blocks: list[dict] = []  # open blocks: G (position before the paths), furthest end, finished sibling spans
    open_paths: list[tuple[int, dict]] = []  # (start index, its block)
    just_closed: dict | None = None
    i = 0
    while i < n:
        header = next((h for h in headers if doc[i : i + len(h)] == h), None)
        if just_closed is not None and header is None:  # the block is over: conclusion one past the furthest path
            block = blocks.pop()
            for a in block["spans"]:
                for b in block["spans"]:
                    if a != b:
                        mask[a[0] : a[1], b[0] : b[1]] = False
            positions.append(block["end"] + 1)
            inserted.update(range(i, i + len(conclusion)))
            just_closed = None
            i += 1
            continue
        if header is not None:
            if just_closed is None:
                blocks.append({"G": positions[-1], "end": 0, "spans": []})
            block = blocks[-1]
            open_paths.append((i, block))
            inserted.update(range(i, i + len(header)))
            positions.append(block["G"] + 1)
            just_closed = None
            i += 1
            continue
        positions.append(positions[-1] + 1 if positions else 0)
        if doc[i - len(close) + 1 : i + 1] == close and open_paths:
            start, block = open_paths.pop()
            block["spans"].append((start, i + 1))
            block["end"] = max(block["end"], positions[-1])
            just_closed = block
        i += 1
    return mask, positions, inserted


def check_against_reference(reference, doc: list[int], num_prompt: int, script: Script, p) -> int:
    mask, positions, inserted = multiverse_layout(doc, p)
    bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.inference_mode():
        logits = reference(torch.tensor([doc]), attention_mask=bias[None, None],
                           position_ids=torch.tensor([positions])).logits[0]
    checked = 0
    for t in range(num_prompt, len(doc)):
        history = [doc[j] for j in range(t) if mask[t - 1, j]]
        if t in inserted or script.forced_token(history) is not None:
            continue
        assert int(logits[t - 1].argmax()) == doc[t], f"token {t} of {len(doc)}"
        checked += 1
    return checked


@pytest.mark.parametrize("page_size", [1, 16])
def test_nested_paths_match_transformers_with_multiverse_mask(tiny, pieces, page_size):
    engine = engine_for(tiny, page_size)
    script = nested_script(pieces)
    req = Request("r", pieces["prompt"], parallel_params(script))
    outs = run(engine, [req])["r"]
    doc = req.seqs[0].token_ids
    assert check_against_reference(tiny[1], doc, len(pieces["prompt"]), script, pieces) > 20

    stats = engine.snapshot_stats()
    assert (stats.parallel_forks, stats.parallel_merges, stats.parallel_branches) == (2, 2, 0)
    final = outs[-1]
    assert final.finish_reason == "length" and final.depth == 130 and all(o.depth is not None for o in outs)
    assert final.num_generated_tokens == len(doc) - len(pieces["prompt"]) > final.depth
    assert (stats.parallel_tokens, stats.parallel_depth) == (final.num_generated_tokens, final.depth)
    text = "".join(o.text for o in outs)
    assert text == engine.tokenizer.decode(doc[len(pieces["prompt"]):], skip_special_tokens=True)
    assert [b.path for b in final.branches] == ["1", "1/1.1", "1/1.2", "2"]
    by_path = {b.path: b.text for b in final.branches}
    assert by_path["1"].startswith(TAGS.header("1")) and by_path["1"].endswith("</Path>")
    assert by_path["1/1.1"] in by_path["1"] and by_path["1"] + by_path["2"] in text
    live: dict[str, str] = {}
    for o in outs:
        for d in o.paths:
            live[d.path] = live.get(d.path, "") + d.text
    assert live == by_path | {"1": by_path["1"].replace(by_path["1/1.1"] + by_path["1/1.2"], "")}


def test_preempted_paths_recompute_to_the_same_document(tiny, pieces):
    script = nested_script(pieces)
    roomy = engine_for(tiny, 1)
    reqs = [Request(f"a{i}", pieces["prompt"] + [100 + i], parallel_params(script)) for i in range(3)]
    run(roomy, reqs)
    # 3 documents of 173 tokens in a 400-slot pool: paths are preempted and re-forked from their parent, and a
    # whole document is swapped out and recomputed fork by fork.
    tight = engine_for(tiny, 1, num_pages=400, max_num_batched_tokens=24)
    again = [Request(f"b{i}", pieces["prompt"] + [100 + i], parallel_params(script)) for i in range(3)]
    run(tight, again)
    assert tight.scheduler.num_preemptions > 0 and tight.multiverse.num_swaps > 0
    assert [r.seqs[0].token_ids for r in again] == [r.seqs[0].token_ids for r in reqs]


def test_document_larger_than_the_pool_ends_with_length(tiny, pieces):
    engine = engine_for(tiny, 16, num_pages=9)  # 144 slots: the document needs ~200
    req = Request("r", pieces["prompt"], parallel_params(nested_script(pieces)))
    outs = run(engine, [req])["r"]
    assert outs[-1].finish_reason == "length" and outs[-1].depth < 130


def test_forks_are_skipped_past_max_depth_or_budget(tiny, pieces):
    script = nested_script(pieces)
    engine = engine_for(tiny, 16)
    run(engine, [Request("d", pieces["prompt"], parallel_params(script, max_depth=1))])
    assert (engine.multiverse.num_forks, engine.multiverse.num_merges) == (1, 0)  # path 1 writes 1.1, 1.2 itself
    run(engine, [Request("b", pieces["prompt"], parallel_params(script, max_tokens=40))])
    assert engine.multiverse.num_forks == 1  # too little depth left at `</Goal>`
    run(engine, [Request("t", pieces["prompt"], parallel_params(script, max_total_tokens=45))])
    assert engine.multiverse.num_forks == 1


def test_a_goal_opened_in_the_prompt_forks_on_the_generated_goal_end(tiny, pieces):
    tok = tiny[0].tokenizer
    prompt = pieces["prompt"] + pieces["goal"][:-3]  # the prompt stops right before `</Goal>`
    h = pieces["headers"]
    script = Script([Rule(prompt[-3:], 0, pieces["goal"][-3:]), Rule(h["1"], 2, pieces["close"]),
                     Rule(h["2"], 1, pieces["close"])])
    engine = engine_for(tiny, 16)
    outs = run(engine, [Request("p", prompt, parallel_params(script, max_tokens=30))])["p"]
    assert (engine.multiverse.num_forks, engine.multiverse.num_merges) == (1, 1)
    assert [b.path for b in outs[-1].branches] == ["1", "2"]
    assert "".join(o.text for o in outs).startswith(tok.decode(pieces["goal"][-3:]) + TAGS.header("1"))


def test_abort_mid_branch_and_stop_in_a_path_free_everything(tiny, pieces):
    script = nested_script(pieces)
    engine = engine_for(tiny, 16)
    seen = []
    req = Request("r", pieces["prompt"], parallel_params(script), on_output=seen.append)
    engine.add_request(req)
    while engine.multiverse.num_branches < 4:  # paths 1 (forked again), 2, 1.1 and 1.2
        engine.step()
    engine.abort("r")
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert engine.kv.num_free_pages == engine.kv.num_pages and not engine.has_work()
    assert engine.multiverse.num_branches == 0

    # A stop string inside a path ends the whole document, siblings included.
    params = parallel_params(script)
    params.stop = ["</Path>"]  # the first path to close
    outs = run(engine, [Request("s", pieces["prompt"], params)])["s"]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == "</Path>"
    assert "</Path>" not in "".join(o.text for o in outs)
    assert engine.multiverse.num_branches == 0


# ---- pieces ----------------------------------------------------------------------------------------------------
def test_scanner_reads_outline_ids_and_its_own_path_end():
    scanner = TagScanner(TAGS)
    assert scanner.feed("<Path>\n1: x <Goal> g <Outline>") == []
    events = scanner.feed(" 1.1 : a</Outline><Outline>1.2: b</Outline><Outline>1.1: c</Outline></Go")
    assert events == []
    assert scanner.feed("al>\n") == [("fork", ["1.1", "1.2"])]
    assert scanner.feed("<Path> 1.1: ... </Path> then </Path>") == [("close", [])]


def test_document_releases_text_in_document_order():
    root = PathNode("")
    root.write("a")
    block = Block([PathNode("1"), PathNode("2")])
    root.parts.append(block)
    assert root.release() == (["a"], False)
    block.paths[1].write("B")  # path 2 runs ahead of path 1: held back
    block.paths[0].write("A1")
    assert root.release() == (["A1"], False)
    block.paths[0].write("A2")
    block.paths[0].done = True
    assert root.release() == (["A2", "B"], False)
    block.paths[1].done = True
    root.write("c")
    root.done = True
    assert root.release() == (["c"], True)
    assert root.serialize() == "aA1A2Bc"
