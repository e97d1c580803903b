"""Each Triton kernel of kernels/ against its roofline on the GPU at Llama-3.1-8B shapes (bf16).

    python benchmarks/kernels_roofline.py [--out bench_results/kernels_roofline.json]

The roofline of a memory-bound kernel is the fewest bytes it must move (every input read once, every output
written once) over the copy bandwidth; of a compute-bound one (prefill attention), its FLOPs over the bf16 matrix
rate. Both ceilings are measured in the same run (a 2 GiB device-to-device copy counting read + write bytes; an
8192^3 bf16 matmul) and also quoted against the nominal 3.0 TB/s and 770 TFLOP/s of the H100 test machine.
Times are medians of triton.testing.do_bench, which flushes L2 before every call. Decode-sized rows (batch 1-64)
are latency-bound: their roofline fraction says how far launch and tail latency are from the bytes.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from treadle.kernels.activation import silu_and_mul
from treadle.kernels.attention_decode import decode_num_splits, paged_decode_attention
from treadle.kernels.attention_prefill import paged_prefill_attention
from treadle.kernels.bitmask import apply_token_bitmask_
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
BF16 = torch.bfloat16
DEV = "cuda"


def measured_peaks() -> tuple[float, float]:
    src = torch.randn(2**30 // 2, device=DEV, dtype=BF16)  # 1 GiB read + 1 GiB written
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    mm_ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * src.numel() * 2 / (copy_ms * 1e-3), 2 * 8192**3 / (mm_ms * 1e-3)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("bench_results", "kernels_roofline.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_roofline needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    peak_bw, peak_flops = measured_peaks()
    rows = []
    for op, shape, fn, nbytes, flops in cases():
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        row = {"op": op, "shape": shape, "us": ms * 1e3, "bytes": nbytes, "flops": flops,
               "gb_per_s": nbytes / (ms * 1e-3) / 1e9, "tflop_per_s": flops / (ms * 1e-3) / 1e12}
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
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
