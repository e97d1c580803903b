"""The tensor-core GEMV of `quant_mma.cu` for few tokens (M <= 16): build, load and launch from Python.

Why CUDA C++ rather than Triton: the kernel decodes codes into registers and hands them straight to
mma.sync as the A operand, which a Triton dot cannot take without a round trip through shared memory.

How it is run: NVRTC (cuda-python's `cuda.bindings.nvrtc`) compiles the source for the device's own
architecture the first time a variant is used, and the driver API (`cuda.bindings.driver`) loads the cubin and
launches it on torch's current stream, so it is captured by CUDA graphs like any other launch. Both come from
PyPI (`cuda-bindings`; NVRTC's library from `nvidia-cuda-nvrtc`, which CUDA builds of torch already install),
so no CUDA toolkit, C++ compiler or torch extension build is needed at run time; without them `usable()` is
False and quant_matmul keeps the Triton kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .quantize import QuantizedWeight

SOURCE = Path(__file__).with_name("quant_mma.cu")
CACHE = Path.home() / ".cache" / "treadle" / "quant_mma"
KERNEL = b"quant_mma_gemv"
MAX_M = 16  # two tiles of 8 tokens (the MMA's N side)
STEP = 128  # codes along K per warp step: 4 lanes x 32-code chunks


@dataclass(frozen=True)
class MmaConfig:
    """Launch shape: `warps` per block split K (each block owns 32 columns); `stages` steps of loads in flight per
    warp, in registers, while one is computed; `min_blocks` blocks per SM the register allocation must allow (2
    caps registers at 128). H100 sweeps (docs/benchmarks.md) favour one stage: registers buy more warps.
    `pdl`: programmatic dependent launch where the GPU has it (sm_90+), so that back-to-back GEMVs overlap one's
    tail with the next one's start; 0 off, else the next grid may launch once this one's blocks are past their
    wait (1), their main loops (2) or have started (3: three grids in flight; quant_mma.cu says why each stays
    correct). `preload` (with pdl): each warp loads its first steps' weights, scales and minimums before waiting
    for the previous grid, only x after, so a block scheduled beside a draining grid already streams its
    weights (ptxas keeps that order only with pdl 3); the weights must therefore not be written by the kernels
    just before in the stream (they are written at load time). `load_only` is a diagnostic for benchmarks:
    every load kept, decode and MMA skipped, the output meaningless. `source`: another copy of quant_mma.cu to
    build this launch from (a benchmark's A/B against an older kernel in the same run); empty: SOURCE.
    Up to 16 warps (9-16 with one block per SM: registers capped at 128)."""

    warps: int = 8
    stages: int = 1
    min_blocks: int = 1
    pdl: int = 0
    load_only: bool = False
    preload: bool = False
    source: str = ""


@dataclass(frozen=True)
class Variant:
    """One compiled instance of the source (its -D parameters)."""

    bits: int
    bf16: bool
    layout: int  # QuantizedWeight.block_n: 0 flat, else columns per row block
    token_tiles: int
    stages: int
    min_blocks: int
    pdl: int = 0
    load_only: bool = False
    max_threads: int = 256
    preload: bool = False
    source: str = ""  # the .cu file, empty: SOURCE

    def defines(self) -> list[str]:
        return [f"-DQM_BITS={self.bits}", f"-DQM_BF16={int(self.bf16)}", f"-DQM_BLOCKED={self.layout}",
                f"-DQM_NT={self.token_tiles}", f"-DQM_STAGES={self.stages}", f"-DQM_MIN_BLOCKS={self.min_blocks}",
                f"-DQM_PDL={int(self.pdl)}", f"-DQM_LOAD_ONLY={int(self.load_only)}",
                f"-DQM_MAX_THREADS={self.max_threads}", f"-DQM_PRELOAD={int(self.preload)}"]


@functools.cache
def _bindings():
    """cuda-python's driver and NVRTC modules, or None where they are not installed."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        return None
    return driver, nvrtc


def available(device: torch.device | str = "cuda") -> bool:
    """An NVIDIA GPU with bf16 mma.sync (sm_80+) and cuda-python to build and launch the kernel."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 0) and _bindings() is not None)


def shape_supported(m: int, qw: QuantizedWeight) -> bool:
    """Whether M and the weight's shape and layout suit the kernel (dtypes and alignment aside)."""
    return (1 <= m <= MAX_M and qw.in_features % STEP == 0 and qw.group_size % STEP == 0
            and (qw.block_n in (16, 32, 64) or (qw.block_n == 0 and qw.out_features % 4 == 0)))


def unsupported_reason(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> str | None:
    """Why this kernel cannot compute x @ W_hat, or None when it can."""
    if not available(x.device):
        return "needs an NVIDIA GPU of sm_80 or newer (mma.sync with bf16) and cuda-python (cuda-bindings)"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "activations must be bf16 or fp16"
    if qw.scales.dtype != x.dtype or qw.mins.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "scales, minimums and bias must have the activations' dtype"
    if not shape_supported(x.shape[0], qw):
        return (f"needs M <= {MAX_M}, in_features and group_size multiples of {STEP}, and the weight row-blocked "
                "by 16, 32 or 64 columns or flat with out_features a multiple of 4")
    if x.stride(1) != 1 or x.stride(0) % 8 or any(t.data_ptr() % 16 for t in (x, qw.packed, qw.scales, qw.mins)):
        return "x rows and the weight's arrays must be 16-byte aligned"
    return None


def usable(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> bool:
    return unsupported_reason(x, qw, bias) is None


def _check(result, what: str):
    """cuda-python returns (status, *values); raise on a failed status, return the values."""
    status, *values = result
    if int(status) != 0:
        raise RuntimeError(f"{what} failed: {status!r}")
    return values[0] if len(values) == 1 else values


def compile_cubin(variant: Variant, arch: str) -> bytes:
    """NVRTC-compile the source (the variant's file, else SOURCE) for `arch` (e.g. "sm_90") with the variant's
    parameters. Cubins are kept on disk under ~/.cache/treadle/quant_mma, keyed by source, parameters,
    architecture and NVRTC version."""
    _, nvrtc = _bindings()
    source = Path(variant.source or SOURCE).read_bytes()
    opts = [f"--gpu-architecture={arch}", "-std=c++17"] + variant.defines()
    version = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    key = hashlib.sha256(source + repr((opts, version)).encode()).hexdigest()[:32]
    path = CACHE / f"{key}.cubin"
    if path.exists():
        return path.read_bytes()
    prog = _check(nvrtc.nvrtcCreateProgram(source, b"quant_mma.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if int(status) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed on {variant}:\n{log.decode(errors='replace')}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cubin)
    tmp.replace(path)  # atomic: concurrent compilers of one variant write the same bytes
    return cubin


_thread = threading.local()
_lock = threading.Lock()
_functions: dict[tuple[Variant, int, bytes], object] = {}


def _ensure_context(device: int) -> None:
    """The driver API launches into the calling thread's current context: make it the device's primary context
    (the one torch uses) where the thread has none yet, as Triton's launcher does."""
    if getattr(_thread, "device", None) == device:
        return
    driver, _ = _bindings()
    _check(driver.cuInit(0), "cuInit")
    ctx = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if not int(ctx):
        dev = _check(driver.cuDeviceGet(device), "cuDeviceGet")
        _check(driver.cuCtxSetCurrent(_check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")),
               "cuCtxSetCurrent")
    _thread.device = device


def _function(variant: Variant, device: int, name: bytes = KERNEL):
    key = (variant, device, name)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            fn = _functions.get(key)
            if fn is None:
                driver, _ = _bindings()
                major, minor = torch.cuda.get_device_capability(device)
                module = _check(driver.cuModuleLoadData(compile_cubin(variant, f"sm_{major}{minor}")),
                                "cuModuleLoadData")
                fn = _functions[key] = _check(driver.cuModuleGetFunction(module, name), "cuModuleGetFunction")
    return fn


def quant_mma_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, config: MmaConfig | None = None
) -> torch.Tensor:
    """x [M <= 16, in_features] (bf16/fp16) -> [M, out_features] in x.dtype, on tensor cores."""
    reason = unsupported_reason(x, qw, bias)
    if reason:
        raise ValueError(f"quant_mma: {reason}")
    cfg = config or MmaConfig()
    if (not 1 <= cfg.warps <= 16 or cfg.stages < 1 or cfg.min_blocks not in (1, 2) or cfg.pdl not in (0, 1, 2, 3)
            or (cfg.warps > 8 and cfg.min_blocks != 1) or (cfg.preload and not cfg.pdl)):
        raise ValueError(f"bad launch config {cfg}: 1-16 warps, 1+ stages, 1 or 2 blocks per SM (1 above 8 warps), "
                         "pdl 0-3, preload only with pdl")
    m, n = x.shape[0], qw.out_features
    tiles = -(-m // 8)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    pdl = cfg.pdl if torch.cuda.get_device_capability(device) >= (9, 0) else 0
    variant = Variant(qw.bits, x.dtype == torch.bfloat16, qw.block_n, tiles, cfg.stages, cfg.min_blocks, pdl,
                      cfg.load_only, 512 if cfg.warps > 8 else 256, cfg.preload and pdl > 0, cfg.source)
    _ensure_context(device)
    fn = _function(variant, device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    driver, _ = _bindings()
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    args = (
        (qw.packed.data_ptr(), qw.scales.data_ptr(), qw.mins.data_ptr(), x.data_ptr(),
         bias.data_ptr() if bias is not None else 0, out.data_ptr(), m, n, qw.in_features // STEP, qw.groups,
         (qw.group_size // STEP).bit_length() - 1, x.stride(0), out.stride(0)),
        (ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, i32, i32, i32),
    )
    grid = -(-n // 32)
    stream = driver.CUstream(torch.cuda.current_stream(x.device).cuda_stream)
    smem = cfg.warps * tiles * 8 * 32 * 4
    if pdl:
        launch = driver.CUlaunchConfig()
        launch.gridDimX, launch.gridDimY, launch.gridDimZ = grid, 1, 1
        launch.blockDimX, launch.blockDimY, launch.blockDimZ = 32 * cfg.warps, 1, 1
        launch.sharedMemBytes, launch.hStream = smem, stream
        launch.attrs, launch.numAttrs = [_pdl_attribute()], 1
        _check(driver.cuLaunchKernelEx(launch, fn, args, 0), "cuLaunchKernelEx")
    else:
        _check(driver.cuLaunchKernel(fn, grid, 1, 1, 32 * cfg.warps, 1, 1, smem, stream, args, 0),
               "cuLaunchKernel")
    return out


@functools.cache
def _pdl_attribute():
    """The launch attribute that lets this launch start before the previous kernel in the stream completes (the
    kernel's griddepcontrol.wait then orders what depends on it). Stream capture keeps it as a programmatic
    edge of the CUDA graph."""
    driver, _ = _bindings()
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    return attr


def stream_read(t: torch.Tensor, blocks: int, threads: int = 256, grid_stride: bool = False) -> None:
    """A benchmark's in-run ceiling: read every byte of `t` (16-byte aligned, a multiple of 16 bytes) and nothing
    else, over `blocks` blocks of `threads` threads, each block a contiguous share (or, with `grid_stride`, the
    grid sweeping the buffer together). Nothing is written."""
    if not available(t.device) or not t.is_contiguous() or t.data_ptr() % 16 or t.nbytes % 16:
        raise ValueError("stream_read needs a contiguous, 16-byte aligned CUDA tensor of whole 16-byte vectors")
    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    _ensure_context(device)
    fn = _function(Variant(4, True, 16, 1, 1, 1), device, b"stream_read")
    n = t.nbytes // 16
    sink = _sink(device)
    driver, _ = _bindings()
    args = ((t.data_ptr(), n, -(-n // blocks), int(grid_stride), sink.data_ptr()),
            (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p))
    stream = driver.CUstream(torch.cuda.current_stream(t.device).cuda_stream)
    _check(driver.cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, stream, args, 0), "cuLaunchKernel")


@functools.cache
def _sink(device: int) -> torch.Tensor:
    return torch.zeros(4, dtype=torch.int32, device=f"cuda:{device}")
