"""Engine-level cost of structured outputs: decode steps with and without a JSON schema, split by phase.

    python benchmarks/structured_step.py --model /tmp/ck1b --device cuda --workers 4,0 --batches 1,16,64

structured_overhead.py measures the same thing through HTTP, where the server's own per-token work and run-to-run
noise blur a few percent; this drives an LLMEngine directly. Each round adds `batch` requests (random 32-token
prompts, --temperature 1 by default where structured_overhead.py samples greedily, exactly --output-len tokens)
and steps until they finish; rounds alternate free and constrained by structured_overhead's SCHEMA, after
--warmup pairs per batch size (the grammar engine builds masks lazily: a random-weight model samples arbitrary
allowed tokens and keeps meeting parser configurations the first rounds have not seen; a trained model repeats
itself and warms up faster). Per round the mean ms per
step is split into the engine's phases: `forward` (host side of launching the model), `start` / `finish`
(sending the mask fills and waiting for them), `sample` (which includes waiting for the GPU), `accept` and
`emit`. The median round of each mode is reported, and the overhead both from those medians and as the median over
pairs of adjacent rounds (which drift less against each other). Grammar workers 0 = masks on a thread of this
process. `--profile` adds one more round per mode under torch.profiler: the device time per step of every kernel
and copy whose time differs between the modes, and a Chrome trace of each round next to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from treadle.engine.config import EngineConfig
from treadle.engine.engine import LLMEngine
from treadle.engine.guided import GrammarSpec
from treadle.engine.loader import load_model
from treadle.engine.sampling_params import SamplingParams
from treadle.engine.sequence import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_schema import SCHEMA

PHASES = (("forward", "runner", "execute"), ("start", "guided", "start_masks"), ("finish", "guided", "finish_masks"),
          ("sample", "sampler", "sample"), ("accept", "guided", "accept"), ("emit", None, "_emit"),
          ("step", None, "step"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(c) for c in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model path (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workers", type=ints, default=[0], help="grammar worker processes, one engine per value")
    p.add_argument("--batches", type=ints, default=[1, 16, 64])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="free/constrained round pairs per batch size")
    p.add_argument("--warmup", type=int, default=1, help="round pairs per batch size before measuring")
    p.add_argument("--out", default="structured_step.json")
    p.add_argument("--profile", action="store_true", help="device time per kernel, free vs json_schema (CUDA)")
    args = p.parse_args(argv)
    if args.profile and not args.device.startswith("cuda"):
        p.error("--profile measures device time: it needs --device cuda")
    return args


class PhaseClock:
    """Wall time spent in the engine's phases, by wrapping the bound methods of one engine."""

    def __init__(self, engine: LLMEngine):
        self.totals: dict[str, float] = {}
        for name, owner, method in PHASES:
            obj = engine if owner is None else getattr(engine, owner)
            setattr(obj, method, self._timed(name, getattr(obj, method)))

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t
        return wrapper


