"""Kernel registry: Definitions and Solutions of the Trace schema, and `apply()`, which runs each op with the
best solution measured for the nearest shape, or with the reference when none is known.

Evaluations (from `treadle kernels bench`, see bench_cli) are loaded per hardware: a solution counts for a
workload only if it PASSED there within the tolerances of ApplyConfig and beat the reference. Shapes are keyed
by the definition's var axes; a call whose key was never measured uses the winner of the nearest measured key
(distance in log2 of each var axis), so M = 3 is served like the measured M = 4, not sent to the reference.

While `recording(dataset)` is active, every new var-axes key that `apply()` sees is written to the dataset as
a Workload (FlashInfer's dump_int32 policy: floating inputs become "random", integer ones, such as page
indices, are saved as safetensors), which is how the engine records the shapes it actually serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .trace import Definition, InputSpec, Solution, Trace, TraceSet, Workload

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "bool": torch.bool,
}
RANDOM_INPUTS_TAG = "inputs:random"  # every input may be drawn at random (e.g. bit-packed weights)


@dataclass
class ApplyConfig:
    """Which evaluations may steer apply(). FlashInfer's default max_rtol (1e-5) rejects nearly every fp16/bf16
    trace, since relative error explodes near zero, so both default to the benchmark's own 1e-2."""

    max_atol: float = 1e-2
    max_rtol: float = 1e-2


def current_hardware(device: torch.device | str | None = None) -> str:
    """The `environment.hardware` string evaluations are recorded under and matched against."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        return torch.cuda.get_device_name(dev)
    return "cpu"


def bind_inputs(d: Definition, args: tuple, kwargs: dict) -> list[Any]:
    """Positional and keyword arguments -> the definition's inputs, in order."""
    names = list(d.inputs)
    if len(args) > len(names):
        raise TypeError(f"{d.name} takes {len(names)} inputs, got {len(args)}")
    values = list(args)
    for name in names[len(args) :]:
        if name not in kwargs:
            raise TypeError(f"{d.name}: missing input {name!r}")
        values.append(kwargs.pop(name))
    if kwargs:
        raise TypeError(f"{d.name}: unexpected inputs {sorted(kwargs)}")
    return values


def bind_axes(d: Definition, values: list[Any]) -> dict[str, int]:
    """Every axis value, read off the input tensors' shapes (var axes) or the definition (const axes)."""
    axes = {name: axis.value for name, axis in d.axes.items() if axis.type == "const"}
    for (name, spec), value in zip(d.inputs.items(), values, strict=True):
        if spec.shape is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != len(spec.shape):
            raise ValueError(f"{d.name}: input {name} must be a {len(spec.shape)}-d tensor")
        if value.dtype != TORCH_DTYPES[spec.dtype]:
            raise ValueError(f"{d.name}: input {name} must be {spec.dtype}, got {value.dtype}")
        for axis, size in zip(spec.shape, value.shape, strict=True):
            if axes.setdefault(axis, size) != size:
                raise ValueError(f"{d.name}: axis {axis} is {axes[axis]} but {name} has {size}")
    return axes


def shape_key(d: Definition, axes: dict[str, int]) -> tuple[int, ...]:
    return tuple(axes[a] for a in d.var_axes)


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b, strict=True))


