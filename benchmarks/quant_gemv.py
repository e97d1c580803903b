"""Weight-only quantized matmul vs bf16 torch.matmul on Llama-3.1-8B projection shapes (issue 5).

For every bit width and M (tokens per step) it times `quant_matmul` and bf16 `torch.matmul` in the same run,
checks the output against the fp32 dequantize-then-matmul reference, and reports the round-to-nearest
quantization error of the weights. Targets at M = 1 (summed over the four projections of a layer): >= 3.5x at
4 bits, >= 4.5x at 3 bits.

Timing: one CUDA graph holds back-to-back calls on R copies of the weight, R chosen so that the copies span
at least 4x the L2 cache; every call therefore reads its weight from DRAM (the L2 flush of the FlashInfer and
Triton protocols, without the flush kernel). The graph is warmed up, replayed --replays times between CUDA
events, and the median replay divided by R is the time of one call. Graphs are how decode runs, and they keep
Python's launch overhead (tens of microseconds, more than these kernels take) out of the numbers.

Every case runs in each weight layout of `--layouts` (QuantizedWeight.block_n: 0 is the flat [K-rows, N] layout,
8 or 16 the row-blocked decode layout with that many columns per block), so old and new layouts are compared in
the same run. Each case times `default_config` and, where that picks the CUDA tensor-core kernel (quant_mma),
also the Triton-only default (the "triton" column), so old and new kernels are compared in the same run too;
`--sweep` adds the CUDA kernel's launch shapes and Triton tilings (`candidates`) and reports the best, which is
what `default_config` is tuned from; `--sweep overlap` the previous launch shape of the CUDA kernel in the ways
of overlapping one GEMV with the next (OVERLAP_VARIANTS: programmatic dependent launch with the weights loaded
before or after the wait, triggers, blocks per SM), the previous shape's load-only diagnostic, and plain reads
of the same packed words (`quant_mma.stream_read`), the in-run ceiling of each shape, summed per layer at the
end; `--sweep stream` wider blocks of the CUDA kernel (full and load-only) and those plain reads. Where
default_config takes the CUDA kernel, the "previous" column times the launch shape it took before programmatic
dependent launch (`previous_mma`). Compiling the unrolled kernels one by one takes minutes, so `--jobs` worker
processes compile them first into Triton's and quant_mma's on-disk caches.

`--baseline-source` names an older quant_mma.cu: the overlap and layer variants then also time the previous
default launch built from it ("base"), so an old and a new kernel are compared in turns in one process.

`--layer` also times whole layers as decode runs them: qkv, o, gate_up, down back to back in one graph (over
copies of the layer spanning 4x the L2), so each GEMV's start meets the previous one's tail, in each of
LAYER_VARIANTS (with and without a small kernel between the GEMVs, and plain reads), and bf16 torch.matmul.
Graphs of one case take turns being timed (`time_graphs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
import triton.language as tl
from rich.console import Console
from rich.table import Table
from treadle.kernels.quant_matmul import (
    QuantMatmulConfig,
    default_config,
    quant_matmul,
    quant_matmul_reference,
    with_split_k,
)
from treadle.kernels.quant_mma import MmaConfig, available, shape_supported, stream_read
from treadle.kernels.quantize import QuantizedWeight, quantization_error, quantize_rtn

# (name, in_features K, out_features N): q/k/v and gate/up fused as the engine runs them.
LLAMA_8B = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
TARGETS = {4: 3.5, 3: 4.5}
SPAN_BYTES = 4 * 50 * 2**20  # what the rotating weight copies cover: 4x the H100's 50 MB L2


@dataclass
class Result:
    shape: str
    k: int
    n: int
    bits: int
    m: int
    block_n: int  # weight layout (QuantizedWeight.block_n)
    default_us: float
    triton_us: float  # default_config without the CUDA tensor-core kernel (the Triton kernels alone)
    previous_us: float | None  # the CUDA kernel's launch shape before PDL, where it is taken
    best_us: float
    best_config: dict
    bf16_us: float
    speedup: float  # bf16 / best
    gbps: float  # bytes of weight, scales, x and out over best time
    out_rel_err: float  # best config vs the fp32 reference
    tried: list  # [config, us] for every candidate
    reads: list  # --sweep stream / overlap: plain reads of the packed words (stream_probes), us and GB/s
    overlap: dict  # --sweep overlap: us of each of OVERLAP_VARIANTS


# GEMV tilings on the row-blocked layout: (columns per program, chunks per step, warps, steps loaded ahead),
# portable decode; the first is also timed with the opt-in packed fp16 decode.
BLOCKED_TILES = ((16, 64, 4, 1), (16, 64, 4, 2), (16, 32, 4, 1), (16, 128, 8, 1), (32, 32, 4, 1), (32, 64, 8, 1))


# Launch shapes of the CUDA tensor-core kernel (quant_mma): warps per block, steps in flight, blocks per SM.
MMA_TILES = tuple(MmaConfig(w, st, mb) for w in (4, 8) for st in (1, 2) for mb in (1, 2))


# Launch shapes of the CUDA kernel that --sweep stream adds: more warps per block (one block per SM, registers
# capped at 128) and 8 warps capped at 128 registers (two blocks per SM).
WIDE = (MmaConfig(16), MmaConfig(12), MmaConfig(8, 1, 2))


def stream_probes(n: int, sms: int, warps: int) -> list[tuple[str, int, int, bool]]:
    """Plain reads of the packed weight's bytes (quant_mma.stream_read), the in-run ceiling: (name, blocks,
    threads, grid_stride) as the kernel's grid (a block per 32-column tile, its bytes), persistent contiguous
    shares, and the whole grid sweeping the buffer together."""
    return [("tile blocks", -(-n // 32), 32 * warps, False), ("2/SM contiguous", 2 * sms, 512, False),
            ("4/SM contiguous", 4 * sms, 256, False), ("2/SM grid-stride", 2 * sms, 512, True)]


def previous_mma(m: int, n: int, sms: int, k: int, bits: int) -> MmaConfig:
    """The launch shape mma_config chose from commit fbdcf12 (16 warps for down) until programmatic dependent
    launch: the baseline that the overlap, load-only and wider variants are measured against."""
    blocks = -(-n // 32)
    if blocks <= sms and k >= 8192 and 0 < bits <= 4:
        return MmaConfig(16)
    many = blocks >= 4 * sms
    return MmaConfig(4 if many or (m > 8 and blocks >= sms) else 8, 1, 2 if many else 1)


# Ways of overlapping one GEMV with the next, on the previous launch shape: "pre" loads each warp's first weights
# before griddepcontrol.wait, x after it, and lets the next grid launch once past the wait (pdl 1); "solo" takes
# 16-warp blocks (all of an SM's registers) where the grid has at most one block per SM (up to M = 8), so that
# blocks launched early cannot double up on the SMs the previous grid frees first; "start" lets the next grid
# launch at each block's start (pdl 3: three grids in flight); "default" is default_config; "base ..." is the
# same launch built from --baseline-source, an older quant_mma.cu, so that old and new kernels take turns in the
# same graphs' timing. (Waiting before any load, and the trigger after the main loop, were measured before and
# lost.)
OVERLAP_VARIANTS = ("previous", "pre solo", "pre solo start", "default")
BASELINE_VARIANTS = ("base pre solo",)


def overlap_variants(baseline: str) -> tuple[str, ...]:
    return OVERLAP_VARIANTS + (BASELINE_VARIANTS if baseline else ())


def overlap_config(variant: str, m: int, qw: QuantizedWeight, sms: int, baseline: str = "") -> QuantMatmulConfig:
    """One of overlap_variants(baseline) for x [m, qw.in_features] @ qw on the CUDA kernel."""
    if variant.startswith("base "):
        cfg = overlap_config(variant.removeprefix("base "), m, qw, sms)
        return dataclasses.replace(cfg, mma=dataclasses.replace(cfg.mma, source=baseline))
    if variant == "default":
        return default_config(m, qw.out_features, qw, sms, True)
    mma = previous_mma(m, qw.out_features, sms, qw.in_features, qw.bits)
    if "solo" in variant and -(-qw.out_features // 32) <= sms and (m <= 8 or mma.warps == 16):
        mma = MmaConfig(16)
    if variant != "previous":
        mma = dataclasses.replace(mma, pdl=3 if "start" in variant else 1, preload=True)
    return QuantMatmulConfig(False, m, 32, 4, 1, mma=mma)


def mma_label(c: MmaConfig) -> str:
    return (f"{'baseline ' if c.source else ''}{'load-only ' if c.load_only else ''}w{c.warps} st{c.stages} "
            f"mb{c.min_blocks} pdl {c.pdl}{' pre' if c.preload else ''}")


def candidates(m: int, n: int, qw: QuantizedWeight, sms: int, sweep: str,
               baseline: str = "") -> list[QuantMatmulConfig]:
    """default_config first, then default_config without the CUDA tensor-core kernel (Triton alone), then the
    previous launch shape of the CUDA kernel where it is taken; with `sweep` "mma" the kernel's launch shapes,
    "overlap" overlap_variants(baseline) and the previous shape's load-only diagnostic, "all" also (row-blocked
    layouts only: the flat layout's tilings were swept before) Triton GEMV tilings for small M and tensor-core
    tilings for M >= 4."""
    mma = available() and shape_supported(m, qw)
    base = default_config(m, n, qw, sms, mma)
    out = [base, default_config(m, n, qw, sms)]
    prev = previous_mma(m, n, sms, qw.in_features, qw.bits)
    if base.mma is not None:
        out.append(QuantMatmulConfig(False, m, 32, 4, 1, mma=prev))
    if sweep == "overlap" and base.mma is not None:
        out += [overlap_config(v, m, qw, sms, baseline) for v in overlap_variants(baseline)]
        out.append(QuantMatmulConfig(False, m, 32, 4, 1, mma=dataclasses.replace(prev, load_only=True)))
        return list(dict.fromkeys(out))
    if sweep == "stream" and mma:
        shapes = [dataclasses.replace(prev, load_only=True)]
        for c in WIDE:
            shapes += [c, dataclasses.replace(c, load_only=True)]
        out += [QuantMatmulConfig(False, m, 32, 4, 1, mma=c) for c in shapes]
        return list(dict.fromkeys(out))
    if sweep != "none" and mma:
        out += [QuantMatmulConfig(False, m, 32, 4, 1, mma=c) for c in MMA_TILES]
    if sweep != "all" or not qw.block_n:
        return list(dict.fromkeys(out))
    tiles = []
    if m <= 4:
        bm = triton.next_power_of_2(m)
        tiles += [QuantMatmulConfig(False, bm, bn, c, 1, w, 1, pf) for bn, c, w, pf in BLOCKED_TILES]
        tiles.append(dataclasses.replace(tiles[0], f16x2=True))
    if m >= 4:
        bm = max(16, min(64, triton.next_power_of_2(m)))
        tiles += [QuantMatmulConfig(True, bm, bn, qw.group_size // 32, 1, w, 3) for bn, w in
                  ((64, 4), (128, 4), (128, 8))]
    out += [with_split_k(c, m, n, qw, waves * sms) for c in tiles for waves in (1, 2, 4, 8)]
    return list(dict.fromkeys(out))


def capture(calls: list[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """A warmed-up CUDA graph holding all `calls` back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    return graph


