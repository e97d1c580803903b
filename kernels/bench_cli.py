"""`treadle kernels bench`: evaluate every solution on every workload and store the traces apply() reads.

Definitions and solutions come from the built-in catalog plus the dataset (--dataset, default
$TREADLE_KERNEL_DATASET or ~/.cache/treadle/kernels); workloads are the dataset's recorded ones plus the
catalog's examples. Each (workload, solution) becomes one Trace with an Evaluation, appended to
<dataset>/traces/<definition>.jsonl unless --no-save. Exit status 0 when every evaluation PASSED, else 1.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .catalog import example_workloads, register_builtin
from .evaluate import BenchConfig, evaluate
from .registry import Registry, default_dataset_root
from .trace import Trace, TraceSet


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    p.add_argument("--dataset", type=Path, help="dataset root (default: $TREADLE_KERNEL_DATASET or "
                   "~/.cache/treadle/kernels)")
    p.add_argument("--definitions", nargs="+", metavar="NAME",
                   help="definition names or op types to run (default: all)")
    p.add_argument("--no-examples", action="store_true", help="run only the dataset's recorded workloads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--atol", type=float, default=defaults.atol)
    p.add_argument("--rtol", type=float, default=defaults.rtol)
    p.add_argument("--matched-ratio", type=float, default=defaults.matched_ratio,
                   help="share of elements that must be within tolerance")
    p.add_argument("--warmup-ms", type=int, default=defaults.warmup_ms)
    p.add_argument("--rep-ms", type=int, default=defaults.rep_ms)
    p.add_argument("--no-save", action="store_true", help="print the results without storing the traces")


def main(args: argparse.Namespace) -> int:
    root = args.dataset or default_dataset_root()
    dataset = TraceSet.load(root)
    registry = Registry()
    register_builtin(registry)
    for d in dataset.definitions.values():
        registry.add_definition(d)
    for s in dataset.solutions.values():
        registry.add_solution(s)
    wanted = set(args.definitions or [])
    definitions = [
        d for d in registry.definitions.values()
        if registry.solutions_of(d.name) and (not wanted or d.name in wanted or d.op_type in wanted)
    ]
    if not definitions:
        print("no definitions with solutions match")
        return 1
    device = torch.device(args.device)
    cfg = BenchConfig(args.atol, args.rtol, args.matched_ratio, args.warmup_ms, args.rep_ms)
    with tempfile.TemporaryDirectory() as scratch:
        blob_root = Path(scratch) if args.no_save else root
        traces: list[Trace] = []
        for d in definitions:
            # (workload, the root its safetensors inputs live under)
            workloads = [(t.workload, root) for t in dataset.workloads.get(d.name, [])]
            if not args.no_examples:
                workloads += [(w, blob_root) for w in example_workloads(d, blob_root)]
            for w, w_root in workloads:
                traces += evaluate(registry, d, w, registry.solutions_of(d.name), w_root, device, cfg)
        _print(traces, device)
        if not args.no_save:
            for name in {t.definition for t in traces}:
                if name not in dataset.definitions:
                    dataset.save_definition(registry.definitions[name])
            for name in {t.solution for t in traces}:
                if name not in dataset.solutions:
                    dataset.save_solution(registry.solutions[name])
            dataset.append(traces)
            print(f"appended {len(traces)} traces under {root}")
    return 0 if all(t.evaluation.status == "PASSED" for t in traces) else 1


def _print(traces: list[Trace], device: torch.device) -> None:
    table = Table(title=f"kernel evaluations on {traces[0].evaluation.environment.hardware}" if traces else "")
    for col in ("definition", "workload axes", "solution", "status", "max abs err", "max rel err", "ms", "ref ms",
                "speedup"):
        table.add_column(col)
    for t in traces:
        e = t.evaluation
        c, p = e.correctness, e.performance
        table.add_row(
            t.definition,
            " ".join(f"{k}={v}" for k, v in t.workload.axes.items()),
            t.solution.removeprefix(t.definition + "_"),
            e.status,
            f"{c.max_absolute_error:.2e}" if c else "",
            f"{c.max_relative_error:.2e}" if c else "",
            f"{p.latency_ms:.4f}" if p else "",
            f"{p.reference_latency_ms:.4f}" if p else "",
            f"{p.speedup_factor:.2f}x" if p else "",
        )
        if e.log and e.status != "PASSED":
            table.add_row("", "", "", e.log.strip().splitlines()[-1][:80], "", "", "", "", "")
    Console(width=180).print(table)
