"""Each Triton kernel of kernels/ against its roofline on the GPU at Llama-3.1-8B shapes (bf16).

    python benchmarks/kernels_roofline.py [--out bench_results/kernels_roofline.json] [--sweep]

The roofline of a memory-bound kernel is the fewest bytes it must move (every input read once, every output
written once) over the copy bandwidth; of a compute-bound one (prefill attention), its FLOPs over the bf16 matrix
rate. Both ceilings are measured in the same run (a 2 GiB device-to-device copy counting read + write bytes; an
8192^3 bf16 matmul) and also quoted against the nominal 3.0 TB/s and 770 TFLOP/s of the H100 test machine.
Each time is device time from CUDA-graph replays (no Python launch overhead, which would swamp the decode-sized
cases): a graph of [L2 flush, kernel] x 20 minus a graph of [L2 flush] x 20, median of 7. Decode-sized rows
(batch 1-64) are latency-bound: their roofline fraction says how far launch and tail latency are from the bytes.
The decode GEMVs (kernels/gemv.py) are compared with cuBLAS (F.linear) on the same shapes. `--sweep` also times
the launch configurations of the plain GEMV on the Llama-3.2-1B and 3.1-8B projections at one row, and of
prefill attention, and prints the best per shape. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

from treadle.kernels.activation import silu_and_mul
from treadle.kernels.attention_decode import decode_num_splits, paged_decode_attention
from treadle.kernels.attention_prefill import paged_prefill_attention
from treadle.kernels.bitmask import apply_token_bitmask_
from treadle.kernels.gemv import gemv
from treadle.kernels.kv_append import kv_append
from treadle.kernels.norm import rmsnorm
from treadle.kernels.rope import rope_cos_sin_cache, rope_kv_append
from treadle.kernels.sampling import sample_tokens

NOMINAL_BYTES_PER_S = 3.0e12
NOMINAL_FLOPS = 770e12
HQ, HKV, D, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
ROWS = (1, 64, 4096)  # token rows for the elementwise kernels: decode batch 1 and 64, a prefill chunk
SAMPLE_BATCHES = (1, 64)
DECODE = ((1, 1024), (1, 8192), (1, 32768), (64, 1024), (64, 4096))  # (batch, context)
PREFILL = ((4096, 4096), (512, 4096))  # (new tokens, KV length)
GEMV_ROWS = (1, 16)
# (name, N, K) of the decode projections (gate_up: N = 2 x intermediate).
GEMV_SHAPES = {
    "llama-3.1-8b": (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                     ("lm_head", 128256, 4096)),
    "llama-3.2-1b": (("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
                     ("lm_head", 128256, 2048)),
}
SWEEP = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (3, 4)]
PREFILL_SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)]
BF16 = torch.bfloat16
DEV = "cuda"


def _replay_ms(graph: torch.cuda.CUDAGraph, trials: int = 7) -> float:
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_time_us(fn, reps: int = 20) -> float:
    """Device time of one call of `fn` after an L2 flush, from graph replays, with the flush's own time removed."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    both, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(reps):
            flush.zero_()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(reps):
            flush.zero_()
    _replay_ms(both, 2)  # the first replays upload the graphs
    _replay_ms(flush_only, 2)
    return max(1e-3, _replay_ms(both) - _replay_ms(flush_only)) * 1e3 / reps


