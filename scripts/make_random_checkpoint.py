"""Write an HF-style checkpoint with random weights at a real model's shapes, for GPU benchmarks and parity runs.

    python scripts/make_random_checkpoint.py --shape llama-3.2-1b --out /tmp/llama-1b-random --device cuda

Output: config.json, generation_config.json, safetensors shards + index, and the SmolLM2 tokenizer (its ids fit
every shape's vocabulary; the borrowed tokenizer's BOS/EOS ids are written into the configs so the checkpoint is
self-consistent). Weights are generated on --device in --dtype, one shard at a time, so an 8B checkpoint needs
neither host RAM for the whole model nor a slow CPU RNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    # Small enough for a CPU run in seconds; same vocabulary as the tokenizer, llama3 rope in all three bands.
    "tiny": dict(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 64},
        max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}  # fmt: skip


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of a Llama checkpoint, in file order."""
    h, d = c["hidden_size"], c["head_dim"]
    q, kv, inter = c["num_attention_heads"] * d, c["num_key_value_heads"] * d, c["intermediate_size"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], h)))
    return out


def write_checkpoint(
    shape: str,
    out: str,
    device: str = "cpu",
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_gb: float = 2.0,
    tokenizer_dir: str | None = None,
) -> None:
    from treadle.engine.loader import default_model_path
    from treadle.engine.tokenizer import Tokenizer

    # A saved copy of the tokenizer serves machines without the embedded model's package (the GPU machine).
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else Tokenizer.from_gguf(default_model_path())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPES[shape],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_ids[0],
        "torch_dtype": dtype,
    }
    os.makedirs(out, exist_ok=True)
    tokenizer.save(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f, indent=2)

    torch_dtype = getattr(torch, dtype)
    elem = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensor_shapes(config):
        nbytes = elem * torch.Size(shp).numel()
        if size and size + nbytes > shard_gb * 2**30:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            t = torch.randn(shp, generator=gen, device=device, dtype=torch_dtype)
            # RMSNorm gains around 1 as in trained models; matrices at the usual init scale.
            tensors[name] = t.mul_(0.1).add_(1.0) if len(shp) == 1 else t.mul_(config["initializer_range"])
            weight_map[name] = fname
            total += elem * t.numel()
        save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(out, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--tokenizer", help="directory of a saved tokenizer to use (default: the embedded SmolLM2's)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    write_checkpoint(args.shape, args.out, args.device, args.dtype, args.seed, args.shard_gb, args.tokenizer)
    print(f"wrote {args.shape} to {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
