"""Kernel registry: Trace schema round-trip and validation, the benchmark's tolerance logic, apply()'s choice
of solution (exact and nearest shape, hardware, tolerances, fallback to the reference), workload recording,
and `treadle kernels bench` end to end on CPU."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU  # noqa: I001  (sets up the interpreter first)

from treadle.kernels import bench_cli, catalog
from treadle.kernels.evaluate import BenchConfig, check, evaluate, make_inputs
from treadle.kernels.registry import ApplyConfig, Registry, current_hardware
from treadle.kernels.trace import (
    Axis,
    BuildSpec,
    Correctness,
    Definition,
    Environment,
    Evaluation,
    InputSpec,
    Performance,
    Solution,
    SourceFile,
    TensorSpec,
    Trace,
    TraceSet,
    Workload,
    from_json,
    to_json,
)

TWICE_REF = """
import torch

def run(x, bias):
    return x * 2 + bias
"""
# Solutions shipped as sources: each notes its calls, so the tests can see which one apply() ran.
FAST = """
CALLS = []

def run(x, bias):
    CALLS.append(tuple(x.shape))
    return x * 2 + bias
"""
DPS = """
def run(x, bias, out):
    out.copy_(x * 2 + bias)
"""
WRONG = """
def run(x, bias):
    return x * 3