def measured_peaks() -> tuple[float, float]:
    src = torch.randn(2**30 // 2, device=DEV, dtype=BF16)  # 1 GiB read + 1 GiB written
    dst = torch.empty_like(src)
    copy_us = device_time_us(lambda: dst.copy_(src), reps=5)
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    mm_us = device_time_us(lambda: a @ b, reps=5)
    return 2 * src.numel() * 2 / (copy_us * 1e-6), 2 * 8192**3 / (mm_us * 1e-6)


def paged_index(lengths: list[int], page_size: int = 16):
    """Shuffled pages, one run of slots per sequence; returns (indptr, indices) int32 on the device."""
    pages = torch.randperm(sum(-(-n // page_size) for n in lengths)).tolist()
    num_pages = len(pages)
    slots, indptr = [], [0]
    for n in lengths:
        own = [pages.pop() for _ in range(-(-n // page_size))]
        slots += [own[i // page_size] * page_size + i % page_size for i in range(n)]
        indptr.append(len(slots))
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=DEV)  # noqa: E731
    return as_t(indptr), as_t(slots), num_pages * page_size


def cases():
    """(op, shape text, fn, bytes moved, flops) for every kernel at decode and prefill sizes."""
    out = []
    for rows in ROWS:
        x, r = torch.randn(rows, HIDDEN, device=DEV, dtype=BF16), torch.randn(rows, HIDDEN, device=DEV, dtype=BF16)
        w = torch.randn(HIDDEN, device=DEV, dtype=BF16)
        out.append(("rmsnorm+residual", f"{rows}x{HIDDEN}", lambda x=x, r=r, w=w: rmsnorm(x, w, 1e-5, r),
                    (4 * rows * HIDDEN + HIDDEN) * 2, 0))
    cos_sin = rope_cos_sin_cache(1e6 ** -(torch.arange(0, D, 2, device=DEV) / D), 8192, DEV)
    for tokens in ROWS:
        qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, device=DEV, dtype=BF16)
        q = qkv[:, : HQ * D].view(tokens, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
        v = qkv[:, (HQ + HKV) * D :].view(tokens, HKV, D)
        pos = torch.randint(0, 8192, (tokens,), device=DEV, dtype=torch.int32)
        slots = torch.randperm(8 * tokens, device=DEV)[:tokens].to(torch.int32)
        kc = torch.zeros(8 * tokens, HKV, D, device=DEV, dtype=BF16)
        vc = torch.zeros_like(kc)
        rope_bytes = tokens * ((2 * HQ + 4 * HKV) * D * 2 + D * 4)
        out.append(("rope+kv_append", f"{tokens} tok {HQ}/{HKV}x{D}",
                    lambda a=(q, k, v, pos, cos_sin, slots, kc, vc): rope_kv_append(*a), rope_bytes, 0))
        out.append(("kv_append", f"{tokens} tok {HKV}x{D}", lambda a=(k, v, slots, kc, vc): kv_append(*a),
                    tokens * 4 * HKV * D * 2, 0))
        gu = torch.randn(tokens, 2 * INTER, device=DEV, dtype=BF16)
        out.append(("silu_and_mul", f"{tokens}x{INTER}", lambda gu=gu: silu_and_mul(gu), tokens * 3 * INTER * 2, 0))
    for batch in SAMPLE_BATCHES:
        logits = torch.randn(batch, VOCAB, device=DEV)
        mask = torch.randint(-(2**31), 2**31, (batch, -(-VOCAB // 32)), device=DEV, dtype=torch.int32)
        out.append(("bitmask_apply", f"{batch}x{VOCAB}", lambda lg=logits, m=mask: apply_token_bitmask_(lg, m),
                    batch * VOCAB * (4 + 2) + mask.numel() * 4, 0))  # read all logits, write ~half
        seeds = torch.arange(batch, device=DEV)
        for label, t, k, p in (("greedy", 0.0, 0, 1.0), ("top_p=0.9", 1.0, 0, 0.9), ("top_k=50,top_p=0.9", 1.0, 50, 0.9)):
            params = (torch.full((batch,), t, device=DEV), torch.full((batch,), k, device=DEV, dtype=torch.int32),
                      torch.full((batch,), p, device=DEV))
            out.append((f"sample {label}", f"{batch}x{VOCAB}",
                        lambda lg=logits, pr=params, s=seeds: sample_tokens(lg, *pr, s), batch * VOCAB * 4, 0))
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count if DEV == "cuda" else 4
    for batch, ctx in DECODE:
        indptr, indices, num_slots = paged_index([ctx] * batch)
        kc = torch.randn(num_slots, HKV, D, device=DEV, dtype=BF16)
        vc = torch.randn_like(kc)
        q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
        splits = decode_num_splits(batch, HKV, sms)
        out.append(("decode attention", f"B={batch} ctx={ctx} splits={splits}",
                    lambda a=(q, kc, vc, indptr, indices), s=splits: paged_decode_attention(*a, num_splits=s),
                    batch * ctx * (2 * HKV * D * 2 + 4) + 2 * batch * HQ * D * 2, 4 * batch * ctx * HQ * D))
    for rows in GEMV_ROWS:
        for proj, n, k in GEMV_SHAPES["llama-3.1-8b"]:
            x = torch.randn(rows, k, device=DEV, dtype=BF16)
            w = torch.randn(n, k, device=DEV, dtype=BF16) * k**-0.5
            nbytes = n * k * 2 + rows * (k + n) * 2
            out.append(("gemv", f"8B {proj} M={rows}", lambda x=x, w=w: gemv(x, w), nbytes, 0))
            out.append(("cuBLAS F.linear", f"8B {proj} M={rows}", lambda x=x, w=w: torch.nn.functional.linear(x, w),
                        nbytes, 0))
    for q_len, kv_len in PREFILL:
        indptr, indices, num_slots = paged_index([kv_len])
        kc = torch.randn(num_slots, HKV, D, device=DEV, dtype=BF16)
        vc = torch.randn_like(kc)
        q = torch.randn(q_len, HQ, D, device=DEV, dtype=BF16)
        qo = torch.tensor([0, q_len], dtype=torch.int32, device=DEV)
        cached = kv_len - q_len
        flops = 4 * HQ * D * sum(cached + i + 1 for i in range(q_len))  # QK^T and PV over the causal keys
        out.append(("prefill attention", f"q={q_len} kv={kv_len}",
                    lambda a=(q, kc, vc, qo, indptr, indices, q_len): paged_prefill_attention(*a),
                    (2 * q_len * HQ * D + 2 * kv_len * HKV * D) * 2, flops))
    return out


def gemv_sweep(peak_bw: float) -> list[dict]:
    """Every SWEEP configuration of the plain GEMV at one row on each projection; prints the best per shape."""
    results = []
    print("gemv sweep (M=1): shape | best (BLOCK_N, BLOCK_K, warps, stages) | us | % of copy peak | cuBLAS us")
    for model, shapes in GEMV_SHAPES.items():
        for proj, n, k in shapes:
            x = torch.randn(1, k, device=DEV, dtype=BF16)
            w = torch.randn(n, k, device=DEV, dtype=BF16) * k**-0.5
            nbytes = n * k * 2
            timed = []
            for cfg in SWEEP:
                try:
                    timed.append((device_time_us(lambda cfg=cfg: gemv(x, w, config=cfg)), cfg))
                except triton.runtime.errors.OutOfResources:
                    continue
            cublas = device_time_us(lambda: torch.nn.functional.linear(x, w))
            us, cfg = min(timed)
            results.append({"model": model, "proj": proj, "n": n, "k": k, "best": cfg, "us": us, "cublas_us": cublas,
                            "all": [{"config": c, "us": t} for t, c in timed]})
            print(f"{model} {proj} {n}x{k} | {cfg} | {us:.1f} | {100 * nbytes / (us * 1e-6) / peak_bw:.0f}% "
                  f"| {cublas:.1f}")
    return results


def prefill_sweep(peak_flops: float) -> list[dict]:
    """PREFILL_SWEEP configurations (BLOCK_M, BLOCK_N, warps, stages) of prefill attention at 8B heads."""
    results = []
    print("prefill sweep: shape | best (BLOCK_M, BLOCK_N, warps, stages) | us | % of matmul peak")
    for q_len, kv_len in PREFILL:
        indptr, indices, num_slots = paged_index([kv_len])
        kc = torch.randn(num_slots, HKV, D, device=DEV, dtype=BF16)
        vc = torch.randn_like(kc)
        q = torch.randn(q_len, HQ, D, device=DEV, dtype=BF16)
        qo = torch.tensor([0, q_len], dtype=torch.int32, device=DEV)
        flops = 4 * HQ * D * sum(kv_len - q_len + i + 1 for i in range(q_len))
        timed = []
        for bm, bn, warps, stages in PREFILL_SWEEP:
            fn = lambda bm=bm, bn=bn, w=warps, s=stages: paged_prefill_attention(  # noqa: E731
                q, kc, vc, qo, indptr, indices, q_len, block_m=bm, block_n=bn, num_warps=w, num_stages=s)
            try:
                timed.append((device_time_us(fn), (bm, bn, warps, stages)))
            except triton.runtime.errors.OutOfResources:
                continue
        us, cfg = min(timed)
        results.append({"op": "prefill", "q": q_len, "kv": kv_len, "best": cfg, "us": us,
                        "all": [{"config": c, "us": t} for t, c in timed]})
        print(f"q={q_len} kv={kv_len} | {cfg} | {us:.1f} | {100 * flops / (us * 1e-6) / peak_flops:.0f}%")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("bench_results", "kernels_roofline.json"))
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_roofline needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    peak_bw, peak_flops = measured_peaks()
    rows = []
    for op, shape, fn, nbytes, flops in cases():
        us = device_time_us(fn)
        row = {"op": op, "shape": shape, "us": us, "bytes": nbytes, "flops": flops,
               "gb_per_s": nbytes / (us * 1e-6) / 1e9, "tflop_per_s": flops / (us * 1e-6) / 1e12}
        compute_bound = op == "prefill attention"
        row["bound"] = "flops" if compute_bound else "bytes"
        achieved = row["tflop_per_s"] * 1e12 if compute_bound else row["gb_per_s"] * 1e9
        row["pct_of_measured_peak"] = 100 * achieved / (peak_flops if compute_bound else peak_bw)
        row["pct_of_nominal_peak"] = 100 * achieved / (NOMINAL_FLOPS if compute_bound else NOMINAL_BYTES_PER_S)
        rows.append(row)
    print(f"measured peaks: copy {peak_bw / 1e12:.2f} TB/s, bf16 matmul {peak_flops / 1e12:.0f} TFLOP/s")
    print("op | shape | us | achieved | % measured peak | % nominal")
    for r in rows:
        achieved = f"{r['tflop_per_s']:.0f} TFLOP/s" if r["bound"] == "flops" else f"{r['gb_per_s']:.0f} GB/s"
        print(f"{r['op']} | {r['shape']} | {r['us']:.1f} | {achieved} | {r['pct_of_measured_peak']:.0f}% "
              f"| {r['pct_of_nominal_peak']:.0f}%")
    sweep = gemv_sweep(peak_bw) + prefill_sweep(peak_flops) if args.sweep else []
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "measured_copy_bytes_per_s": peak_bw,
        "measured_bf16_flops": peak_flops,
        "command": "python benchmarks/kernels_roofline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "sweep": sweep}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
