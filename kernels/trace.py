"""The FlashInfer Trace schema (flashinfer-bench v0.1.2) as plain dataclasses, and its on-disk layout.

A Definition names an op and its tensors by axis; a Workload binds the variable axes and says how to make each
input; a Solution is an implementation with an entry point; an Evaluation is one solution run on one workload.
Field names and JSON layout follow the schema, so records can move between treadle and FlashInfer-Bench:

    root/definitions/<op_type>/<name>.json
    root/solutions/<definition>/<name>.json
    root/workloads/<definition>.jsonl      Traces without solution and evaluation
    root/traces/<definition>.jsonl         Traces with both
    root/blob/workloads/...                safetensors inputs that workloads point to

Every record is checked when built from JSON: unknown or missing fields, bad enums, dangling axis names and
unsafe paths raise ValueError naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

AxisType = Literal["const", "var"]
Language = Literal["python", "triton", "cpp", "cuda", "tilelang"]
InputType = Literal["random", "scalar", "safetensors"]
Status = Literal[
    "PASSED",
    "INCORRECT_SHAPE",
    "INCORRECT_NUMERICAL",
    "INCORRECT_DTYPE",
    "RUNTIME_ERROR",
    "COMPILE_ERROR",
    "TIMEOUT",
]
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float4_e2m1",
    "int64",
    "int32",
    "int16",
    "int8",
    "bool",
)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _check_name(value: str, what: str) -> None:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must be made of letters, digits, '_', '.' and '-'")


def _check_relative_path(path: str, what: str) -> None:
    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts:
        raise ValueError(f"{what} {path!r} must be a relative path without '..'")


@dataclass
class Axis:
    type: AxisType
    value: int | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if (self.type == "const") != (self.value is not None):
            raise ValueError("a const axis needs a value and a var axis must have none")


@dataclass
class TensorSpec:
    shape: list[str] | None  # None: a Python scalar; []: a 0-d tensor
    dtype: str
    description: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")


@dataclass
class Definition:
    name: str
    op_type: str
    axes: dict[str, Axis]
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    reference: str  # Python source with a top-level run(...) returning the outputs
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    constraints: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_name(self.name, "definition name")
        _check_name(self.op_type, "op_type")
        clash = set(self.inputs) & set(self.outputs)
        if clash:
            raise ValueError(f"definition {self.name}: names used as both input and output: {sorted(clash)}")
        for tensor_name, spec in {**self.inputs, **self.outputs}.items():
            for axis in spec.shape or []:
                if axis not in self.axes:
                    raise ValueError(f"definition {self.name}: {tensor_name} uses unknown axis {axis!r}")
        run = [n for n in ast.parse(self.reference).body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        if not run:
            raise ValueError(f"definition {self.name}: reference must define a top-level run(...)")

    @property
    def var_axes(self) -> list[str]:
        return [name for name, axis in self.axes.items() if axis.type == "var"]


@dataclass
class InputSpec:
    type: InputType
    value: int | float | bool | None = None  # scalar
    path: str | None = None  # safetensors, relative to the dataset root
    tensor_key: str | None = None

    def __post_init__(self) -> None:
        if self.type == "scalar" and self.value is None:
            raise ValueError("a scalar input needs a value")
        if self.type == "safetensors":
            if self.path is None or self.tensor_key is None:
                raise ValueError("a safetensors input needs path and tensor_key")
            _check_relative_path(self.path, "safetensors path")


@dataclass
class Workload:
    uuid: str
    axes: dict[str, int]
    inputs: dict[str, InputSpec]


@dataclass
class SourceFile:
    path: str
    content: str

    def __post_init__(self) -> None:
        _check_relative_path(self.path, "source path")


@dataclass
class BuildSpec:
    language: Language
    target_hardware: list[str]
    entry_point: str  # "file.py::function"; with no sources, the file is a module path inside the project
    dependencies: list[str] = field(default_factory=list)
    destination_passing_style: bool = True
    binding: Literal["tvm-ffi", "torch"] | None = None

    def __post_init__(self) -> None:
        if self.entry_point.count("::") != 1 or not all(self.entry_point.split("::")):
            raise ValueError(f"entry_point {self.entry_point!r} must be 'file::function'")


@dataclass
class Solution:
    name: str
    definition: str
    author: str
    spec: BuildSpec
    sources: list[SourceFile] = field(default_factory=list)
    description: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "solution name")
        _check_name(self.definition, "definition name")
        entry_file = self.spec.entry_point.split("::")[0]
        if self.sources and entry_file not in {s.path for s in self.sources}:
            raise ValueError(f"solution {self.name}: entry file {entry_file!r} is not among its sources")


@dataclass
class Correctness:
    max_relative_error: float
    max_absolute_error: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Performance:
    latency_ms: float
    reference_latency_ms: float
    speedup_factor: float  # reference / solution


@dataclass
class Environment:
    hardware: str
    libs: dict[str, str] = field(default_factory=dict)


@dataclass
class Evaluation:
    status: Status
    environment: Environment
    timestamp: str
    log: str = ""
    correctness: Correctness | None = None
    performance: Performance | None = None

    def __post_init__(self) -> None:
        needs = {"PASSED": (True, True), "INCORRECT_NUMERICAL": (True, False)}.get(self.status, (False, False))
        has = (self.correctness is not None, self.performance is not None)
        if has != needs:
            raise ValueError(f"status {self.status} needs correctness={needs[0]} and performance={needs[1]}")


@dataclass
class Trace:
    definition: str
    workload: Workload
    solution: str | None = None
    evaluation: Evaluation | None = None

    def __post_init__(self) -> None:
        if (self.solution is None) != (self.evaluation is None):
            raise ValueError("a trace has both a solution and an evaluation, or neither (a workload)")


def to_json(record: Any) -> dict:
    return dataclasses.asdict(record)


def from_json(cls: type, data: Any) -> Any:
    """Build dataclass `cls` from parsed JSON, checking every field against its type hint."""
    return _convert(cls, data, cls.__name__)


def _convert(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        missing = [
            n
            for n, f in fields.items()
            if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        try:
            return tp(**{n: _convert(hints[n], v, f"{where}.{n}") for n, v in data.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if origin is Literal:
        if data not in typing.get_args(tp):
            raise ValueError(f"{where}: {data!r} is not one of {typing.get_args(tp)}")
        return data
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, data, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {data!r} matches none of {args}")
    if origin is list:
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list")
        return [_convert(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object")
        value_type = typing.get_args(tp)[1]
        return {str(k): _convert(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if tp is Any:
        return data
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if tp in (int, float, str, bool) and (type(data) is not tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {data!r}")
    return data


@dataclass
class TraceSet:
    """Every record under one dataset root."""

    root: Path
    definitions: dict[str, Definition] = field(default_factory=dict)
    solutions: dict[str, Solution] = field(default_factory=dict)
    workloads: dict[str, list[Trace]] = field(default_factory=dict)  # by definition
    traces: dict[str, list[Trace]] = field(default_factory=dict)  # by definition

    @classmethod
    def load(cls, root: str | Path) -> TraceSet:
        """Read a dataset root; a missing root is an empty set."""
        ts = cls(Path(root))
        for path in sorted(ts.root.glob("definitions/**/*.json")):
            d = _read(Definition, path)
            ts.definitions[d.name] = d
        for path in sorted(ts.root.glob("solutions/**/*.json")):
            s = _read(Solution, path)
            ts.solutions[s.name] = s
        for kind in ("workloads", "traces"):
            for path in sorted(ts.root.glob(f"{kind}/**/*.jsonl")):
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if line.strip():
                        t = _parse(Trace, line, f"{path}:{n}")
                        getattr(ts, kind).setdefault(t.definition, []).append(t)
        return ts

    def save_definition(self, d: Definition) -> None:
        _write_json(self.root / "definitions" / d.op_type / f"{d.name}.json", to_json(d))
        self.definitions[d.name] = d

    def save_solution(self, s: Solution) -> None:
        _write_json(self.root / "solutions" / s.definition / f"{s.name}.json", to_json(s))
        self.solutions[s.name] = s

    def append(self, traces: list[Trace]) -> None:
        """Append to workloads/ (traces without an evaluation) or traces/, one JSON line each."""
        for t in traces:
            kind = "traces" if t.evaluation is not None else "workloads"
            _check_name(t.definition, "definition name")
            path = self.root / kind / f"{t.definition}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(to_json(t)) + "\n")
            getattr(self, kind).setdefault(t.definition, []).append(t)


def _parse(cls: type, text: str, where: str) -> Any:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    try:
        return from_json(cls, data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _read(cls: type, path: Path) -> Any:
    return _parse(cls, path.read_text(), str(path))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
