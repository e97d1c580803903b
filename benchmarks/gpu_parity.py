"""Greedy parity with transformers on a random-weight checkpoint at real shapes (the GPU test machine's check).

    python benchmarks/gpu_parity.py                              # Llama-3.2-1B shape on CUDA, bf16 and fp32
    python benchmarks/gpu_parity.py --shape tiny --device cpu    # seconds on a laptop

Builds the checkpoint with scripts/make_random_checkpoint.py, loads it with transformers and with treadle's
loader, and decodes a few prompts greedily for --new-tokens tokens: transformers one prompt at a time (its own KV
cache), treadle both alone and all prompts batched through ModelRunner. A row passes when tokens match exactly,
or, as vLLM's check_logprobs_close allows for low precision, when at the first divergence each side's token is
in the other's top-5 (later tokens are then not comparable). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig
from treadle.engine.loader import load_model
from treadle.engine.model_runner import ModelRunner

PROMPTS = [
    "The quick brown fox",
    "Write a short poem about GPUs and memory bandwidth.",
    "def fibonacci(n):",
    "In 1969, the first humans",
]
TOP_K = 5


def hf_greedy(model, prompt: list[int], steps: int, device: str) -> list[tuple[int, list[int]]]:
    """(greedy token, top-k ids) per step from transformers' forward with its own KV cache."""
    out = []
    with torch.inference_mode():
        res = model(torch.tensor([prompt], device=device), use_cache=True)
        for _ in range(steps):
            logits = res.logits[0, -1].float()
            tok = int(logits.argmax())
            out.append((tok, logits.topk(TOP_K).indices.tolist()))
            # transformers 5.24 renamed past_key_values to cache; the GPU machine has an older 5.x.
            field = "cache" if hasattr(res, "cache") else "past_key_values"
            res = model(torch.tensor([[tok]], device=device), **{field: getattr(res, field)}, use_cache=True)
    return out


def treadle_greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[tuple[int, list[int]]]]:
    """The same for several prompts decoded together (one prefill step, then one token per sequence per step)."""
    span = max(len(p) for p in prompts) + steps
    slots = [list(range(i * span, i * span + len(p) + steps)) for i, p in enumerate(prompts)]
    outs: list[list[tuple[int, list[int]]]] = [[] for _ in prompts]
    chunks = [SeqChunk(p, list(range(len(p))), s[: len(p)], True) for p, s in zip(prompts, slots)]
    for _ in range(steps):
        logits = runner.execute(chunks)
        for o, row in zip(outs, logits):
            o.append((int(row.argmax()), row.topk(TOP_K).indices.tolist()))
        chunks = []
        for p, s, o in zip(prompts, slots, outs):
            n = len(p) + len(o)
            chunks.append(SeqChunk([o[-1][0]], [n - 1], s[:n], True))
    return outs


def compare(ref: list[tuple[int, list[int]]], got: list[tuple[int, list[int]]]) -> dict:
    for i, ((rt, rtop), (gt, gtop)) in enumerate(zip(ref, got)):
        if rt != gt:
            return {"exact": False, "first_mismatch": i, "close": gt in rtop and rt in gtop}
    return {"exact": True, "first_mismatch": None, "close": True}


def run_dtype(ckpt: str, dtype: str, device: str, steps: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    cfg = EngineConfig(model=ckpt, dtype=dtype, device=device)
    loaded = load_model(cfg, progress=False)
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    runner = ModelRunner(loaded.model, loaded.config, cfg, num_slots=len(prompts) * (max(map(len, prompts)) + steps))
    alone = [treadle_greedy(runner, [p], steps)[0] for p in prompts]
    batched = treadle_greedy(runner, prompts, steps)
    del runner, loaded
    gc.collect()

    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device).eval()
    refs = [hf_greedy(reference, p, steps, device) for p in prompts]
    del reference
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    rows = []
    for mode, results in (("alone", alone), ("batched", batched)):
        for i, (ref, got) in enumerate(zip(refs, results)):
            rows.append({"dtype": dtype, "mode": mode, "prompt": i, "tokens": steps, **compare(ref, got)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--checkpoint", help="reuse (or create) the random checkpoint in this directory")
    ap.add_argument("--out", default="bench_results/gpu_parity.json")
    args = ap.parse_args(argv)

    ckpt = args.checkpoint or os.path.join(tempfile.gettempdir(), f"treadle-random-{args.shape}")
    if not os.path.isfile(os.path.join(ckpt, "model.safetensors.index.json")):
        script = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_random_checkpoint.py")
        subprocess.run(
            [sys.executable, script, "--shape", args.shape, "--out", ckpt, "--device", args.device], check=True
        )
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run_dtype(ckpt, dtype, args.device, args.new_tokens)

    print(f"{'dtype':<10} {'mode':<8} {'prompt':>6} {'exact':>6} {'first diff':>10} {'close':>6}")
    for r in rows:
        diff = "-" if r["first_mismatch"] is None else r["first_mismatch"]
        print(f"{r['dtype']:<10} {r['mode']:<8} {r['prompt']:>6} {r['exact']!s:>6} {diff!s:>10} {r['close']!s:>6}")
    passed = all(r["close"] for r in rows)
    print(f"{'PASS' if passed else 'FAIL'}: {sum(r['exact'] for r in rows)}/{len(rows)} rows token-exact")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "device": args.device, "passed": passed, "rows": rows}, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