class Registry:
    def __init__(self) -> None:
        self.definitions: dict[str, Definition] = {}
        self.solutions: dict[str, Solution] = {}
        self._references: dict[str, Callable] = {}
        self._implementations: dict[str, Callable] = {}
        self._table: dict[str, dict[tuple[int, ...], tuple[str | None, float]]] = {}
        self._choices: dict[tuple[str, tuple[int, ...]], Callable] = {}
        self._recorder: _Recorder | None = None

    def add_definition(self, d: Definition) -> None:
        self.definitions[d.name] = d

    def add_solution(self, s: Solution) -> None:
        if s.definition not in self.definitions:
            raise ValueError(f"solution {s.name}: unknown definition {s.definition!r}")
        self.solutions[s.name] = s

    def solutions_of(self, definition: str) -> list[Solution]:
        return [s for s in self.solutions.values() if s.definition == definition]

    def definition(self, name: str) -> Definition:
        if name not in self.definitions:
            raise KeyError(f"unknown kernel definition {name!r}")
        return self.definitions[name]

    def reference(self, name: str) -> Callable:
        """The definition's reference `run`, compiled once from its source."""
        if name not in self._references:
            namespace: dict[str, Any] = {}
            exec(compile(self.definition(name).reference, f"<reference {name}>", "exec"), namespace)
            self._references[name] = namespace["run"]
        return self._references[name]

    def implementation(self, solution: str) -> Callable:
        """The solution's entry point as a value-returning function of the definition's inputs."""
        if solution not in self._implementations:
            s = self.solutions[solution]
            fn = _load_entry_point(s)
            if s.spec.destination_passing_style:
                fn = _value_returning(self.definition(s.definition), fn)
            self._implementations[solution] = fn
        return self._implementations[solution]

    def load_evaluations(self, traces: Iterable[Trace], hardware: str, config: ApplyConfig | None = None) -> int:
        """Take in evaluated traces measured on `hardware`; returns how many qualified."""
        config = config or ApplyConfig()
        used = 0
        for t in traces:
            e = t.evaluation
            if e is None or e.status != "PASSED" or e.environment.hardware != hardware:
                continue
            if t.definition not in self.definitions or t.solution not in self.solutions:
                continue
            # Within either bound, every element passes the benchmark's elementwise test at these tolerances.
            c = e.correctness
            if c.max_absolute_error > config.max_atol and c.max_relative_error > config.max_rtol:
                continue
            key = shape_key(self.definitions[t.definition], t.workload.axes)
            table = self._table.setdefault(t.definition, {})
            best = table.get(key, (None, 1.0))  # the reference, at speedup 1, until a solution beats it
            if e.performance.speedup_factor > best[1]:
                table[key] = (t.solution, e.performance.speedup_factor)
            else:
                table.setdefault(key, best)
            used += 1
        self._choices.clear()
        return used

    def load_dataset(self, dataset: TraceSet, hardware: str | None = None, config: ApplyConfig | None = None) -> int:
        """Add a dataset's definitions and solutions, then its evaluations for `hardware` (default: this one)."""
        for d in dataset.definitions.values():
            self.add_definition(d)
        for s in dataset.solutions.values():
            self.add_solution(s)
        traces = [t for ts in dataset.traces.values() for t in ts]
        return self.load_evaluations(traces, hardware or current_hardware(), config)

    def choose(self, name: str, key: tuple[int, ...]) -> str | None:
        """The solution for `key`: the winner at the nearest measured key, or None for the reference."""
        table = self._table.get(name)
        if not table:
            return None
        nearest = min(table, key=lambda k: (_distance(k, key), k))
        return table[nearest][0]

    def apply(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run op `name` on the definition's inputs (positional in order, or by name)."""
        d = self.definition(name)
        values = bind_inputs(d, args, kwargs)
        axes = bind_axes(d, values)
        key = shape_key(d, axes)
        if self._recorder is not None:
            self._recorder.observe(d, axes, key, values)
        fn = self._choices.get((name, key))
        if fn is None:
            solution = self.choose(name, key)
            fn = self.reference(name) if solution is None else self.implementation(solution)
            self._choices[name, key] = fn
        return fn(*values)

    @contextlib.contextmanager
    def recording(self, dataset: TraceSet) -> Iterator[None]:
        """Record a Workload for every new shape key apply() sees, into `dataset`."""
        self._recorder = _Recorder(dataset)
        try:
            yield
        finally:
            self._recorder = None


class _Recorder:
    def __init__(self, dataset: TraceSet) -> None:
        self.dataset = dataset
        self.seen = {(name, shape_key(self._def(name), t.workload.axes)) for name, ts in dataset.workloads.items()
                     for t in ts if name in dataset.definitions}

    def _def(self, name: str) -> Definition:
        return self.dataset.definitions[name]

    def observe(self, d: Definition, axes: dict[str, int], key: tuple[int, ...], values: list[Any]) -> None:
        if (d.name, key) in self.seen:
            return
        self.seen.add((d.name, key))
        if d.name not in self.dataset.definitions:
            self.dataset.save_definition(d)
        wid = str(uuid.uuid4())
        blob_path = f"blob/workloads/{d.name}/{wid}.safetensors"
        inputs, dumped = {}, {}
        for (name, spec), value in zip(d.inputs.items(), values, strict=True):
            if spec.shape is None:
                inputs[name] = InputSpec("scalar", value=value)
            elif RANDOM_INPUTS_TAG in d.tags or value.is_floating_point():
                inputs[name] = InputSpec("random")
            else:
                inputs[name] = InputSpec("safetensors", path=blob_path, tensor_key=name)
                dumped[name] = value.detach().cpu().contiguous()
        if dumped:
            (self.dataset.root / blob_path).parent.mkdir(parents=True, exist_ok=True)
            save_file(dumped, str(self.dataset.root / blob_path))
        workload = Workload(wid, {a: axes[a] for a in d.var_axes}, inputs)
        self.dataset.append([Trace(d.name, workload)])


def _load_entry_point(s: Solution) -> Callable:
    """Import the entry point: from the solution's own sources, or from the project when it has none."""
    if s.spec.language not in ("python", "triton"):
        raise ValueError(f"solution {s.name}: {s.spec.language} solutions cannot be loaded here")
    file, func = s.spec.entry_point.split("::")
    if not s.sources:
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    else:
        # Triton reads kernel source from files, so sources are written out and imported from there.
        digest = hashlib.sha1(repr([(f.path, f.content) for f in s.sources]).encode()).hexdigest()[:16]
        root = Path(tempfile.gettempdir()) / f"treadle-solutions-{os.getuid()}" / digest
        for f in s.sources:
            (root / f.path).parent.mkdir(parents=True, exist_ok=True)
            (root / f.path).write_text(f.content)
        name = f"treadle_solution_{digest}"
        spec = importlib.util.spec_from_file_location(name, root / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    if not hasattr(module, func):
        raise ValueError(f"solution {s.name}: {file} has no function {func!r}")
    return getattr(module, func)


def _value_returning(d: Definition, fn: Callable) -> Callable:
    """Wrap a destination-passing entry point (outputs as trailing arguments) into a value-returning one."""

    def call(*values: Any) -> Any:
        axes = bind_axes(d, list(values))
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        outs = [
            torch.empty([axes[a] for a in spec.shape], dtype=TORCH_DTYPES[spec.dtype], device=device)
            for spec in d.outputs.values()
        ]
        fn(*values, *outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return call


def default_dataset_root() -> Path:
    """Where `treadle kernels bench` writes and apply() reads: $TREADLE_KERNEL_DATASET or ~/.cache/treadle/kernels."""
    return Path(os.environ.get("TREADLE_KERNEL_DATASET") or Path.home() / ".cache" / "treadle" / "kernels")


REGISTRY = Registry()
_enabled = False


def enable_apply(root: str | Path | None = None, config: ApplyConfig | None = None) -> int:
    """Let apply() use the evaluations stored under `root` (default: default_dataset_root()) for this hardware;
    returns how many qualified. Without it (or TREADLE_ENABLE_APPLY=1), apply() runs every op's reference."""
    global _enabled
    from . import catalog  # noqa: F401  (registers the built-in definitions and solutions)

    _enabled = True
    return REGISTRY.load_dataset(TraceSet.load(root or default_dataset_root()), config=config)


def apply(name: str, *args: Any, **kwargs: Any) -> Any:
    """`REGISTRY.apply` on the process-wide registry, which holds the built-in catalog (catalog.py)."""
    if not _enabled:
        if os.environ.get("TREADLE_ENABLE_APPLY") == "1":
            enable_apply()
        else:
            from . import catalog  # noqa: F401
    return REGISTRY.apply(name, *args, **kwargs)
