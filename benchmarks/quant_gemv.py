"""Weight-only quantized matmul vs bf16 torch.matmul on Llama-3.1-8B projection shapes (issue 5).

For every bit width and M (tokens per step) it times `quant_matmul` and bf16 `torch.matmul` in the same run
(CUDA events via `triton.testing.do_bench`: warm-up, L2 flushed before every call, median), checks the output
against the fp32 dequantize-then-matmul reference, and reports the round-to-nearest quantization error of the
weights. Targets at M = 1 (summed over the four projections of a layer): >= 3.5x at 4 bits, >= 4.5x at 3 bits.

`--sweep` times every candidate tiling per case instead of the default choice, to tune `default_config`.
Compiling dozens of unrolled kernels one by one takes minutes, so `--jobs` compiles them first in parallel
worker processes that fill Triton's on-disk cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
import triton.testing
from rich.console import Console
from rich.table import Table

from treadle.kernels.quant_matmul import QuantMatmulConfig, default_config, quant_matmul, quant_matmul_reference
from treadle.kernels.quantize import QuantizedWeight, quantization_error, quantize_rtn

# (name, in_features K, out_features N): q/k/v and gate/up fused as the engine runs them.
LLAMA_8B = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
TARGETS = {4: 3.5, 3: 4.5}


@dataclass
class Result:
    shape: str
    k: int
    n: int
    bits: int
    m: int
    config: dict
    ms: float
    bf16_ms: float
    speedup: float
    gbps: float
    out_rel_err: float
    tried: list  # [config, ms] for every candidate of a --sweep


def candidates(m: int, n: int, qw: QuantizedWeight, sms: int) -> list[QuantMatmulConfig]:
    """Tilings --sweep tries: CUDA-core GEMV shapes for small M, tensor-core tiles for all M."""
    base = default_config(m, n, qw, sms)
    out = []
    if m <= 8:
        bm = triton.next_power_of_2(m)
        for (bn, warps), stages, waves in itertools.product(
            ((512, 1), (512, 2), (1024, 2), (1024, 4), (2048, 4), (2048, 8)), (2, 3, 4), (1, 2, 4)
        ):
            out.append(_with_split(QuantMatmulConfig(False, bm, bn, 1, 1, warps, stages), m, n, qw, sms, waves))
    bm = max(16, min(64, triton.next_power_of_2(m)))
    for bn, warps, stages, waves in itertools.product((64, 128, 256), (4, 8), (2, 3, 4), (1, 2)):
        cfg = QuantMatmulConfig(True, bm, bn, qw.group_size // 32, 1, warps, stages)
        out.append(_with_split(cfg, m, n, qw, sms, waves))
    return [base] + [c for c in dict.fromkeys(out) if c != base]


def _with_split(cfg: QuantMatmulConfig, m: int, n: int, qw: QuantizedWeight, sms: int, waves: int) -> QuantMatmulConfig:
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    chunks = qw.padded_in_features // 32
    split = max(1, min(triton.cdiv(waves * sms, tiles), chunks // (2 * cfg.chunks)))
    return QuantMatmulConfig(cfg.dot, cfg.block_m, cfg.block_n, cfg.chunks, split, cfg.num_warps, cfg.num_stages)


def _compile_job(job: tuple[int, int, int, int, int, list[QuantMatmulConfig]]) -> int:
    """Worker: run each config once on data of the real shapes, which compiles it into Triton's disk cache."""
    k, n, bits, group, m, configs = job
    qw = quantize_rtn(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, bits, group)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for cfg in configs:
        quant_matmul(x, qw, config=cfg)
    torch.cuda.synchronize()
    return len(configs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in LLAMA_8B], choices=[s[0] for s in LLAMA_8B])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="time every candidate tiling, report the best")
    p.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="parallel compile workers")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--out", type=Path, default=Path("bench_results/quant_gemv.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quant_gemv needs a CUDA GPU")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    shapes = [s for s in LLAMA_8B if s[0] in args.shapes]
    weights = {name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for name, k, n in shapes}

    quants, errors = {}, []
    for (name, k, n), bits in itertools.product(shapes, args.bits):
        qw = quantize_rtn(weights[name], bits, args.group_size)
        quants[name, bits] = qw
        errors.append({"shape": name, "bits": bits, **asdict(quantization_error(weights[name], qw))})

    plan = {}
    for (name, k, n), bits, m in itertools.product(shapes, args.bits, args.m):
        qw = quants[name, bits]
        plan[name, bits, m] = candidates(m, n, qw, sms) if args.sweep else [default_config(m, n, qw, sms)]
    if args.jobs > 1:
        jobs = [(k, n, bits, args.group_size, m, plan[name, bits, m]) for (name, k, n), bits, m in
                itertools.product(shapes, args.bits, args.m)]
        with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            compiled = sum(pool.map(_compile_job, jobs))
        print(f"compiled {compiled} kernels in {args.jobs} workers")

    results = []
    for (name, k, n), m in itertools.product(shapes, args.m):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w_t = weights[name].t()
        bf16_ms = triton.testing.do_bench(lambda: torch.matmul(x, w_t), args.warmup, args.rep, return_mode="median")
        for bits in args.bits:
            qw = quants[name, bits]
            ref = quant_matmul_reference(x, qw).float()
            best, tried = None, []
            for cfg in plan[name, bits, m]:
                out = quant_matmul(x, qw, config=cfg).float()
                err = float((out - ref).norm() / ref.norm())
                ms = triton.testing.do_bench(lambda: quant_matmul(x, qw, config=cfg), args.warmup, args.rep,
                                             return_mode="median")
                tried.append([asdict(cfg), ms])
                if best is None or ms < best[0]:
                    best = (ms, cfg, err)
            ms, cfg, err = best
            print(f"{name} bits={bits} m={m}: {ms * 1e3:.1f} us (bf16 {bf16_ms * 1e3:.1f} us) {cfg}", flush=True)
            nbytes = sum(t.numel() * t.element_size() for t in (qw.packed, qw.scales, qw.mins, x)) + m * n * 2
            results.append(
                Result(name, k, n, bits, m, asdict(cfg), ms, bf16_ms, bf16_ms / ms, nbytes / ms / 1e6, err,
                       tried if args.sweep else [])
            )

    console = Console(width=160)
    table = Table(title=f"quantized GEMV vs bf16 torch.matmul, {torch.cuda.get_device_name(dev)}, group {args.group_size}")
    for col in ("shape", "bits", "M", "ours us", "bf16 us", "speedup", "GB/s", "rel err", "config"):
        table.add_column(col)
    for r in results:
        c = r.config
        tiling = f"{'dot' if c['dot'] else 'gemv'} {c['block_m']}x{c['block_n']} c{c['chunks']} s{c['split_k']} w{c['num_warps']}"
        table.add_row(r.shape, str(r.bits), str(r.m), f"{r.ms * 1e3:.1f}", f"{r.bf16_ms * 1e3:.1f}",
                      f"{r.speedup:.2f}x", f"{r.gbps:.0f}", f"{r.out_rel_err:.1e}", tiling)
    console.print(table)

    summary = Table(title="per layer (sum over shapes)")
    for col in ("bits", "M", "ours us", "bf16 us", "speedup", "target", "weight rel err"):
        summary.add_column(col)
    layer = []
    for bits, m in itertools.product(args.bits, args.m):
        rows = [r for r in results if r.bits == bits and r.m == m]
        ours, base = sum(r.ms for r in rows), sum(r.bf16_ms for r in rows)
        err = max(e["relative"] for e in errors if e["bits"] == bits)
        target = TARGETS.get(bits) if m == 1 else None
        layer.append({"bits": bits, "m": m, "ms": ours, "bf16_ms": base, "speedup": base / ours, "target": target,
                      "weight_rel_err": err})
        summary.add_row(str(bits), str(m), f"{ours * 1e3:.1f}", f"{base * 1e3:.1f}", f"{base / ours:.2f}x",
                        f">= {target}x" if target else "", f"{err:.4f}")
    console.print(summary)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "quant_gemv",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "group_size": args.group_size,
        "sweep": args.sweep,
        "results": [asdict(r) for r in results],
        "per_layer": layer,
        "weight_error": errors,
    }, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