def measure(args: argparse.Namespace, loaded, workers: int, console: Console) -> dict:
    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, grammar_workers=workers,
                       num_pages=max(args.batches) * ((32 + args.output_len) // 16 + 2) * 2, max_num_seqs=256,
                       max_num_batched_tokens=8192)
    engine = LLMEngine(cfg, loaded)
    try:
        grammar = asyncio.run(engine.guided.compile(GrammarSpec("json_schema", SCHEMA), 60))
        clock = PhaseClock(engine)
        gen = torch.Generator().manual_seed(0)
        count = 0

        def round_(batch: int, constrained: bool) -> dict:
            nonlocal count
            for _ in range(batch):
                prompt = torch.randint(100, engine.model_config.vocab_size - 100, (32,), generator=gen).tolist()
                params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True,
                                        grammar=grammar if constrained else None)
                engine.add_request(Request(f"r{count}", prompt, params))
                count += 1
            clock.totals.clear()
            steps = 0
            t = time.perf_counter()
            while engine.has_work():
                engine.step()
                steps += 1
            wall = time.perf_counter() - t
            return {"tok_s": batch * args.output_len / wall, "steps": steps,
                    **{k: 1e3 * v / steps for k, v in clock.totals.items()}}

        levels = {}
        for batch in args.batches:
            for _ in range(args.warmup):
                round_(batch, False), round_(batch, True)
            runs = {"free": [], "json_schema": []}
            for _ in range(args.repeats):
                runs["free"].append(round_(batch, False))
                runs["json_schema"].append(round_(batch, True))
            median = {m: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for m, r in runs.items()}
            overhead = 100 * (1 - median["json_schema"]["tok_s"] / median["free"]["tok_s"])
            pairs = sorted(100 * (1 - j["tok_s"] / f["tok_s"]) for f, j in zip(runs["free"], runs["json_schema"]))
            paired = pairs[len(pairs) // 2]
            console.print(f"workers {workers} batch {batch:3d}: {median['free']['tok_s']:9.1f} vs "
                          f"{median['json_schema']['tok_s']:9.1f} tok/s ({overhead:.1f}%; median of pairs "
                          f"{paired:.1f}%, pairs {' '.join(f'{p:.1f}' for p in pairs)})")
            levels[batch] = {"overhead_pct": overhead, "paired_overhead_pct": paired, "median": median, "runs": runs}
            if args.profile:
                levels[batch]["device_us_per_step"] = {
                    mode: profiled(lambda b=batch, m=mode: round_(b, m == "json_schema"),
                                   f"{args.out}.w{workers}.b{batch}.{mode}")
                    for mode in ("free", "json_schema")}
        return levels
    finally:
        engine.close()


def profiled(run, trace_path: str) -> dict[str, float]:
    """Device microseconds per decode step of each kernel and copy over one round, and its Chrome trace (device
    activity only: the gaps between kernels are what the host costs the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps = run()["steps"]
    prof.export_chrome_trace(f"{trace_path}.trace.json")
    return {e.key: e.self_device_time_total / steps for e in prof.key_averages() if e.self_device_time_total > 0}


def print_profile(console: Console, results: dict) -> None:
    """Per batch: the kernels and copies whose device time per step differs most between the modes."""
    for w, levels in results.items():
        for batch, level in levels.items():
            times = level.get("device_us_per_step")
            if times is None:
                continue
            free, json_ = times["free"], times["json_schema"]
            table = Table(title=f"workers {w} batch {batch}: device us per step (total {sum(free.values()):.0f} -> "
                                f"{sum(json_.values()):.0f})")
            for col in ("kernel / copy", "free", "json_schema", "diff"):
                table.add_column(col, justify="left" if col.startswith("kernel") else "right")
            keys = sorted(set(free) | set(json_), key=lambda k: -abs(json_.get(k, 0.0) - free.get(k, 0.0)))
            for k in keys[:12]:
                a, b = free.get(k, 0.0), json_.get(k, 0.0)
                table.add_row(k[:90], f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}")
            console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=200)
    loaded = load_model(EngineConfig(model=args.model, device=args.device, dtype=args.dtype), progress=False)
    results = {w: measure(args, loaded, w, console) for w in args.workers}
    table = Table(title=f"structured-output cost per decode step (ms; median of {args.repeats} rounds)")
    for col in ("workers", "batch", "mode", "tok/s", "overhead", "paired", *(p[0] for p in PHASES)):
        table.add_column(col, justify="right")
    for w, levels in results.items():
        for batch, level in levels.items():
            for mode, row in level["median"].items():
                over = f"{level['overhead_pct']:.1f}%" if mode == "json_schema" else ""
                paired = f"{level['paired_overhead_pct']:.1f}%" if mode == "json_schema" else ""
                table.add_row(str(w), str(batch), mode, f"{row['tok_s']:.1f}", over, paired,
                              *(f"{row.get(p[0], 0.0):.3f}" for p in PHASES))
    console.print(table)
    print_profile(console, results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()
    Path(args.out).write_text(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "commit": commit,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "settings": vars(args), "schema": SCHEMA, "results": results,
    }, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
