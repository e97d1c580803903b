"""Multiverse parallel block vs the same number of tokens generated sequentially, on the default model.

    python benchmarks/multiverse_bench.py                          # 2/4/8 paths of 24 tokens, batch 1 and 16
    python benchmarks/multiverse_bench.py --paths 4 --batches 1 --path-tokens 64 --dtype float32
    python benchmarks/multiverse_bench.py --model <random llama-3.2-1b> --device cuda   # the H100 row

Each parallel request's prompt ends inside a `<Goal>` listing P outlines; a scripted logits processor (the
engine's offline seam) writes `</Goal>`, lets every path generate `--path-tokens` tokens, closes it with
`</Path>`, and ends the document with EOS right after the conclusion header. So all P paths have equal length and
decode in the same batches. The sequential baseline asks the same prompts for exactly as many tokens as the
parallel document had, in one plain sequence each, with the same tag-banning logits processor. Both are timed
wall-clock from admission to the last output, prefill included, after one untimed run of the same configuration
(one-time costs of new shapes: Triton JIT, allocator growth); `speedup` is sequential time / parallel time.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.loader import load_model
from treadle.engine.multiverse_tags import MultiverseTags
from treadle.engine.sampling_params import ParallelParams, SamplingParams
from treadle.engine.sequence import Request

TAGS = MultiverseTags()


class BlockScript:
    """Logits processor: `</Goal>` first, then `path_tokens` free tokens and `</Path>` in every path, then EOS.

    Free tokens may not contain `<`, so that no path writes a tag of its own (a nested block or an early close
    would change the shape being timed). It only looks at the last few tokens, so its cost per step stays
    negligible next to the model's."""

    def __init__(self, encode, num_prompt: int, path_tokens: int, num_paths: int, eos: int,
                 banned: torch.Tensor):
        self.goal_end = encode(TAGS.goal_end)
        self.close = encode(TAGS.path_end)
        self.headers = [encode(TAGS.header(str(i + 1))) for i in range(num_paths)]
        self.conclusion = encode(TAGS.conclusion_header)
        self.num_prompt = num_prompt
        self.path_tokens = path_tokens
        self.eos = eos
        self.banned = banned

    def forced(self, history: list[int]) -> int | None:
        n = len(history)
        if n - self.num_prompt < len(self.goal_end):
            return self.goal_end[n - self.num_prompt]
        if history[-len(self.conclusion) :] == self.conclusion:
            return self.eos
        for j, tok in enumerate(self.close):  # a header ending path_tokens + j tokens ago: close the path
            end = n - self.path_tokens - j
            if any(history[end - len(h) : end] == h for h in self.headers):
                return tok
        return None

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        tok = self.forced(history)
        if tok is None:
            return logits.index_fill_(0, self.banned, float("-inf"))
        out = torch.full_like(logits, float("-inf"))
        out[tok] = 0.0
        return out


def run_batch(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list]:
    start = time.perf_counter()
    finals: dict[str, object] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(Request(f"r{time.monotonic_ns()}-{i}", prompt, p))
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[-1]
    return time.perf_counter() - start, list(finals.values())


def tag_like_tokens(engine: LLMEngine) -> torch.Tensor:
    """Ids of the tokens whose text contains `<`, on the engine's device."""
    tok = engine.tokenizer
    ids = [i for i in range(tok.vocab_size) if "<" in tok.decode([i], skip_special_tokens=False)]
    return torch.tensor(ids, device=engine.runner.device)


def bench(engine: LLMEngine, num_paths: int, batch: int, path_tokens: int, banned: torch.Tensor) -> dict:
    tok = engine.tokenizer
    encode = lambda text: tok.encode(text, add_special_tokens=False)
    outline = "".join(f"{TAGS.outline} {i + 1}: part {i + 1} of the answer{TAGS.outline_end}\n"
                      for i in range(num_paths))
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Task {b}: describe a city."}]))
               + encode(f"{TAGS.parallel}\n{TAGS.goal}\nDescribe it in {num_paths} parts.\n{outline}")
               for b in range(batch)]
    parallel = [
        SamplingParams(temperature=0, max_tokens=1024,
                       logits_processors=[BlockScript(encode, len(p), path_tokens, num_paths, tok.eos_token_ids[0], banned)],
                       parallel=ParallelParams(max_paths=num_paths, min_fork_budget=0))
        for p in prompts
    ]
    par_s, finals = run_batch(engine, prompts, parallel)
    tokens = [f.num_generated_tokens for f in finals]
    depth = [f.depth for f in finals]
    if any(f.finish_reason != "stop" for f in finals) or engine.multiverse.num_forks == 0:
        raise RuntimeError("the parallel block did not run as scripted")
    ban = lambda history, logits: logits.index_fill_(0, banned, float("-inf"))  # the same per-row work as above
    sequential = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logits_processors=[ban])
                  for n in tokens]
    seq_s, _ = run_batch(engine, prompts, sequential)
    return {
        "paths": num_paths, "batch": batch, "path_tokens": path_tokens,
        "tokens": sum(tokens) // batch, "depth": sum(depth) // batch,
        "parallel_s": par_s, "sequential_s": seq_s, "speedup": seq_s / par_s,
        "parallel_tok_s": sum(tokens) / par_s, "sequential_tok_s": sum(tokens) / seq_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default="2,4,8")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--path-tokens", type=int, default=24)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 is what treadle serves on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_results/multiverse_bench.json")
    args = ap.parse_args()
    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=512,
                       num_threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(cfg, load_model(cfg, progress=False))
    run_batch(engine, [engine.tokenizer.encode("Warm up.")], [SamplingParams(max_tokens=4, temperature=0)])
    banned = tag_like_tokens(engine)
    rows = []
    print(f"{'paths':>5} {'batch':>5} {'tokens':>6} {'depth':>5} {'parallel s':>10} {'sequential s':>12} "
          f"{'speedup':>7} {'par tok/s':>9} {'seq tok/s':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        for num_paths in (int(p) for p in args.paths.split(",")):
            bench(engine, num_paths, batch, args.path_tokens, banned)  # untimed: first-use costs of new shapes
            r = bench(engine, num_paths, batch, args.path_tokens, banned)
            rows.append(r)
            print(f"{r['paths']:>5} {r['batch']:>5} {r['tokens']:>6} {r['depth']:>5} {r['parallel_s']:>10.2f} "
                  f"{r['sequential_s']:>12.2f} {r['speedup']:>7.2f} {r['parallel_tok_s']:>9.1f} "
                  f"{r['sequential_tok_s']:>9.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "device": cfg.device, "torch_threads": torch.get_num_threads(),
                   "results": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
