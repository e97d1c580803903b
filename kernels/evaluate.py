"""One Evaluation of the Trace schema: a solution run on a workload, checked against the reference, then timed.

The checks and statuses follow FlashInfer-Bench: shape (INCORRECT_SHAPE), dtype (INCORRECT_DTYPE), any NaN or
inf (INCORRECT_NUMERICAL), then elementwise: an element fails only if |out - ref| > atol and
|out - ref| / (|ref| + 1e-8) > rtol, and an output passes if at least `matched_ratio` of its elements do.
Timing on CUDA is `triton.testing.do_bench`: warm-up, the L2 cache flushed (a 256 MB buffer zeroed) before
every call, CUDA events around each call, median. On CPU it is the median of wall-clock calls.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import triton
from safetensors.torch import load_file

from .registry import TORCH_DTYPES, Registry, current_hardware
from .trace import Correctness, Definition, Environment, Evaluation, Performance, Solution, Trace, Workload


@dataclass
class BenchConfig:
    atol: float = 1e-2
    rtol: float = 1e-2
    matched_ratio: float = 1.0
    warmup_ms: int = 25
    rep_ms: int = 100
    seed: int = 0


def make_inputs(d: Definition, w: Workload, root: Path, device: torch.device, seed: int) -> list[Any]:
    """The workload's inputs in definition order: random tensors (normal floats, integers over the dtype's
    whole range, which any bit-packed input accepts), scalars, or tensors saved under the dataset root."""
    axes = {name: axis.value for name, axis in d.axes.items() if axis.type == "const"} | w.axes
    gen = torch.Generator(device=device).manual_seed(seed)
    blobs: dict[str, dict[str, torch.Tensor]] = {}
    values = []
    for name, spec in d.inputs.items():
        src = w.inputs.get(name)
        if src is None:
            raise ValueError(f"workload {w.uuid} has no input {name!r}")
        if src.type == "scalar":
            values.append(src.value)
            continue
        if spec.shape is None:
            raise ValueError(f"workload {w.uuid}: scalar input {name!r} must be given a value")
        dtype = TORCH_DTYPES[spec.dtype]
        if src.type == "safetensors":
            if src.path not in blobs:
                blobs[src.path] = load_file(str(root / src.path))
            values.append(blobs[src.path][src.tensor_key].to(device))
            continue
        shape = [axes[a] for a in spec.shape]
        if dtype.is_floating_point:
            values.append(torch.randn(shape, generator=gen, device=device).to(dtype))
        elif dtype == torch.bool:
            values.append(torch.randint(0, 2, shape, generator=gen, device=device).bool())
        else:
            info = torch.iinfo(dtype)
            values.append(torch.randint(info.min, info.max, shape, generator=gen, device=device, dtype=dtype))
    return values


def _outputs(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def check(d: Definition, out: Any, ref: Any, cfg: BenchConfig) -> tuple[str, Correctness | None, str]:
    """(status, correctness, log) of solution outputs `out` against reference outputs `ref`."""
    outs, refs = _outputs(out), _outputs(ref)
    if len(outs) != len(refs):
        return "INCORRECT_SHAPE", None, f"expected {len(refs)} outputs, got {len(outs)}"
    max_abs = max_rel = 0.0
    failed = []
    for name, o, r in zip(d.outputs, outs, refs, strict=True):
        if not isinstance(o, torch.Tensor) or o.shape != r.shape:
            return "INCORRECT_SHAPE", None, f"{name}: expected {tuple(r.shape)}, got {getattr(o, 'shape', o)}"
        if o.dtype != r.dtype:
            return "INCORRECT_DTYPE", None, f"{name}: expected {r.dtype}, got {o.dtype}"
        diff = (o.double() - r.double()).abs()
        rel = diff / (r.double().abs() + 1e-8)
        finite = bool(torch.isfinite(o).all())
        if diff.numel():
            max_abs, max_rel = max(max_abs, float(diff.max())), max(max_rel, float(rel.max()))
        if not finite:
            failed.append(f"{name}: NaN or inf")
            continue
        bad = (diff > cfg.atol) & (rel > cfg.rtol)
        matched = 1.0 - float(bad.double().mean()) if bad.numel() else 1.0
        if matched < cfg.matched_ratio:
            failed.append(f"{name}: {matched:.6f} of elements within tolerance, {cfg.matched_ratio} required")
    correctness = Correctness(max_rel, max_abs, {"atol": cfg.atol, "rtol": cfg.rtol})
    if failed:
        return "INCORRECT_NUMERICAL", correctness, "; ".join(failed)
    return "PASSED", correctness, ""


def latency_ms(fn: Callable[[], Any], device: torch.device, cfg: BenchConfig) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median"))
    fn()
    times, deadline = [], time.perf_counter() + cfg.rep_ms / 1e3
    while not times or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> Environment:
    return Environment(current_hardware(device), {"torch": torch.__version__, "triton": triton.__version__})


def evaluate(
    registry: Registry,
    d: Definition,
    w: Workload,
    solutions: list[Solution],
    root: Path,
    device: torch.device,
    cfg: BenchConfig,
) -> list[Trace]:
    """One trace per solution: correctness first, then (if PASSED) latency against the reference's."""
    env = environment(device)
    inputs = make_inputs(d, w, root, device, cfg.seed)
    reference = registry.reference(d.name)
    ref_out = reference(*inputs)
    ref_ms = latency_ms(lambda: reference(*inputs), device, cfg)
    traces = []
    for s in solutions:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            impl = registry.implementation(s.name)
        except Exception:
            ev = Evaluation("COMPILE_ERROR", env, stamp, traceback.format_exc(limit=3))
            traces.append(Trace(d.name, w, s.name, ev))
            continue
        try:
            out = impl(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception:
            ev = Evaluation("RUNTIME_ERROR", env, stamp, traceback.format_exc(limit=3))
            traces.append(Trace(d.name, w, s.name, ev))
            continue
        status, correctness, log = check(d, out, ref_out, cfg)
        performance = None
        if status == "PASSED":
            ms = latency_ms(lambda: impl(*inputs), device, cfg)
            performance = Performance(ms, ref_ms, ref_ms / ms)
        traces.append(Trace(d.name, w, s.name, Evaluation(status, env, stamp, log, correctness, performance)))
    return traces
