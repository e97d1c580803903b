"""Decode-step latency on CUDA: the Triton kernel backend (CUDA graphs) vs a plain-torch CUDA graph, vs the floor.

    python benchmarks/decode_step.py [--shapes llama-3.2-1b llama-3.1-8b] [--batches 1 8 32 64] [--context 1024]

Both sides run the same random-weight bf16 model (engine.models) over the same paged KV cache, each sequence
holding `--context` cached tokens on shuffled pages. "ours" is kernels.cuda_graph_runner.CudaGraphDecoder:
`graph` is the replay alone (device time between CUDA events, back-to-back replays), `step` adds the host side
(metadata from Python lists, the async copy, logits clone). "torch graph" captures the model's own decode path
(index_copy_ KV write, gather, SDPA with a length mask, cuBLAS) in one CUDA graph. The floor is weight bytes +
KV bytes read once at 3.0 TB/s (the measured copy bandwidth of the H100 test machine). Logits of the two sides
are compared, so a fast wrong step cannot pass unnoticed. Prints a table, writes JSON.

`--profile` adds, per row, the device time of each kernel of our graph (torch.profiler over replays, summed by
kernel name): the sum against the replay time shows what launches and gaps cost, the largest entries where
the rest goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

import torch

from treadle.engine.config import ModelConfig
from treadle.engine.models.attention import AttentionMetadata
from treadle.engine.models.llama import LlamaForCausalLM
from treadle.kernels.cuda_graph_runner import CudaGraphDecoder

PEAK_BYTES_PER_S = 3.0e12
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": ModelConfig(architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                                tie_word_embeddings=True),
    "llama-3.1-8b": ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
                                tie_word_embeddings=False),
    # For checking the script itself on a CPU (Triton interpreter, no graphs): seconds, not a measurement.
    "tiny": ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True),
}  # fmt: skip
PAGE_SIZE = 16


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Weights drawn on the device (norm gains ~1, matrices at the usual 0.02 init): never time on zeros."""
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0.0, 0.02)
    return model.requires_grad_(False).eval()


def weight_bytes(model: LlamaForCausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cuda_time_ms(fn, iters: int, trials: int = 5) -> float:
    """Median over trials of the mean time of `iters` back-to-back calls, between CUDA events."""
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def kernel_breakdown(replay, iters: int = 10) -> list[dict]:
    """Per kernel name: launches and device microseconds per replay of `replay`, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            replay()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key, "launches": e.count / iters, "us": e.self_device_time_total / iters}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["us"])


def host_time_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def run_shape(name: str, batches: list[int], context: int, device: torch.device, iters: int,
              profile: bool = False) -> list[dict]:
    cfg = SHAPES[name]
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    torch.manual_seed(0)
    model = random_model(cfg, device, dtype)
    max_b = max(batches)
    pages_per_seq = -(-(context + 1) // PAGE_SIZE)
    num_slots = max_b * pages_per_seq * PAGE_SIZE
    shape = (num_slots, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
          for _ in range(cfg.num_layers)]
    rng = random.Random(0)
    pages = list(range(max_b * pages_per_seq))
    rng.shuffle(pages)
    seq_slots = []  # each sequence: `context` cached entries plus the new token's slot, on shuffled pages
    for i in range(max_b):
        own = pages[i * pages_per_seq : (i + 1) * pages_per_seq]
        seq_slots.append([own[j // PAGE_SIZE] * PAGE_SIZE + j % PAGE_SIZE for j in range(context + 1)])
    decoder = CudaGraphDecoder(model, kv, max_batch_size=max_b, max_model_len=context + 1, buckets=batches)
    wbytes = weight_bytes(model)
    kv_token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    rows = []
    for b in batches:
        tokens = [rng.randrange(cfg.vocab_size) for _ in range(b)]
        positions = [context] * b
        slots = seq_slots[:b]
        ours_logits = decoder.decode(tokens, positions, slots)

        # Plain-torch reference and baseline: the model's own decode path, captured in one CUDA graph.
        ids = torch.tensor(tokens, device=device)
        pos = torch.tensor(positions, device=device)
        attn = AttentionMetadata.build(slots, [], [], [s[-1] for s in slots], list(range(b)), device)

        def torch_step():
            return model.compute_logits(model(ids, pos, attn, kv))

        with torch.inference_mode():
            ref_logits = torch_step()
            err = float((ours_logits - ref_logits).norm() / ref_logits.norm())
            agree = float((ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
            row = {"shape": name, "batch": b, "context": context, "rel_err_vs_torch": err, "argmax_agree": agree}
            floor = (wbytes + b * (context + 1) * kv_token_bytes) / PEAK_BYTES_PER_S * 1e3
            row["floor_ms"] = floor
            row["weight_floor_ms"] = wbytes / PEAK_BYTES_PER_S * 1e3
            if on_cuda:
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    torch_step()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    torch_step()
                row["torch_graph_ms"] = cuda_time_ms(graph.replay, iters)
                del graph
                row["ours_graph_ms"] = cuda_time_ms(decoder.graphs[b].replay, iters)
                if profile:
                    row["kernels"] = kernel_breakdown(decoder.graphs[b].replay)
            row["ours_step_ms"] = host_time_ms(lambda: decoder.decode(tokens, positions, slots), iters)
        rows.append(row)
        print(f"  {name} batch {b}: done", file=sys.stderr)
    del decoder, kv, model
    if on_cuda:
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="per-kernel device time of our graph")
    ap.add_argument("--out", default=os.path.join("bench_results", "decode_step.json"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.shapes:
        rows += run_shape(name, sorted(args.batches), args.context, device, args.iters, args.profile)

    cols = ["shape", "batch", "ours_graph_ms", "ours_step_ms", "torch_graph_ms", "floor_ms", "rel_err_vs_torch"]
    print(" | ".join(cols) + " | speedup | % of floor")
    for r in rows:
        cells = [f"{r[c]:.1e}" if c == "rel_err_vs_torch" else f"{r[c]:.3f}" if isinstance(r.get(c), float)
                 else str(r.get(c, "-")) for c in cols]
        speedup = f"{r['torch_graph_ms'] / r['ours_graph_ms']:.2f}x" if "ours_graph_ms" in r else "-"
        frac = f"{100 * r['floor_ms'] / r['ours_graph_ms']:.0f}%" if "ours_graph_ms" in r else "-"
        print(" | ".join(cells) + f" | {speedup} | {frac}")
    for r in rows:
        if "kernels" in r:
            total = sum(k["us"] for k in r["kernels"])
            print(f"\n{r['shape']} batch {r['batch']}: kernels {total:.0f} us of a {r['ours_graph_ms'] * 1e3:.0f} us "
                  f"replay, {sum(k['launches'] for k in r['kernels']):.0f} launches")
            for k in r["kernels"][:14]:
                print(f"  {k['us']:8.1f} us  {k['launches']:5.0f}x  {k['kernel'][:90]}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python benchmarks/decode_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "peak_bytes_per_s": PEAK_BYTES_PER_S,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
