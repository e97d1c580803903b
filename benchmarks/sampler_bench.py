"""Per-step cost of the sampler: one `Sampler.sample` call plus the per-token `append`s the engine makes.

Scenarios at V = 49152 (SmolLM2's vocabulary) and batch sizes 1, 16, 64:
- greedy: temperature 0 (one argmax);
- top-p: temperature 0.8, top_p 0.9 (a sort per row);
- top-k: temperature 0.8, top_k 50 (a partial top-k, no full sort);
- penalties: greedy with repetition 1.1, presence 0.5, frequency 0.5 over a 256-token prompt and output;
- seeded top-p: as top-p, but every row draws from its own generator;
- greedy + bitmask: a grammar bitmask applied to the whole batch;
- top-p + logprobs: top-p with 5 top logprobs per row;
- sampled: temperature 1 alone (what the engine's benchmarks use; on CUDA the one-pass device draw);
- sampled + bitmask: the same under a grammar bitmask in pinned host memory, as the grammar workers hand it over,
  allowing ~0.4% of the tokens (a JSON schema's masks allow few).
--vocab sets V (128256 is Llama 3's vocabulary, what the GPU benchmarks use); --scenarios picks a subset.
Each cell is the median over --iters steps after --warmup steps, in microseconds per step.
Rows marked (transformers) time the same step with transformers' logits processors and torch.multinomial
(what `generate` does), as a yardstick; transformers has no presence/frequency processors, so its penalties
row applies the repetition penalty alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from treadle.engine.sampler import Sampler, SeqSamplingState
from treadle.engine.sampling_params import SamplingParams

VOCAB = 49152
SCENARIOS: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "top-p": dict(temperature=0.8, top_p=0.9),
    "top-k": dict(temperature=0.8, top_k=50),
    "penalties": dict(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    "seeded top-p": dict(temperature=0.8, top_p=0.9),
    "greedy + bitmask": dict(temperature=0.0),
    "top-p + logprobs": dict(temperature=0.8, top_p=0.9, logprobs=5),
    "sampled": dict(temperature=1.0),
    "sampled + bitmask": dict(temperature=1.0),
}


def make_states(name: str, batch: int, gen: torch.Generator, vocab: int) -> list[SeqSamplingState]:
    states = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (256,), generator=gen).tolist()
        seed = 1000 + i if name == "seeded top-p" else None
        s = SeqSamplingState(SamplingParams(**SCENARIOS[name]), prompt, seed)
        for t in torch.randint(0, vocab, (256,), generator=gen).tolist():
            s.append(t)
        states.append(s)
    return states


HF_SCENARIOS: dict[str, list] = {
    "greedy": [],
    "top-p": [TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.9)],
    "top-k": [TemperatureLogitsWarper(0.8), TopKLogitsWarper(50)],
    "penalties": [RepetitionPenaltyLogitsProcessor(1.1)],
}


def time_hf_step(name: str, batch: int, device: torch.device, warmup: int, iters: int, vocab: int) -> float:
    gen = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(0, vocab, (batch, 512), generator=gen).to(device)
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(device)
    processors = LogitsProcessorList(HF_SCENARIOS[name])
    greedy = SCENARIOS[name]["temperature"] == 0.0
    times = []
    for step in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores = processors(input_ids, logits.clone())
        if greedy:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1)
        tokens.tolist()
        elapsed = time.perf_counter() - t0
        if step >= warmup:
            times.append(elapsed)
    return statistics.median(times) * 1e6


def time_step(sampler: Sampler, name: str, batch: int, device: torch.device, warmup: int, iters: int) -> float:
    vocab = sampler.vocab_size
    gen = torch.Generator().manual_seed(batch)
    states = make_states(name, batch, gen, vocab)
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(device)
    bitmask = None
    words = (vocab + 31) // 32
    if name == "greedy + bitmask":
        bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=gen, dtype=torch.int64)
        bitmask = bitmask.to(torch.int32)
    elif name == "sampled + bitmask":
        bitmask = torch.zeros(batch, words, dtype=torch.int32, pin_memory=device.type == "cuda")
        bitmask[:, torch.randint(0, words, (words // 32,), generator=gen)] = 0x01010101
    times = []
    for step in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sampler.sample(logits, states, bitmask)  # returns Python ints: includes the device sync
        for s, tok in zip(states, out.token_ids):
            s.append(tok)
        elapsed = time.perf_counter() - t0
        if step >= warmup:
            times.append(elapsed)
    return statistics.median(times) * 1e6


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of the scenarios")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers yardstick rows")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", default=None, help="JSON path (default: bench_results/sampler-<time>.json)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    names = args.scenarios.split(",")
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {sorted(unknown)}")
    sampler = Sampler(args.vocab, [2], device)
    results = {name: {b: time_step(sampler, name, b, device, args.warmup, args.iters) for b in batches}
               for name in names}
    for name in [] if args.no_transformers else [n for n in HF_SCENARIOS if n in names]:
        results[f"{name} (transformers)"] = {b: time_hf_step(name, b, device, args.warmup, args.iters, args.vocab)
                                             for b in batches}

    table = Table(title=f"sampler step, V={args.vocab}, {device} (median µs per step; µs per row in brackets)")
    table.add_column("scenario")
    for b in batches:
        table.add_column(f"B={b}", justify="right")
    for name, row in results.items():
        table.add_row(name, *[f"{row[b]:,.0f} ({row[b] / b:,.1f})" for b in batches])
    console = Console()
    console.print(table)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else Path("bench_results") / f"sampler-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "sampler_step",
        "time": stamp,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "vocab_size": args.vocab,
        "warmup": args.warmup,
        "iters": args.iters,
        "us_per_step": {name: {str(b): v for b, v in row.items()} for name, row in results.items()},
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
