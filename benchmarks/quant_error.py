"""What round-to-nearest b-bit weights cost a real model: the embedded SmolLM2-135M-Instruct, every projection
quantized by `quantize_model_` (the LM head stays full precision), against the fp32 model.

Per bit width: the weights' relative error (Frobenius, all projections together), the relative error of the
logits over a few prompts, the share of positions whose top-1 token is unchanged, and the KL divergence of the
next-token distribution (fp32 model as the reference). Runs on CPU; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from treadle.engine.config import EngineConfig
from treadle.engine.loader import load_model
from treadle.engine.models.attention import AttentionMetadata
from treadle.engine.models.llama import LlamaForCausalLM
from treadle.kernels.quant_linear import QuantLinear, quantize_model_
from treadle.kernels.quantize import dequantize

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at 100 degrees Celsius at sea level because",
    "Once upon a time, in a small village by the sea, there lived",
]


@dataclass
class Row:
    bits: int
    group_size: int
    weight_rel_err: float
    logits_rel_err: float
    top1_agreement: float
    kl_nats: float


def logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of one prefill of `tokens`."""
    n, cfg = len(tokens), model.config
    attn = AttentionMetadata.build([], [list(range(n))], [n], list(range(n)), list(range(n)), torch.device("cpu"))
    kv = [(torch.zeros(n, cfg.num_kv_heads, cfg.head_dim), torch.zeros(n, cfg.num_kv_heads, cfg.head_dim))
          for _ in range(cfg.num_layers)]
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), attn, kv))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("bench_results/quant_error.json"))
    args = p.parse_args()
    loaded = load_model(EngineConfig(dtype="float32", device="cpu"), progress=False)
    model = loaded.model
    prompts = [loaded.tokenizer.encode(text) for text in PROMPTS]
    reference = [logits(model, t) for t in prompts]
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    rows = []
    for bits in args.bits:
        quantized = copy.deepcopy(model)
        quantize_model_(quantized, bits, args.group_size)
        err2 = ref2 = 0.0
        for name, m in quantized.named_modules():
            if isinstance(m, QuantLinear):
                w = weights[name].t()
                err2 += float((dequantize(m.quantized_weight) - w).pow(2).sum())
                ref2 += float(w.pow(2).sum())
        outs = [logits(quantized, t) for t in prompts]
        ref_all, out_all = torch.cat(reference), torch.cat(outs)
        kl = torch.nn.functional.kl_div(out_all.log_softmax(-1), ref_all.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        rows.append(Row(bits, args.group_size, (err2 / ref2) ** 0.5,
                        float((out_all - ref_all).norm() / ref_all.norm()),
                        float((out_all.argmax(-1) == ref_all.argmax(-1)).float().mean()), float(kl)))

    table = Table(title=f"{loaded.name}: round-to-nearest weight quantization vs fp32 "
                        f"({sum(len(t) for t in prompts)} positions)")
    for col in ("bits", "group", "weight rel err", "logits rel err", "top-1 agreement", "KL (nats)"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.bits), str(r.group_size), f"{r.weight_rel_err:.4f}", f"{r.logits_rel_err:.4f}",
                      f"{r.top1_agreement:.3f}", f"{r.kl_nats:.4f}")
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "quant_error",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.name,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "rows": [asdict(r) for r in rows],
    }, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
