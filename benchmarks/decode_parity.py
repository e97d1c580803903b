"""Greedy parity of the CUDA decode path (ModelRunner: eager prefill, CUDA-graph kernel decode) with transformers.

    python benchmarks/decode_parity.py [--shape llama-3.2-1b] [--dtypes float32 bfloat16] [--new-tokens 32]

One random-weight model (norm gains ~1, matrices at 0.02) is loaded into both transformers' LlamaForCausalLM and
treadle's; each prompt is decoded greedily by `generate` and by the ModelRunner, alone and all prompts batched.
For each run: how many tokens agree before the first difference and, at that step, transformers' top-1/top-2
logit margin (a flip on a tiny margin is rounding; on a large one, a bug). Since free-running sequences part
for good at the first flip, the runner is also teacher-forced along transformers' tokens: per-step argmax
agreement, and the logits' relative error against an fp32 transformers run of the same weights, for treadle and
for transformers' own low-precision run. Prints tables, writes JSON.
On a CPU (`--shape tiny`, TRITON_INTERPRET=1) the kernel decoder runs eagerly, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys

import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from decode_step import SHAPES, random_model
from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig, ModelConfig
from treadle.engine.model_runner import ModelRunner
from treadle.kernels.cuda_graph_runner import CudaGraphDecoder

PROMPT_LENS = (5, 16, 17, 40)  # around the 16-token page size
PAGE_SIZE = 16


def hf_twin(model, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> HFLlama:
    """transformers' Llama holding exactly `model`'s weights (split back out of the fused projections)."""
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.qkv_proj.weight.split([q, kv, kv])
        gate, up = layer.gate_up_proj.weight.chunk(2)
        sd.update({
            p + "input_layernorm.weight": layer.input_norm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_norm.weight,
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": layer.o_proj.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.down_proj.weight,
        })  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters in `dtype`; the rotary frequencies stay fp32, as transformers makes them
    try:
        with torch.device(device):
            hf = HFLlama(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight names do not line up: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def hf_greedy(hf: HFLlama, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences[0, len(prompt) :].tolist(), [lg[0].float() for lg in out.logits]


def ours_greedy(
    runner: ModelRunner, prompts: list[list[int]], n: int, forced: list[list[int]] | None = None
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill every prompt in one step, then decode them as one batch (fresh pages per sequence). Feeds back the
    argmax, or the `forced` tokens. Returns the argmax tokens and each step's logits [B, V]."""
    slots = []
    for i, p in enumerate(prompts):
        base = i * 4 * PAGE_SIZE * 8
        slots.append(list(range(base, base + len(p))))
    logits = runner.execute([SeqChunk(p, list(range(len(p))), list(s), True) for p, s in zip(prompts, slots)])
    steps = [logits]
    out = [[int(t)] for t in logits.argmax(-1).tolist()]
    for i in range(n - 1):
        chunks = []
        for b, (toks, s) in enumerate(zip(out, slots)):
            s.append(s[-1] + 1)
            chunks.append(SeqChunk([forced[b][i] if forced else toks[-1]], [len(s) - 1], list(s), True))
        logits = runner.execute(chunks)
        steps.append(logits)
        for toks, t in zip(out, logits.argmax(-1).tolist()):
            toks.append(int(t))
    return out, steps


def hf_forced_logits(hf: HFLlama, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [n, V] that predict each of `tokens` after `prompt`, from one full forward pass."""
    ids = torch.tensor([prompt + tokens[:-1]], device=hf.device)
    return hf(ids).logits[0, len(prompt) - 1 :].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def compare(ref: list[int], ref_logits: list[torch.Tensor], ours: list[int]) -> dict:
    agree = next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), len(ref))
    row = {"agree": agree, "of": len(ref)}
    if agree < len(ref):
        top2 = ref_logits[agree].topk(2).values
        row["hf_margin_at_flip"] = float(top2[0] - top2[1])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join("bench_results", "decode_parity.json"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SHAPES[args.shape]
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in PROMPT_LENS]
    rows, forced_rows = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = random_model(cfg, device, dtype)
        hf = hf_twin(model, cfg, device, dtype)
        engine_cfg = EngineConfig(device=str(device), dtype=dtype_name, max_num_seqs=len(prompts), max_model_len=128)
        runner = ModelRunner(model, cfg, engine_cfg, num_slots=len(prompts) * 4 * PAGE_SIZE * 8)
        if device.type == "cpu":
            runner.graph_decoder = CudaGraphDecoder(model, runner.kv_caches, len(prompts), 128)
        with torch.inference_mode():
            refs = [hf_greedy(hf, p, args.new_tokens) for p in prompts]
        batched, _ = ours_greedy(runner, prompts, args.new_tokens)
        for i, p in enumerate(prompts):
            alone = ours_greedy(runner, [p], args.new_tokens)[0][0]
            for mode, ours in (("alone", alone), ("batched", batched[i])):
                rows.append({"dtype": dtype_name, "prompt_len": len(p), "mode": mode, **compare(*refs[i], ours)})
        if dtype != torch.float32:
            forced = [tokens for tokens, _ in refs]
            _, steps = ours_greedy(runner, prompts, args.new_tokens, forced=forced)
            hf32 = hf_twin(model, cfg, device, torch.float32)
            with torch.inference_mode():
                for i, p in enumerate(prompts):
                    exact = hf_forced_logits(hf32, p, forced[i])
                    ours_i = torch.stack([s[i] for s in steps])
                    hf_i = torch.stack(refs[i][1])
                    forced_rows.append({
                        "dtype": dtype_name, "prompt_len": len(p),
                        "argmax_agree": float((ours_i.argmax(-1) == hf_i.argmax(-1)).float().mean()),
                        "ours_err_vs_fp32": rel(ours_i, exact), "hf_err_vs_fp32": rel(hf_i, exact),
                    })  # fmt: skip
            del hf32
        del runner, hf, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("dtype | prompt_len | mode | agreeing tokens | HF top-2 margin at first flip")
    for r in rows:
        margin = f"{r['hf_margin_at_flip']:.4f}" if "hf_margin_at_flip" in r else "-"
        print(f"{r['dtype']} | {r['prompt_len']} | {r['mode']} | {r['agree']}/{r['of']} | {margin}")
    if forced_rows:
        print("teacher-forced: dtype | prompt_len | argmax agreement | treadle err vs fp32 | transformers err vs fp32")
        for r in forced_rows:
            print(f"{r['dtype']} | {r['prompt_len']} | {100 * r['argmax_agree']:.0f}% | {r['ours_err_vs_fp32']:.2e} "
                  f"| {r['hf_err_vs_fp32']:.2e}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "command": "python benchmarks/decode_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "teacher_forced": forced_rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
