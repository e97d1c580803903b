"""`treadle bench serve` against `treadle serve --device cuda` on a random-weight checkpoint at a real shape.

    python benchmarks/gpu_serving.py --shape llama-3.2-1b --concurrency 1,16,64 --out bench_results/gpu_serving

Builds the checkpoint with scripts/make_random_checkpoint.py (random weights: the text is noise, so requests
use ignore_eos for fixed lengths), starts the server, runs the load generator once per concurrency level
(`--max-concurrency C`, 4*C prompts, all sent at t=0), prints one table and writes JSON (one file per level plus
a summary).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cpu_serving import free_port, server_process

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--model", default=None, help="an existing checkpoint directory (skips building one)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run with a tiny shape")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompts-per-slot", type=int, default=4)
    ap.add_argument("--serve-args", default="", help="extra flags for treadle serve")
    ap.add_argument("--out", default="bench_results/gpu_serving")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix=f"treadle-{args.shape}-")
        subprocess.run([sys.executable, str(REPO / "scripts/make_random_checkpoint.py"), "--shape", args.shape,
                        "--out", model, "--device", args.device], check=True)
    port = free_port()
    serve = [sys.executable, "-m", "treadle.server.cli", "serve", "--device", args.device, "--model", model,
             "--dtype", args.dtype, "--port", str(port), *args.serve_args.split()]
    base = f"http://127.0.0.1:{port}"
    rows = []
    with server_process(serve, base + "/health", out / "server.log", timeout_s=600):
        for c in (int(x) for x in args.concurrency.split(",")):
            result = out / f"bench_c{c}.json"
            subprocess.run([sys.executable, "-m", "treadle.server.bench_serve", "--base-url", base,
                            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                            "--num-prompts", str(args.prompts_per_slot * c), "--num-warmups", str(min(c, 4)),
                            "--max-concurrency", str(c), "--ignore-eos", "--disable-tqdm",
                            "--result-file", str(result)], check=True)
            m = json.loads(result.read_text())
            rows.append({"concurrency": c, **{k: m[k] for k in (
                "completed", "failed", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms")}})

    table = Table(title=f"treadle serve --device {args.device}, {args.shape} random weights, {args.dtype}, "
                        f"{args.input_len} in / {args.output_len} out")
    for col in ("concurrency", "completed", "failed", "output tok/s", "median TTFT ms", "p99 TTFT ms",
                "median TPOT ms", "p99 TPOT ms", "median ITL ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["concurrency"]), str(r["completed"]), str(r["failed"]), f"{r['output_throughput']:.1f}",
                      f"{r['median_ttft_ms']:.1f}", f"{r['p99_ttft_ms']:.1f}", f"{r['median_tpot_ms']:.2f}",
                      f"{r['p99_tpot_ms']:.2f}", f"{r['median_itl_ms']:.2f}")
    Console().print(table)
    (out / "summary.json").write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "input_len": args.input_len,
                                                  "output_len": args.output_len, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