"""


def twice_definition(name="twice_h8") -> Definition:
    return Definition(
        name,
        "twice",
        {"batch": Axis("var"), "hidden": Axis("const", 8)},
        {"x": TensorSpec(["batch", "hidden"], "float32"), "bias": TensorSpec(None, "float32")},
        {"y": TensorSpec(["batch", "hidden"], "float32")},
        TWICE_REF,
        tags=["stage:decode"],
    )


def source_solution(name, content, dps=False, definition="twice_h8") -> Solution:
    spec = BuildSpec("python", ["cpu"], "sol.py::run", destination_passing_style=dps)
    return Solution(name, definition, "tests", spec, [SourceFile("sol.py", content)])


def evaluated(solution, batch, speedup, hardware="cpu", abs_err=1e-6, status="PASSED") -> Trace:
    inputs = {"x": InputSpec("random"), "bias": InputSpec("scalar", value=0.5)}
    workload = Workload(f"w{batch}", {"batch": batch}, inputs)
    perf = Performance(1.0 / speedup, 1.0, speedup) if status == "PASSED" else None
    corr = Correctness(abs_err, abs_err) if status == "PASSED" else None
    ev = Evaluation(status, Environment(hardware, {"torch": "x"}), "2026-01-01T00:00:00+00:00", "", corr, perf)
    return Trace("twice_h8", workload, solution, ev)


def registry_with(*solutions) -> Registry:
    reg = Registry()
    reg.add_definition(twice_definition())
    for s in solutions:
        reg.add_solution(s)
    return reg


def test_records_round_trip_through_json(tmp_path):
    d = twice_definition()
    s = source_solution("twice_fast", FAST)
    t = evaluated("twice_fast", 4, 2.0)
    for record, cls in ((d, Definition), (s, Solution), (t, Trace)):
        assert from_json(cls, json.loads(json.dumps(to_json(record)))) == record
    ts = TraceSet(tmp_path)
    ts.save_definition(d)
    ts.save_solution(s)
    ts.append([t, Trace("twice_h8", t.workload)])
    assert (tmp_path / "definitions/twice/twice_h8.json").exists()
    again = TraceSet.load(tmp_path)
    assert again.definitions == {"twice_h8": d} and again.solutions == {"twice_fast": s}
    assert again.traces["twice_h8"] == [t] and again.workloads["twice_h8"] == [Trace("twice_h8", t.workload)]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda j: j.update(colour="red"), "unknown fields"),
        (lambda j: j.pop("reference"), "missing fields"),
        (lambda j: j["axes"]["hidden"].pop("value"), "const axis needs a value"),
        (lambda j: j["inputs"]["x"].update(shape=["batch", "width"]), "unknown axis 'width'"),
        (lambda j: j["inputs"]["x"].update(dtype="float128"), "dtype"),
        (lambda j: j["outputs"].update(x=j["outputs"].pop("y")), "both input and output"),
        (lambda j: j.update(reference="def go(): pass"), "top-level run"),
        (lambda j: j.update(name="../escape"), "definition name"),
        (lambda j: j["axes"]["hidden"].update(value="8"), "expected int"),
    ],
)
def test_bad_definitions_are_refused_with_the_field_named(mutate, message):
    data = to_json(twice_definition())
    mutate(data)
    with pytest.raises(ValueError, match=message):
        from_json(Definition, data)


def test_bad_solutions_workloads_and_evaluations_are_refused():
    good = to_json(source_solution("s", FAST))
    for mutate, message in [
        (lambda j: j["sources"][0].update(path="/etc/passwd"), "relative path"),
        (lambda j: j["sources"][0].update(path="../x.py"), "relative path"),
        (lambda j: j["spec"].update(entry_point="sol.py"), "file::function"),
        (lambda j: j["spec"].update(entry_point="other.py::run"), "not among its sources"),
        (lambda j: j["spec"].update(language="fortran"), "not one of"),
    ]:
        data = json.loads(json.dumps(good))
        mutate(data)
        with pytest.raises(ValueError, match=message):
            from_json(Solution, data)
    with pytest.raises(ValueError, match="needs path and tensor_key"):
        from_json(InputSpec, {"type": "safetensors", "path": "a.safetensors"})
    trace = to_json(evaluated("s", 1, 2.0))
    trace["evaluation"]["status"] = "INCORRECT_SHAPE"  # may not carry correctness or performance
    with pytest.raises(ValueError, match="needs correctness=False"):
        from_json(Trace, trace)
    trace["evaluation"]["status"] = "BROKEN"
    with pytest.raises(ValueError, match="not one of"):
        from_json(Trace, trace)


def test_tolerance_is_elementwise_abs_or_rel_with_a_matched_ratio():
    d = twice_definition()
    ref = torch.tensor([[1000.0] + [0.001] * 7])
    cfg = BenchConfig(atol=1e-2, rtol=1e-2)
    # 1000 -> 1005: 5 absolute but 0.5% relative; 0.001 -> 0.009: 800% relative but 0.008 absolute.
    assert check(d, torch.tensor([[1005.0] + [0.009] * 7]), ref, cfg)[0] == "PASSED"
    status, corr, log = check(d, torch.tensor([[1020.0] + [0.001] * 7]), ref, cfg)  # 20 and 2%: fails both
    assert status == "INCORRECT_NUMERICAL" and corr.max_absolute_error == pytest.approx(20.0) and "0.875" in log
    assert check(d, torch.tensor([[1020.0] + [0.001] * 7]), ref, BenchConfig(matched_ratio=0.8))[0] == "PASSED"
    assert check(d, torch.full((1, 8), float("nan")), ref, cfg)[0] == "INCORRECT_NUMERICAL"
    assert check(d, torch.zeros(2, 8), ref, cfg)[0] == "INCORRECT_SHAPE"
    assert check(d, ref.double(), ref, cfg)[0] == "INCORRECT_DTYPE"


def test_apply_runs_the_reference_until_a_solution_has_won():
    reg = registry_with(source_solution("twice_fast", FAST))
    x = torch.randn(3, 8)
    torch.testing.assert_close(reg.apply("twice_h8", x, 0.5), x * 2 + 0.5)
    assert reg.choose("twice_h8", (3,)) is None
    fast = reg.implementation("twice_fast")
    assert fast.__globals__["CALLS"] == []
    with pytest.raises(TypeError, match="missing input 'bias'"):
        reg.apply("twice_h8", x)
    with pytest.raises(ValueError, match="axis hidden is 8"):
        reg.apply("twice_h8", torch.randn(3, 7), 0.5)
    with pytest.raises(KeyError, match="unknown kernel definition"):
        reg.apply("nope", x)


def test_apply_picks_the_best_solution_for_the_nearest_measured_shape():
    reg = registry_with(source_solution("twice_fast", FAST), source_solution("twice_dps", DPS, dps=True))
    traces = [
        evaluated("twice_fast", 1, 3.0),
        evaluated("twice_dps", 1, 2.0),
        evaluated("twice_fast", 64, 1.5),
        evaluated("twice_dps", 64, 4.0),
        evaluated("twice_fast", 4096, 0.5),  # slower than the reference there
        evaluated("twice_dps", 8, 9.0, hardware="some other GPU"),
        evaluated("twice_dps", 16, 9.0, abs_err=1.0),  # outside ApplyConfig's tolerances
        evaluated("twice_dps", 2, 0.0, status="INCORRECT_SHAPE"),
    ]
    assert reg.load_evaluations(traces, hardware="cpu", config=ApplyConfig(max_atol=1e-3, max_rtol=1e-3)) == 5
    assert reg.choose("twice_h8", (1,)) == "twice_fast"
    assert reg.choose("twice_h8", (2,)) == "twice_fast"  # nearest to 1 in log2
    assert reg.choose("twice_h8", (16,)) == "twice_dps"  # nearest to 64
    assert reg.choose("twice_h8", (8192,)) is None  # nearest is 4096, where the reference won
    calls = reg.implementation("twice_fast").__globals__["CALLS"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(reg.apply("twice_h8", x, 1.0), x * 2 + 1)
    assert calls == [(2, 8)]
    torch.testing.assert_close(reg.apply("twice_h8", torch.ones(48, 8), bias=0.0), torch.full((48, 8), 2.0))
    assert calls == [(2, 8)]  # the destination-passing solution ran, wrapped to return its output


def test_recording_writes_workloads_and_dumps_integer_inputs(tmp_path):
    d = catalog.gqa_paged_decode_definition(4, 2, 16, "float32")
    reg = Registry()
    reg.add_definition(d)
    q, k, v = torch.randn(2, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    indptr, indices = torch.tensor([0, 3, 7], dtype=torch.int32), torch.randperm(10)[:7].to(torch.int32)
    dataset = TraceSet(tmp_path)
    with reg.recording(dataset):
        out, lse = reg.apply(d.name, q, k, v, indptr, indices, 0.25)
        reg.apply(d.name, q, k, v, indptr, indices, 0.25)  # same shapes: recorded once
    loaded = TraceSet.load(tmp_path)
    assert list(loaded.definitions) == [d.name]
    (t,) = loaded.workloads[d.name]
    assert t.workload.axes == {"batch_size": 2, "num_slots": 10, "len_indptr": 3, "num_kv_indices": 7}
    assert t.workload.inputs["q"].type == "random" and t.workload.inputs["sm_scale"].value == 0.25
    assert t.workload.inputs["kv_indices"].type == "safetensors"
    values = make_inputs(d, t.workload, tmp_path, torch.device("cpu"), seed=0)
    assert torch.equal(values[4], indices) and torch.equal(values[3], indptr)
    again = reg.reference(d.name)(q, k, v, values[3], values[4], 0.25)
    torch.testing.assert_close(again[0], out)


def test_catalog_references_agree_with_independent_ones():
    """The catalog's self-contained references against treadle.kernels.reference and quantize.dequantize."""
    from treadle.kernels.quant_matmul import quant_matmul_reference
    from treadle.kernels.quantize import quantize_rtn
    from treadle.kernels.reference import paged_attention_reference

    reg = Registry()
    catalog.register_builtin(reg)
    assert all(reg.reference(name) for name in reg.definitions)
    for bits in (3, 6):
        d = catalog.gemm_wna16_definition(bits, 64, 24, 200, "float32")
        qw = quantize_rtn(torch.randn(24, 200), bits, 64)
        x = torch.randn(5, 200)
        reg.add_definition(d)
        got = reg.reference(d.name)(x, qw.packed, qw.scales, qw.mins, bits, 64)
        torch.testing.assert_close(got, quant_matmul_reference(x, qw))
    d = catalog.gqa_paged_decode_definition(4, 2, 16, "float32")
    reg.add_definition(d)
    q, k, v = torch.randn(2, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    indptr, indices = torch.tensor([0, 3, 7], dtype=torch.int32), torch.randperm(10)[:7].to(torch.int32)
    out, lse = reg.reference(d.name)(q, k, v, indptr, indices, 0.25)
    ref_out, ref_lse = paged_attention_reference(q, k, v, torch.arange(3, dtype=torch.int32), indptr, indices, 0.25)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_evaluate_reports_failures_without_raising(tmp_path):
    reg = registry_with(source_solution("twice_fast", FAST), source_solution("twice_wrong", WRONG))
    spec = BuildSpec("python", ["cpu"], "missing.py::run", destination_passing_style=False)
    reg.add_solution(Solution("twice_broken", "twice_h8", "tests", spec, [SourceFile("missing.py", "import nope\n")]))
    w = Workload("w", {"batch": 4}, {"x": InputSpec("random"), "bias": InputSpec("scalar", value=0.0)})
    traces = evaluate(reg, reg.definitions["twice_h8"], w, list(reg.solutions.values()), tmp_path,
                      torch.device("cpu"), BenchConfig(rep_ms=1))
    status = {t.solution: t.evaluation.status for t in traces}
    assert status == {"twice_fast": "PASSED", "twice_wrong": "INCORRECT_NUMERICAL", "twice_broken": "COMPILE_ERROR"}
    passed = next(t for t in traces if t.solution == "twice_fast").evaluation
    assert passed.environment.hardware == current_hardware(torch.device("cpu"))
    assert passed.performance.speedup_factor == pytest.approx(
        passed.performance.reference_latency_ms / passed.performance.latency_ms
    )


def test_bench_cli_evaluates_dataset_and_catalog_then_apply_uses_the_result(tmp_path):
    dataset = TraceSet(tmp_path)
    dataset.save_definition(twice_definition())
    dataset.save_solution(source_solution("twice_fast", FAST))
    w = Workload("w1", {"batch": 4}, {"x": InputSpec("random"), "bias": InputSpec("scalar", value=1.0)})
    dataset.append([Trace("twice_h8", w)])
    reg = Registry()
    gemm = catalog.register_gemm_wna16(reg, 3, 64, 48, 128, "float32")  # a small float32 variant: fast on CPU
    dataset.save_definition(gemm)
    for s in reg.solutions.values():
        dataset.save_solution(s)
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["--dataset", str(tmp_path), "--definitions", "twice_h8", gemm.name, "--rep-ms", "1",
                              "--warmup-ms", "1", "--device", DEVICE])
    assert bench_cli.main(args) == 0
    loaded = TraceSet.load(tmp_path)
    runs = {(t.definition, t.solution, tuple(t.workload.axes.values())) for ts in loaded.traces.values() for t in ts}
    assert ("twice_h8", "twice_fast", (4,)) in runs
    assert {(s, m) for d, s, (m,) in runs if d == gemm.name} == {
        (f"{gemm.name}_{kind}", m) for kind in ("triton", "triton_tc") for m in (1, 4, 16, 64)
    }
    fresh = Registry()
    assert fresh.load_dataset(loaded, hardware=current_hardware(torch.device(DEVICE))) == 9
    assert fresh.solutions_of("twice_h8") and fresh.solutions_of(gemm.name)
    args.definitions = ["no_such_op"]
    assert bench_cli.main(args) == 1


@pytest.mark.skipif(not ON_GPU, reason="the bf16 catalog needs a GPU (the interpreter truncates bf16)")
def test_bench_cli_builtin_catalog_passes_on_gpu(tmp_path):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    names = ["rmsnorm_h4096", "fused_add_rmsnorm_h4096", "silu_and_mul_i14336", "gqa_paged_decode_h32_kv8_d128_ps1",
             "gemm_w4a16_g128_n4096_k14336", "gemm_w3a16_g128_n28672_k4096"]
    args = parser.parse_args(["--dataset", str(tmp_path), "--definitions", *names, "--rep-ms", "20"])
    assert bench_cli.main(args) == 0
