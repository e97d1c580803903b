"""End-to-end cost of structured outputs: output tokens/s through HTTP with and without a JSON schema.

One `treadle serve`, driven by `treadle bench serve`'s client on /v1/completions at each --concurrency level:
the same number of requests of exactly --output-len tokens, once free and once constrained by SCHEMA (an array
of at least 200 small objects: keys, bounded integers, strings and enums, so masks change every few tokens and
the output cannot end early). Free and constrained runs alternate --repeats times and the medians are
compared, so load drift on a shared box hits both alike. One constrained request warms the grammar first:
the benchmark measures steady-state decoding, not the one-time compile. Issue 4's target: < 5% overhead at
16 concurrent requests on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from treadle.server import bench_serve as bs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_serving import free_port, server_process
from structured_schema import SCHEMA

TARGET_AT_16 = 5.0  # percent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16, 64])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--requests-at-1", type=int, default=4, help="requests per run at concurrency 1")
    p.add_argument("--repeats", type=int, default=3, help="alternating free/constrained runs per level")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `treadle serve` argument (repeatable)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: bench_results/structured_overhead-<time>.json)")
    args = p.parse_args(argv)
    if min([args.output_len, args.prompt_len, args.requests_at_1, args.repeats, *args.concurrency]) < 1:
        p.error("lengths, counts and concurrency levels must be positive")
    return args


def run(base_url: str, requests: list[bs.BenchRequest], concurrency: int, extra_body: dict,
        warmups: list[bs.BenchRequest] = ()) -> bs.BenchmarkMetrics:
    cfg = bs.BenchConfig(base_url=base_url, max_concurrency=concurrency, ignore_eos=True,
                         extra_body={"temperature": 0.0, **extra_body}, progress=False)
    result = asyncio.run(bs.run_benchmark(cfg, requests, warmups))
    if result.metrics.failed:
        errors = sorted({r.error for r in result.results if not r.success})
        raise RuntimeError(f"{result.metrics.failed} requests failed: {errors[:3]}")
    if any(r.output_tokens != req.output_len for r, req in zip(result.results, requests)):
        raise RuntimeError("a request ended before --output-len tokens; the runs would not be comparable")
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else Path("bench_results") / f"structured_overhead-{stamp}.json"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "treadle.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *args.serve_arg]
    constrained = {"structured_outputs": {"json": SCHEMA}}
    rng = np.random.default_rng(args.seed)
    levels: dict[int, dict] = {}
    console.print(f"starting: {' '.join(cmd)}")
    with server_process(cmd, base_url + "/health", out.with_suffix(".treadle.log"), args.startup_timeout):
        import httpx

        async def sized(n: int) -> list[bs.BenchRequest]:
            async with httpx.AsyncClient(timeout=60) as client:
                model = await bs.first_model(client, base_url, None)
                codec = bs.server_codec(client, base_url, model, None)
                reqs = [await bs.sized_prompt(args.prompt_len, rng, codec) for _ in range(n)]
            for r in reqs:
                r.output_len = args.output_len
            return reqs

        def prompts(n: int) -> list[bs.BenchRequest]:  # fresh prompts for every run: no prefix-cache help
            return asyncio.run(sized(n))

        t0 = time.perf_counter()
        run(base_url, prompts(1), 1, constrained)
        console.print(f"grammar warm-up request: {time.perf_counter() - t0:.1f} s")
        for c in args.concurrency:
            n = args.requests_at_1 if c == 1 else c
            rates: dict[str, list[float]] = {"free": [], "json_schema": []}
            for rep in range(args.repeats):
                for mode, body in (("free", {}), ("json_schema", constrained)):
                    m = run(base_url, prompts(n), c, body)
                    rates[mode].append(m.output_throughput)
                    console.print(f"concurrency {c:3d} {mode:11s} run {rep + 1}: {m.output_throughput:8.1f} tok/s "
                                  f"(median TPOT {m.tpot.median_ms:.1f} ms)")
            free, constr = statistics.median(rates["free"]), statistics.median(rates["json_schema"])
            levels[c] = {"requests": n, "free_tok_s": free, "json_schema_tok_s": constr,
                         "overhead_pct": 100.0 * (free - constr) / free, "runs": rates}

    table = Table(title=f"structured-output overhead ({args.output_len} tokens per request, medians of "
                        f"{args.repeats} runs)")
    for col in ("concurrency", "free tok/s", "json_schema tok/s", "overhead"):
        table.add_column(col, justify="right")
    for c, lv in levels.items():
        table.add_row(str(c), f"{lv['free_tok_s']:.1f}", f"{lv['json_schema_tok_s']:.1f}", f"{lv['overhead_pct']:.1f}%")
    console.print(table)
    target = None
    if 16 in levels:
        met = levels[16]["overhead_pct"] < TARGET_AT_16
        target = {"overhead_pct_at_16": levels[16]["overhead_pct"], "target_pct": TARGET_AT_16, "met": met}
        console.print(f"target: < {TARGET_AT_16:.0f}% at 16 -> {levels[16]['overhead_pct']:.1f}% "
                      f"{'MET' if met else 'MISSED'}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    report = {
        "date": stamp,
        "commit": commit,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args),
        "schema": SCHEMA,
        "levels": levels,
        "target": target,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