def time_graphs(graphs: list[tuple[torch.cuda.CUDAGraph, int]], replays: int, rounds: int = 3) -> list[float]:
    """Median time of one call for each (graph, calls in it), from `rounds` x `replays` replays, the graphs
    taking turns round by round, so that a drift of the GPU's clocks or memory state over the run does not
    favour whichever is timed last (one pass after another measured identical configs ~10% apart)."""
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for (graph, calls), out in zip(graphs, times, strict=True):
            for _ in range(replays):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) * 1e3 / calls)
    return [statistics.median(t) for t in times]


def graph_time_us(calls: list[Callable[[], object]], replays: int) -> float:
    """Median time of one call, from replays of a CUDA graph holding all `calls` back to back."""
    return time_graphs([(capture(calls), len(calls))], replays)[0]


def copies(nbytes: int) -> int:
    return max(2, min(64, -(-SPAN_BYTES // nbytes)))


def _clone(qw: QuantizedWeight) -> QuantizedWeight:
    return dataclasses.replace(qw, packed=qw.packed.clone(), scales=qw.scales.clone(), mins=qw.mins.clone())


def _nbytes(qw: QuantizedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (qw.packed, qw.scales, qw.mins))


def _compile_job(job: tuple[int, int, int, int, int, int, list[QuantMatmulConfig]]) -> int:
    """Worker: run each config once on data of the real shapes, which compiles it into Triton's disk cache."""
    k, n, bits, group, block_n, m, configs = job
    qw = quantize_rtn(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, bits, group, block_n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for cfg in configs:
        quant_matmul(x, qw, config=cfg)
    torch.cuda.synchronize()
    return len(configs)


# Whole-layer variants: OVERLAP_VARIANTS; "+k": a small elementwise torch kernel after each GEMV, as decode has
# norms, RoPE and attention between them (those times include the four small kernels); "+p": the same work in a
# small Triton kernel that takes part in PDL (`bump`), what decode would see if its small kernels did; "read":
# plain reads of each projection's packed words (quant_mma.stream_read, 4 blocks of 256 threads per SM), back
# to back, the in-run ceiling of separate launches.
LAYER_VARIANTS = (*OVERLAP_VARIANTS, "previous +k", "pre solo +k", "pre solo start +k", "previous +p", "pre solo +p",
                  "pre solo start +p", "read")
BASELINE_LAYER_VARIANTS = ("base pre solo", "base pre solo +k", "base pre solo +p")


def layer_variants(baseline: str) -> tuple[str, ...]:
    return LAYER_VARIANTS + (BASELINE_LAYER_VARIANTS if baseline else ())


@triton.jit
def _bump(p, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The small kernel between GEMVs: p += 1. With PDL it lets the next kernel launch at once and waits for the
    previous one before touching p, as decode's norms and RoPE would if they took part in PDL."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(p + offs, tl.load(p + offs, mask=mask) + 1.0, mask=mask)


def bump(t: torch.Tensor, pdl: bool) -> None:
    """`_bump` on a contiguous tensor, launched with programmatic stream serialization when `pdl`."""
    _bump[(triton.cdiv(t.numel(), 1024),)](t, t.numel(), BLOCK=1024, PDL=pdl, launch_pdl=pdl)


def layer_sequences(shapes: list[tuple[str, int, int]], args: argparse.Namespace, sms: int) -> list[dict]:
    """us per layer with the projections back to back in one graph (copies of the layer spanning 4x the L2), for
    --layer-m on the first row-blocked layout of --layouts: layer_variants and bf16 torch.matmul. Each call
    reads its own x (the kernels' order, not their data, chains them)."""
    out = []
    lb = next((b for b in args.layouts if b), 16)
    weights = [(k, n, torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _, k, n in shapes]
    reps = copies(sum(w.numel() * 2 for _, _, w in weights))
    bf16_layers = [[w.t() if r == 0 else w.clone().t() for _, _, w in weights] for r in range(reps)]
    for m in args.layer_m:
        xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k, _, _ in weights}
        scratch = torch.zeros(m, 4096, device="cuda", dtype=torch.bfloat16)
        bf16 = time_graphs([(capture([lambda w=w, x=xs[w.shape[0]]: torch.matmul(x, w) for layer in bf16_layers
                                      for w in layer]), len(bf16_layers))], args.replays)[0]
        for bits in args.bits:
            layer = [quantize_rtn(w, bits, args.group_size, lb) for _, _, w in weights]
            layers = [layer] + [[_clone(q) for q in layer] for _ in range(copies(sum(map(_nbytes, layer))) - 1)]
            row = {"bits": bits, "block_n": lb, "m": m, "bf16": bf16}
            graphs = []
            for name in layer_variants(args.baseline_source):
                calls = []
                for lay in layers:
                    for q in lay:
                        if name == "read":
                            calls.append(lambda q=q: stream_read(q.packed, 4 * sms, 256))
                            continue
                        cfg = overlap_config(name.removesuffix(" +k").removesuffix(" +p"), m, q, sms,
                                             args.baseline_source)
                        calls.append(lambda q=q, c=cfg, x=xs[q.in_features]: quant_matmul(x, q, config=c))
                        if name.endswith("+k"):
                            calls.append(lambda s=scratch: s.add_(1.0))
                        elif name.endswith("+p"):
                            calls.append(lambda s=scratch: bump(s, True))
                graphs.append((capture(calls), len(layers)))
            times = time_graphs(graphs, args.replays)
            row |= dict(zip(layer_variants(args.baseline_source), times, strict=True))
            del graphs
            print(f"layer bits={bits} m={m}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                           if isinstance(v, float)), flush=True)
            out.append(row)
            del layers
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in LLAMA_8B], choices=[s[0] for s in LLAMA_8B])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--layouts", type=int, nargs="+", default=[0, 8], help="QuantizedWeight.block_n values")
    p.add_argument("--replays", type=int, default=20, help="graph replays per measurement (median)")
    p.add_argument("--sweep", choices=("none", "mma", "overlap", "stream", "all"), default="all",
                   help="none: default_config (with and without the CUDA kernel); mma: also the CUDA kernel's "
                        "launch shapes; overlap: PDL and the load-only diagnostic; stream: wider blocks, full and "
                        "load-only, and plain reads of the same bytes; all: also Triton tilings")
    p.add_argument("--layer", action="store_true", help="also time whole layers back to back")
    p.add_argument("--layer-m", type=int, nargs="+", default=[1, 4], help="M of the whole layers")
    p.add_argument("--baseline-source", type=Path, help="an older quant_mma.cu: --sweep overlap and --layer also "
                   "time the previous default launch built from it (the 'base' variants), in turns with the rest")
    p.add_argument("--no-sweep", dest="sweep", action="store_const", const="none", help="--sweep none")
    p.add_argument("--jobs", type=int, default=min(15, os.cpu_count() or 1), help="parallel compile workers")
    p.add_argument("--out", type=Path, default=Path("bench_results/quant_gemv.json"))
    args = p.parse_args()
    args.baseline_source = str(args.baseline_source.resolve()) if args.baseline_source else ""
    variants = overlap_variants(args.baseline_source)
    if not torch.cuda.is_available():
        raise SystemExit("quant_gemv needs a CUDA GPU")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    shapes = [s for s in LLAMA_8B if s[0] in args.shapes]

    plan = {}
    cases = list(itertools.product(shapes, args.bits, args.layouts, args.m))
    for (name, k, n), bits, lb, m in cases:
        groups = -(-k // args.group_size)
        probe = QuantizedWeight(torch.empty(0), torch.empty(groups, 0) if not lb else torch.empty(0, groups * lb),
                                torch.empty(0), bits, args.group_size, k, n, lb)
        plan[name, bits, lb, m] = candidates(m, n, probe, sms, args.sweep, args.baseline_source)
    if args.jobs > 1:
        jobs = [(k, n, bits, args.group_size, lb, m, plan[name, bits, lb, m]) for (name, k, n), bits, lb, m in cases]
        with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            print(f"compiled {sum(pool.map(_compile_job, jobs))} kernel variants in {args.jobs} workers", flush=True)

    results, errors = [], []
    for name, k, n in shapes:
        weight = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        w_ts = [weight.t()] + [weight.clone().t() for _ in range(copies(weight.numel() * 2) - 1)]
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in args.m}
        bf16 = {m: graph_time_us([lambda w=w, x=x: torch.matmul(x, w) for w in w_ts], args.replays)
                for m, x in xs.items()}  # once per shape and M: every layout is compared with the same baseline
        for bits, lb in itertools.product(args.bits, args.layouts):
            qw = quantize_rtn(weight, bits, args.group_size, lb)
            if lb == args.layouts[0]:
                errors.append({"shape": name, "bits": bits, **asdict(quantization_error(weight, qw))})
            qws = [qw] + [_clone(qw) for _ in range(copies(_nbytes(qw)) - 1)]
            for m in args.m:
                x, bf16_us = xs[m], bf16[m]
                ref = quant_matmul_reference(x, qw).float()
                errs, graphs = [], []
                for cfg in plan[name, bits, lb, m]:
                    errs.append(float((quant_matmul(x, qw, config=cfg).float() - ref).norm() / ref.norm()))
                    graphs.append((capture([lambda q=q, c=cfg, x=x: quant_matmul(x, q, config=c) for q in qws]),
                                   len(qws)))
                stream = args.sweep in ("stream", "overlap") and m == args.m[0]  # the reads do not depend on M
                prev = previous_mma(m, n, sms, k, bits)
                probes = stream_probes(n, sms, prev.warps) if stream else []
                for _, blocks, threads, gs in probes:
                    graphs.append((capture([lambda q=q, b=blocks, th=threads, gs=gs: stream_read(q.packed, b, th, gs)
                                            for q in qws]), len(qws)))
                times = time_graphs(graphs, args.replays)
                tried = list(zip(plan[name, bits, lb, m], times, errs, strict=False))
                reads = [{"probe": p, "blocks": b, "threads": th, "us": t, "gbps": qw.packed.nbytes / t / 1e3}
                         for (p, b, th, _), t in zip(probes, times[len(tried):], strict=True)]
                del graphs
                cfg, us, err = min(((c, t, e) for c, t, e in tried if not (c.mma and c.mma.load_only)),
                                   key=lambda t: t[1])
                nbytes = _nbytes(qw) + x.numel() * 2 + m * n * 2
                triton_us = next(t for c, t, _ in tried if c == default_config(m, n, qw, sms))
                previous_us = next((t for c, t, _ in tried if c.mma == prev), None)
                over = {}
                if args.sweep == "overlap" and tried[0][0].mma is not None:
                    by_config = {c: t for c, t, _ in tried}
                    over = {v: by_config[overlap_config(v, m, qw, sms, args.baseline_source)] for v in variants}
                results.append(Result(name, k, n, bits, m, lb, tried[0][1], triton_us, previous_us, us, asdict(cfg),
                                      bf16_us, bf16_us / us, nbytes / us / 1e3, err,
                                      [[asdict(c), t, e] for c, t, e in tried], reads, over))
                print(f"{name} bits={bits} layout={lb} m={m}: default {tried[0][1]:.1f} us, triton {triton_us:.1f} "
                      f"us, previous {previous_us or 0:.1f} us, best {us:.1f} us (bf16 {bf16_us:.1f} us) {cfg}",
                      flush=True)
                for c, t, e in tried:
                    if c.mma and args.sweep in ("overlap", "stream"):
                        print(f"    {mma_label(c.mma)}: {t:.2f} us, {nbytes / t / 1e3:.0f} GB/s, rel err {e:.1e}",
                              flush=True)
                for r in reads:
                    print(f"    read {r['probe']} ({r['blocks']} x {r['threads']}): {r['us']:.2f} us, "
                          f"{r['gbps']:.0f} GB/s of packed words", flush=True)
        del weight, w_ts

    console = Console(width=150)
    table = Table(title=f"quantized matmul vs bf16 torch.matmul, {torch.cuda.get_device_name(dev)}, "
                        f"group {args.group_size}, us per call")
    for col in ("shape", "bits", "layout", "M", "default", "triton", "previous", "best", "bf16", "speedup", "GB/s",
                "rel err", "best tiling"):
        table.add_column(col)
    for r in results:
        c = r.best_config
        tiling = (f"{'dot' if c['dot'] else 'gemv'} {c['block_m']}x{c['block_n']} c{c['chunks']} s{c['split_k']} "
                  f"w{c['num_warps']} " + (f"pf{c['prefetch']}" if c.get("prefetch") else f"st{c['num_stages']}")
                  + (" f16x2" if c.get("f16x2") and not c["dot"] else ""))
        if c.get("mma"):
            tiling = "cuda mma " + mma_label(MmaConfig(**c["mma"]))
        table.add_row(r.shape, str(r.bits), str(r.block_n), str(r.m), f"{r.default_us:.1f}", f"{r.triton_us:.1f}",
                      f"{r.previous_us:.1f}" if r.previous_us else "", f"{r.best_us:.1f}",
                      f"{r.bf16_us:.1f}", f"{r.speedup:.2f}x", f"{r.gbps:.0f}", f"{r.out_rel_err:.1e}", tiling)
    console.print(table)

    summary = Table(title="per layer: sum over the shapes (default tiling, and best tiling per shape)")
    for col in ("bits", "layout", "M", "default us", "triton us", "previous us", "best us", "bf16 us",
                "speedup (default)", "target", "weight rel err"):
        summary.add_column(col)
    layer, layer_over = [], []
    for bits, lb, m in itertools.product(args.bits, args.layouts, args.m):
        rows = [r for r in results if r.bits == bits and r.block_n == lb and r.m == m]
        default, best = sum(r.default_us for r in rows), sum(r.best_us for r in rows)
        triton_total = sum(r.triton_us for r in rows)
        previous = sum(r.previous_us or r.default_us for r in rows)
        base = sum(r.bf16_us for r in rows)
        err = max(e["relative"] for e in errors if e["bits"] == bits)
        target = TARGETS.get(bits) if m == 1 else None
        layer.append({"bits": bits, "block_n": lb, "m": m, "default_us": default, "triton_us": triton_total,
                      "previous_us": previous, "us": best, "bf16_us": base,
                      "speedup": base / default, "target": target, "weight_rel_err": err})
        summary.add_row(str(bits), str(lb), str(m), f"{default:.1f}", f"{triton_total:.1f}", f"{previous:.1f}",
                        f"{best:.1f}", f"{base:.1f}", f"{base / default:.2f}x", f">= {target}x" if target else "",
                        f"{err:.4f}")
    console.print(summary)

    if args.sweep == "overlap":
        over_table = Table(title="per layer, calls of one shape back to back, summed over the shapes: us (read: "
                                 "best plain read of each shape's packed words, M of the first --m only)")
        for col in ("bits", "layout", "M", *variants, "read", "bf16"):
            over_table.add_column(col)
        for bits, lb, m in itertools.product(args.bits, args.layouts, args.m):
            rows = [r for r in results if r.bits == bits and r.block_n == lb and r.m == m]
            sums = [sum(r.overlap[v] for r in rows) if rows and all(r.overlap for r in rows) else None
                    for v in variants]
            read = sum(min(x["us"] for x in r.reads) for r in rows) if rows and all(r.reads for r in rows) else None
            layer_over.append({"bits": bits, "block_n": lb, "m": m, **dict(zip(variants, sums, strict=True)),
                               "read": read, "bf16": sum(r.bf16_us for r in rows)})
            over_table.add_row(str(bits), str(lb), str(m), *(f"{t:.1f}" if t else "" for t in sums),
                         f"{read:.1f}" if read else "", f"{sum(r.bf16_us for r in rows):.1f}")
        console.print(over_table)

    sequences = []
    if args.layer:
        sequences = layer_sequences(shapes, args, sms)
        seq = Table(title="whole layers back to back (qkv, o, gate_up, down in one graph), us per layer")
        for col in ("bits", "layout", "M", *layer_variants(args.baseline_source), "bf16", "speedup (default)",
                    "target"):
            seq.add_column(col)
        for r in sequences:
            target = TARGETS.get(r["bits"]) if r["m"] == 1 else None
            seq.add_row(str(r["bits"]), str(r["block_n"]), str(r["m"]),
                        *(f"{r[v]:.1f}" for v in layer_variants(args.baseline_source)),
                        f"{r['bf16']:.1f}", f"{r['bf16'] / r['default']:.2f}x", f">= {target}x" if target else "")
        console.print(seq)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "quant_gemv",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "group_size": args.group_size,
        "results": [asdict(r) for r in results],
        "per_layer": layer,
        "per_layer_overlap": layer_over,
        "layer_sequences": sequences,
        "weight_error": errors,
    }, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
