"""The built-in kernel catalog: Definitions for treadle's ops, their torch references, and the Solutions that
implement them, plus the example workloads `treadle kernels bench` runs when a dataset holds none.

Definitions follow FlashInfer's naming (`{op_type}_{props}_{constants}`) and tensor names. Each solution entry
point below adapts one kernel of this package to its definition's signature (inputs in order, outputs
returned); apply() and the benchmark call nothing else. References are self-contained source, as the schema
requires, so an exported definition means the same thing anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import triton

from .registry import REGISTRY, Registry
from .trace import Axis, BuildSpec, Definition, InputSpec, Solution, TensorSpec, Workload

HERE = "treadle/kernels/catalog.py"

_RMSNORM_REF = """
import torch

def run(hidden_states, weight, eps):
    x = hidden_states.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden_states.dtype)
    return weight * normed
"""

_FUSED_ADD_RMSNORM_REF = """
import torch

def run(hidden_states, residual, weight, eps):
    summed = hidden_states + residual
    x = summed.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden_states.dtype)
    return weight * normed, summed
"""

_SILU_AND_MUL_REF = """
import torch

def run(x):
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
"""

_GEMM_WNA16_REF = """
import torch

def run(x, qweight, scales, mins, bits, group_size):
    # qweight column n is the little-endian bitstream of the b-bit codes along K: code k at bits [k*b, k*b+b).
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    k_pad, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    chunks = words.view(k_pad // 32, bits, n)
    codes = []
    for e in range(32):
        j, s = divmod(e * bits, 32)
        v = chunks[:, j] >> s
        if s + bits > 32:
            v = v | (chunks[:, j + 1] << (32 - s))
        codes.append(v & ((1 << bits) - 1))
    q = torch.stack(codes, 1).reshape(k_pad // group_size, group_size, n).float()
    w = (q * scales.float()[:, None] + mins.float()[:, None]).reshape(k_pad, n)
    return (x.float() @ w[: x.shape[1]]).to(x.dtype)
"""

_GQA_PAGED_DECODE_REF = """
import math
import torch

def run(q, k_cache, v_cache, kv_indptr, kv_indices, sm_scale):
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    bounds = kv_indptr.tolist()
    for b in range(q.shape[0]):
        slots = kv_indices[bounds[b] : bounds[b + 1]].long()
        if slots.numel() == 0:
            continue
        k = k_cache[slots].float().repeat_interleave(group, dim=1)
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,khd->hk", q[b].float(), k) * sm_scale
        lse[b] = torch.logsumexp(s, -1)
        out[b] = torch.einsum("hk,khd->hd", torch.softmax(s, -1), v).to(q.dtype)
    return out, lse
"""


def _t(shape: list[str] | None, dtype: str = "bfloat16") -> TensorSpec:
    return TensorSpec(shape, dtype)


def _solution(definition: str, name: str, entry: str, language: str, description: str) -> Solution:
    spec = BuildSpec(language, ["cuda"], f"{HERE}::{entry}", destination_passing_style=False)
    return Solution(name, definition, "treadle", spec, description=description)


def _suffix(dtype: str) -> str:
    """Definitions default to bfloat16, the serving dtype on GPU; other dtypes are named apart."""
    return "" if dtype == "bfloat16" else f"_{dtype}"


def rmsnorm_definition(hidden: int, dtype: str = "bfloat16") -> Definition:
    return Definition(
        f"rmsnorm_h{hidden}{_suffix(dtype)}",
        "rmsnorm",
        {"batch_size": Axis("var"), "hidden_size": Axis("const", hidden)},
        {
            "hidden_states": _t(["batch_size", "hidden_size"], dtype),
            "weight": _t(["hidden_size"], dtype),
            "eps": _t(None, "float32"),
        },
        {"output": _t(["batch_size", "hidden_size"], dtype)},
        _RMSNORM_REF,
        tags=["stage:decode", "stage:prefill"],
    )


def fused_add_rmsnorm_definition(hidden: int, dtype: str = "bfloat16") -> Definition:
    rows = ["batch_size", "hidden_size"]
    return Definition(
        f"fused_add_rmsnorm_h{hidden}{_suffix(dtype)}",
        "fused_add_rmsnorm",
        {"batch_size": Axis("var"), "hidden_size": Axis("const", hidden)},
        {
            "hidden_states": _t(rows, dtype),
            "residual": _t(rows, dtype),
            "weight": _t(["hidden_size"], dtype),
            "eps": _t(None, "float32"),
        },
        {"output": _t(rows, dtype), "residual_out": _t(rows, dtype)},
        _FUSED_ADD_RMSNORM_REF,
        tags=["stage:decode", "stage:prefill", "fused"],
    )


def silu_and_mul_definition(intermediate: int, dtype: str = "bfloat16") -> Definition:
    return Definition(
        f"silu_and_mul_i{intermediate}{_suffix(dtype)}",
        "silu_and_mul",
        {"batch_size": Axis("var"), "gate_up_size": Axis("const", 2 * intermediate),
         "intermediate_size": Axis("const", intermediate)},
        {"x": _t(["batch_size", "gate_up_size"], dtype)},
        {"output": _t(["batch_size", "intermediate_size"], dtype)},
        _SILU_AND_MUL_REF,
        tags=["stage:decode", "stage:prefill", "fused"],
    )


def gemm_wna16_definition(bits: int, group_size: int, n: int, k: int, dtype: str = "bfloat16") -> Definition:
    """y = x @ W_hat for the packed format of quant_pack/quantize (see QuantizedWeight)."""
    k_pad = -(-k // group_size) * group_size
    return Definition(
        f"gemm_w{bits}a16_g{group_size}_n{n}_k{k}{_suffix(dtype)}",
        "gemm_wNa16",
        {
            "M": Axis("var"),
            "N": Axis("const", n),
            "K": Axis("const", k),
            "packed_rows": Axis("const", k_pad * bits // 32),
            "groups": Axis("const", k_pad // group_size),
        },
        {
            "x": _t(["M", "K"], dtype),
            "qweight": _t(["packed_rows", "N"], "int32"),
            "scales": _t(["groups", "N"], dtype),
            "mins": _t(["groups", "N"], dtype),
            "bits": _t(None, "int32"),
            "group_size": _t(None, "int32"),
        },
        {"output": _t(["M", "N"], dtype)},
        _GEMM_WNA16_REF,
        tags=["quantization:wNa16", f"quantization:bits={bits}", f"quantization:group_size={group_size}",
              "inputs:random"],
        description=f"weight-only {bits}-bit matmul, group-wise scale and minimum (w = q * scale + min)",
    )


def gqa_paged_decode_definition(
    num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16"
) -> Definition:
    return Definition(
        f"gqa_paged_decode_h{num_qo_heads}_kv{num_kv_heads}_d{head_dim}_ps1{_suffix(dtype)}",
        "gqa_paged",
        {
            "batch_size": Axis("var"),
            "num_slots": Axis("var"),
            "len_indptr": Axis("var"),
            "num_kv_indices": Axis("var"),
            "num_qo_heads": Axis("const", num_qo_heads),
            "num_kv_heads": Axis("const", num_kv_heads),
            "head_dim": Axis("const", head_dim),
        },
        {
            "q": _t(["batch_size", "num_qo_heads", "head_dim"], dtype),
            "k_cache": _t(["num_slots", "num_kv_heads", "head_dim"], dtype),
            "v_cache": _t(["num_slots", "num_kv_heads", "head_dim"], dtype),
            "kv_indptr": _t(["len_indptr"], "int32"),
            "kv_indices": _t(["num_kv_indices"], "int32"),
            "sm_scale": _t(None, "float32"),
        },
        {
            "output": _t(["batch_size", "num_qo_heads", "head_dim"], dtype),
            "lse": _t(["batch_size", "num_qo_heads"], "float32"),
        },
        _GQA_PAGED_DECODE_REF,
        tags=["stage:decode"],
        constraints=["len_indptr == batch_size + 1", "num_kv_indices >= kv_indptr[-1]"],
        description="one query token per sequence over its KV slots (page size 1: kv_indices are slots)",
    )


# Solution entry points: one kernel each, in its definition's signature.


def rmsnorm_triton(hidden_states, weight, eps):
    from .norm import rmsnorm

    return rmsnorm(hidden_states, weight, eps)[0]


def rmsnorm_torch(hidden_states, weight, eps):
    return torch.nn.functional.rms_norm(hidden_states, weight.shape, weight, eps)


def fused_add_rmsnorm_triton(hidden_states, residual, weight, eps):
    from .norm import rmsnorm

    return rmsnorm(hidden_states, weight, eps, residual)


def silu_and_mul_triton(x):
    from .activation import silu_and_mul

    return silu_and_mul(x)


def _quantized(qweight, scales, mins, bits, group_size, k):
    from .quantize import QuantizedWeight

    return QuantizedWeight(qweight, scales, mins, int(bits), int(group_size), k, qweight.shape[1])


def gemm_wna16_triton(x, qweight, scales, mins, bits, group_size):
    from .quant_matmul import quant_matmul

    return quant_matmul(x, _quantized(qweight, scales, mins, bits, group_size, x.shape[1]))


def gemm_wna16_triton_tensor_core(x, qweight, scales, mins, bits, group_size):
    from .quant_matmul import QuantMatmulConfig, _num_sms, quant_matmul, with_split_k

    qw = _quantized(qweight, scales, mins, bits, group_size, x.shape[1])
    block_m = max(16, min(64, triton.next_power_of_2(x.shape[0])))
    cfg = QuantMatmulConfig(True, block_m, 64, qw.group_size // 32, 1, 4, 3)
    return quant_matmul(x, qw, config=with_split_k(cfg, x.shape[0], qw.out_features, qw, 2 * _num_sms(x.device)))


def gemm_wna16_cuda_mma(x, qweight, scales, mins, bits, group_size):
    from .quant_matmul import _num_sms, mma_config
    from .quant_mma import quant_mma_matmul

    qw = _quantized(qweight, scales, mins, bits, group_size, x.shape[1])
    return quant_mma_matmul(x, qw, config=mma_config(x.shape[0], qw.out_features, _num_sms(x.device), qw.in_features,
                                                     qw.bits))


def gqa_paged_decode_triton(q, k_cache, v_cache, kv_indptr, kv_indices, sm_scale):
    from .attention_decode import decode_num_splits, paged_decode_attention

    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    splits = decode_num_splits(q.shape[0], k_cache.shape[1], sms)
    return paged_decode_attention(q, k_cache, v_cache, kv_indptr, kv_indices, sm_scale, num_splits=splits)


def register(registry: Registry, definition: Definition, solutions: list[tuple[str, str, str, str]]) -> None:
    """Add `definition` and its (name suffix, entry point, language, description) solutions, once."""
    if definition.name in registry.definitions:
        return
    registry.add_definition(definition)
    for suffix, entry, language, description in solutions:
        registry.add_solution(_solution(definition.name, f"{definition.name}_{suffix}", entry, language, description))


def register_gemm_wna16(
    registry: Registry, bits: int, group_size: int, n: int, k: int, dtype: str = "bfloat16"
) -> Definition:
    """The definition of this quantized matmul with its two Triton solutions (QuantLinear's shapes, say), and for
    16-bit activations the CUDA C++ tensor-core kernel (M <= 16)."""
    d = gemm_wna16_definition(bits, group_size, n, k, dtype)
    solutions = [
        ("triton", "gemm_wna16_triton", "triton", "quant_matmul with its default tiling (GEMV for small M)"),
        ("triton_tc", "gemm_wna16_triton_tensor_core", "triton", "quant_matmul, tensor-core kernel at every M"),
    ]
    if dtype in ("bfloat16", "float16"):
        solutions.append(("cuda_mma", "gemm_wna16_cuda_mma", "cuda",
                          "quant_mma.cu: codes decoded in registers into mma.sync, fp32 sums; M <= 16"))
    register(registry, d, solutions)
    return registry.definitions[d.name]


# Model shapes the catalog covers out of the box: Llama-3.1-8B and the embedded SmolLM2-135M.
MODELS = {
    "llama-3.1-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128},
    "smollm2-135m": {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64},
}
GEMM_BITS = (3, 4)


def register_builtin(registry: Registry) -> None:
    for m in MODELS.values():
        h, i = m["hidden"], m["intermediate"]
        register(registry, rmsnorm_definition(h), [
            ("triton", "rmsnorm_triton", "triton", "fused RMSNorm kernel (norm.py)"),
            ("torch", "rmsnorm_torch", "python", "torch.nn.functional.rms_norm"),
        ])
        register(registry, fused_add_rmsnorm_definition(h), [
            ("triton", "fused_add_rmsnorm_triton", "triton", "RMSNorm fused with the residual add (norm.py)"),
        ])
        register(registry, silu_and_mul_definition(i), [
            ("triton", "silu_and_mul_triton", "triton", "SiLU(gate) * up in one pass (activation.py)"),
        ])
        register(registry, gqa_paged_decode_definition(m["heads"], m["kv_heads"], m["head_dim"]), [
            ("triton", "gqa_paged_decode_triton", "triton", "split-KV paged decode attention (attention_decode.py)"),
        ])
        qkv = (m["heads"] + 2 * m["kv_heads"]) * m["head_dim"]
        for bits in GEMM_BITS:
            for n, k in ((qkv, h), (h, m["heads"] * m["head_dim"]), (2 * i, h), (h, i)):
                register_gemm_wna16(registry, bits, 128, n, k)


def example_workloads(d: Definition, blob_root: Path) -> list[Workload]:
    """Workloads to benchmark a catalog op besides those recorded: a few batch sizes, random inputs. Paged
    attention gets real index tensors (each sequence 1024 shuffled slots), saved under `blob_root`."""
    scalars: dict[str, float | int] = {"eps": 1e-5}
    for tag in d.tags:  # quantization:bits=4, quantization:group_size=128
        key, _, value = tag.removeprefix("quantization:").partition("=")
        if value and tag.startswith("quantization:"):
            scalars[key] = int(value)
    if d.op_type == "gqa_paged":
        return [_paged_decode_workload(d, b, 1024, blob_root) for b in (1, 16, 64)]
    if d.op_type not in ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "gemm_wNa16"):
        return []  # not a catalog op: only recorded workloads
    sizes = (1, 4, 16, 64) if d.op_type == "gemm_wNa16" else (1, 16, 256)
    workloads = []
    for size in sizes:
        inputs = {name: InputSpec("scalar", value=scalars[name]) if spec.shape is None else InputSpec("random")
                  for name, spec in d.inputs.items()}
        workloads.append(Workload(f"example-{d.name}-{size}", {d.var_axes[0]: size}, inputs))
    return workloads


def _paged_decode_workload(d: Definition, batch: int, context: int, blob_root: Path) -> Workload:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(batch)
    slots = batch * context
    indices = torch.randperm(slots, generator=gen).to(torch.int32)
    indptr = torch.arange(0, slots + 1, context, dtype=torch.int32)
    wid = f"example-{d.name}-{batch}x{context}"
    path = f"blob/workloads/{d.name}/{wid}.safetensors"
    (blob_root / path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"kv_indptr": indptr, "kv_indices": indices}, str(blob_root / path))
    inputs = {name: InputSpec("random") for name in ("q", "k_cache", "v_cache")}
    inputs["kv_indptr"] = InputSpec("safetensors", path=path, tensor_key="kv_indptr")
    inputs["kv_indices"] = InputSpec("safetensors", path=path, tensor_key="kv_indices")
    inputs["sm_scale"] = InputSpec("scalar", value=d.axes["head_dim"].value ** -0.5)
    axes = {"batch_size": batch, "num_slots": slots, "len_indptr": batch + 1, "num_kv_indices": slots}
    return Workload(wid, axes, inputs)


register_builtin(REGISTRY)
