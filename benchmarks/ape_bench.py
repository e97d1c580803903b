"""APE cached contexts: time to first token against sequential re-encoding, and the fact-retrieval quality stand-in.

    python benchmarks/ape_bench.py                                   # CPU: default model, 8 contexts x 2K tokens
    python benchmarks/ape_bench.py --quality                         # + exact match: sequential / APE / naive
    python benchmarks/ape_bench.py --model <random llama-3.2-1b> --device cuda --context-tokens 4096  # H100 row

Speed: N distinct contexts of L tokens each and a short chat query. `sequential` sends the shared prefix, every
context and the query as one ordinary prompt (the work a server without APE repeats on every request); `ape cold`
sends the same text as contexts that are not cached yet (each encoded independently, then the query);
`ape cached` repeats the APE request with the contexts already in the pool (median of `--repeats`). TTFT is
wall-clock from admission to the first token, in the offline engine; the prefix cache is off so the sequential
prompt cannot reuse the contexts' pages. N x L may exceed the model's trained context (SmolLM2: 8192): the
benchmark raises max_model_len to fit, which only matters for timing (RoPE positions past the trained range).

Quality: benchmarks/ape_quality/facts.py, greedy, exact match of the first number in the answer, for sequential
encoding, APE at the served defaults (ape_temperature, ape_scale) and naive parallel encoding (T = S = 1).
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.loader import load_model
from treadle.engine.sampling_params import ApeParams, SamplingParams
from treadle.engine.sequence import Request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ape_quality.facts import build_set, exact_match

QUESTION = "Which of the documents mentions a door code? Answer briefly."


def run_one(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    """TTFT (seconds) and the generated token ids of one request run alone."""
    tokens: list[int] = []
    ttft = None
    start = time.perf_counter()
    engine.add_request(Request(rid, prompt, params))
    while engine.has_work():
        for out in engine.step():
            for c in out.outputs:
                if c.token_ids and ttft is None:
                    ttft = time.perf_counter() - start
                tokens += c.token_ids
    return ttft, tokens


def chat_parts(engine: LLMEngine, question: str) -> tuple[list[int], list[int]]:
    """(shared prefix, query): the chat prompt for `question` split where the contexts go."""
    tok = engine.tokenizer
    layout = engine.ape.layout
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    query = layout.query_from_text(tok, text)
    return list(layout.prefix_ids), query[len(layout.prefix_ids) :]


def make_contexts(engine: LLMEngine, num: int, length: int, seed: int = 11) -> list[list[int]]:
    """`num` distinct contexts of exactly `length` tokens, cut from fact-set documents built with `seed`."""
    docs = [d for item in build_set(num_items=400, num_docs=6, seed=seed) for d in item.documents]
    enc = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)
    out, i = [], 0
    for _ in range(num):
        ids: list[int] = []
        while len(ids) < length:
            ids += enc(docs[i % len(docs)] + " ")
            i += 1
        out.append(ids[:length])
    return out


def speed(engine: LLMEngine, args) -> list[dict]:
    prefix, query = chat_parts(engine, QUESTION)
    greedy = {"temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True}
    warm = make_contexts(engine, 2, 64, seed=12)
    run_one(engine, "warm-seq", prefix + warm[0] + query, SamplingParams(**greedy))
    run_one(engine, "warm-ape", prefix + query, SamplingParams(**greedy, ape=ApeParams(warm)))
    contexts = make_contexts(engine, args.contexts, args.context_tokens)
    seq_prompt = prefix + [t for c in contexts for t in c] + query
    print(f"{'mode':<12} {'TTFT s':>9} {'prefill tokens':>15} {'speedup':>8}")
    rows = []

    def row(mode: str, ttft: float, prefill_tokens: int) -> None:
        rows.append({"mode": mode, "ttft_s": ttft, "prefill_tokens": prefill_tokens,
                     "speedup_vs_sequential": rows[0]["ttft_s"] / ttft if rows else 1.0})
        r = rows[-1]
        print(f"{mode:<12} {ttft:>9.3f} {prefill_tokens:>15} {r['speedup_vs_sequential']:>7.1f}x", flush=True)

    row("sequential", run_one(engine, "seq", seq_prompt, SamplingParams(**greedy))[0], len(seq_prompt))
    before = engine.ape.encoded_tokens
    ape = SamplingParams(**greedy, ape=ApeParams(contexts))
    ttft, _ = run_one(engine, "ape-cold", prefix + query, ape)
    row("ape cold", ttft, engine.ape.encoded_tokens - before + len(prefix) + len(query))
    times = [run_one(engine, f"ape-{i}", prefix + query, ape)[0] for i in range(args.repeats)]
    row("ape cached", statistics.median(times), len(prefix) + len(query))
    return rows


def quality(engine: LLMEngine, args) -> list[dict]:
    items = build_set(num_items=args.quality_items)
    cfg = engine.cfg
    modes = {"sequential": None, f"ape (T={cfg.ape_temperature}, S={cfg.ape_scale})":
             (cfg.ape_temperature, cfg.ape_scale), "naive parallel (T=S=1)": (1.0, 1.0)}
    enc = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)
    rows = []
    for mode, ts in modes.items():
        correct = 0
        for i, item in enumerate(items):
            prefix, query = chat_parts(engine, item.question)
            docs = [enc(d + "\n\n") for d in item.documents]
            params = SamplingParams(temperature=0, max_tokens=12)
            prompt = prefix + query
            if ts is None:
                prompt = prefix + [t for d in docs for t in d] + query
            else:
                params.ape = ApeParams(docs, temperature=ts[0], scale=ts[1])
            _, out = run_one(engine, f"q{mode}{i}", prompt, params)
            correct += exact_match(engine.tokenizer.decode(out), item.answer)
        rows.append({"mode": mode, "exact_match": correct / len(items), "items": len(items)})
        print(f"{mode:<28} {rows[-1]['exact_match']:>6.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=1, help="generated per request (TTFT needs only one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batched-tokens", type=int, default=None, help="default: 1024 on CPU, 8192 on CUDA")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quality", action="store_true", help="also run the fact-retrieval set")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--quality-items", type=int, default=30)
    ap.add_argument("--out", default="bench_results/ape_bench.json")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    total = args.contexts * (args.context_tokens + 64) + 256
    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False,
                       max_model_len=total, num_pages=-(-3 * total // 16), num_threads=args.threads,
                       max_num_batched_tokens=args.max_batched_tokens or (8192 if cuda else 1024))
    loaded = load_model(cfg, progress=False)
    engine = LLMEngine(cfg, loaded)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    result = {"model": loaded.name, "device": device, "dtype": args.dtype, "contexts": args.contexts,
              "context_tokens": args.context_tokens, "max_model_len": total}
    if not args.quality_only:
        print(f"\n{loaded.name} on {device}, {args.dtype}: {args.contexts} contexts x {args.context_tokens} tokens")
        result["speed"] = speed(engine, args)
    if args.quality or args.quality_only:
        print(f"\nfact retrieval, {args.quality_items} items, exact match")
        result["quality"] = quality(engine, args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
