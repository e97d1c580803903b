"""ModelRunner step times on the default model: decode at several batch sizes and a short prefill, per dtype.

    python benchmarks/runner_step.py                      # float32 and bfloat16, batch 1/4/16, 128-token contexts
    python benchmarks/runner_step.py --dtypes bfloat16,bfloat16-dense --batches 1,16 --context 512

`bfloat16` is what the loader serves on CPU (the GGUF's Q4 matrices also kept 4-bit, for small batches);
`bfloat16-dense` dequantizes every matrix to bfloat16 only, to show what that choice is worth. Each sequence is prefilled with `--context` tokens, then all of them decode together for `--steps` steps; the
median step time gives ms/step and tokens/s (batch / step time). `prefill 40` is one fresh 40-token prompt (the
runner's share of TTFT). The minimum step time is printed too: on a shared box it is the best estimate of the
uncontended cost; `--threads 1 --clock thread` measures CPU time instead of wall time, which other processes on
the box disturb far less. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from gguf import GGUFReader

from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig
from treadle.engine.loader import build_model, default_model_path, load_model
from treadle.engine.models.gguf_weights import gguf_model_config, gguf_state_dict
from treadle.engine.model_runner import ModelRunner


CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def dense_bfloat16_model():
    """The default model with every matrix dequantized to bfloat16 (what the loader does off CPU)."""
    reader = GGUFReader(default_model_path())
    config = gguf_model_config(reader)
    return build_model(config, gguf_state_dict(reader, config, torch.bfloat16, False), torch.device("cpu")), config


def summary(times: list[float]) -> dict:
    """Median, and the minimum as the best estimate of the uncontended cost on a shared box."""
    return {"ms": 1000 * statistics.median(times), "ms_min": 1000 * min(times)}


def bench_dtype(dtype: str, batches: list[int], context: int, steps: int, threads: int | None) -> list[dict]:
    cfg = EngineConfig(dtype=dtype.removesuffix("-dense"), num_threads=threads)
    if dtype == "bfloat16-dense":
        model, config = dense_bfloat16_model()
    else:
        loaded = load_model(cfg, progress=False)
        model, config = loaded.model, loaded.config
    span = context + steps + 1
    runner = ModelRunner(model, config, cfg, num_slots=max(batches) * span + 64)
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    rows = []

    prompt = torch.randint(3, vocab, (40,), generator=gen).tolist()
    warm = SeqChunk(prompt, list(range(40)), list(range(40)), True)
    for _ in range(2):
        runner.execute([warm])
    times = [timed(lambda: runner.execute([warm])) for _ in range(5)]
    rows.append({"dtype": dtype, "kind": "prefill 40", "batch": 1, **summary(times)})

    for batch in batches:
        seqs = [torch.randint(3, vocab, (context,), generator=gen).tolist() for _ in range(batch)]
        slots = [list(range(i * span, (i + 1) * span)) for i in range(batch)]
        for ids, s in zip(seqs, slots):
            runner.execute([SeqChunk(ids, list(range(context)), s[:context], True)])
        step_times = []
        for step in range(steps):
            n = context + step
            chunks = [SeqChunk([ids[step % context]], [n], s[: n + 1], True) for ids, s in zip(seqs, slots)]
            step_times.append(timed(lambda: runner.execute(chunks)))
        stats = summary(step_times[2:])  # the first steps pay one-time allocation and page faults
        rows.append(
            {"dtype": dtype, "kind": f"decode @{context}", "batch": batch, **stats, "tok_s": batch * 1000 / stats["ms"]}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="thread: CPU time of the calling thread (needs --threads 1); steadier than wall time on a shared box",
    )
    ap.add_argument("--out", default="bench_results/runner_step.json")
    args = ap.parse_args(argv)
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread measures one thread's CPU time: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for dtype in args.dtypes.split(","):
        rows += bench_dtype(dtype, batches, args.context, args.steps, args.threads)

    print(f"{'dtype':<15} {'kind':<12} {'batch':>5} {'ms/step':>9} {'min ms':>8} {'tok/s':>8}")
    for r in rows:
        tok_s = f"{r['tok_s']:.1f}" if "tok_s" in r else "-"
        print(f"{r['dtype']:<15} {r['kind']:<12} {r['batch']:>5} {r['ms']:>9.1f} {r['ms_min']:>8.1f} {tok_s:>8}")
    meta = {
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "context": args.context, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
