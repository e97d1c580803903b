"""Weight-only quantized matmul: packing, the round-to-nearest quantizer and both Triton kernels.

The bitstream is checked against NumPy's packbits, the quantizer against the weight it started from, and the
kernels against fp64 torch matmuls of the dequantized weight. Without a GPU the kernels run under
TRITON_INTERPRET=1 on small odd shapes; on a GPU the same tests also run at Llama-3.1-8B shapes.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
from kernels_testing import DEVICE, ON_GPU, nan_allocations, rel_err
from treadle.kernels.quant_f16x2 import emulate, ptx
from treadle.kernels.quant_matmul import (
    GEMV_MAX_M,
    QuantMatmulConfig,
    default_config,
    mma_config,
    quant_matmul,
    quant_matmul_reference,
)
from treadle.kernels.quant_mma import (
    SOURCE,
    MmaConfig,
    Variant,
    available,
    quant_mma_matmul,
    unsupported_reason,
    usable,
)
from treadle.kernels.quant_pack import (
    SUPPORTED_BITS,
    from_row_blocks,
    pack_bits,
    to_row_blocks,
    unpack_bits,
)
from treadle.kernels.quantize import (
    dequantize,
    flat,
    quantization_error,
    quantize_rtn,
    row_blocked,
)

BITS = list(SUPPORTED_BITS)
# Output tolerance vs the fp64 product of the dequantized weight: one rounding to the activation dtype, plus
# fp32 accumulation (and the interpreter's truncating bf16 casts).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _ref64(x: torch.Tensor, qw, bias=None) -> torch.Tensor:
    y = x.double().cpu() @ dequantize(qw.to("cpu")).double()
    return y if bias is None else y + bias.double().cpu()


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_numpy_little_endian_bitstream(bits):
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (96, 5), generator=gen, dtype=torch.int32)
    packed = pack_bits(q, bits)
    assert packed.shape == (96 * bits // 32, 5) and packed.dtype == torch.int32
    for n in range(q.shape[1]):
        code_bits = (q[:, n].numpy()[:, None] >> np.arange(bits)) & 1  # LSB first, element after element
        words = np.packbits(code_bits.astype(np.uint8).ravel(), bitorder="little").view("<u4")
        assert np.array_equal(words, packed[:, n].numpy().view(np.uint32))
    assert torch.equal(unpack_bits(packed, bits), q)


@pytest.mark.parametrize("bits", BITS)
def test_f16x2_decode_plan_recovers_every_code(bits):
    """The packed-fp16 decode program (run in NumPy: the PTX itself needs a GPU) gives every code of random
    chunks exactly, including codes that straddle words and half-words."""
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (32 * 6, 9), generator=gen, dtype=torch.int32)
    q[:32, 0] = (1 << bits) - 1  # all ones: no field may leak into its neighbours
    words = pack_bits(q, bits).numpy().view(np.uint32).reshape(6, bits, 9).transpose(1, 0, 2)
    codes = emulate(words, bits).transpose(1, 0, 2).reshape(32 * 6, 9)
    assert np.array_equal(codes, q.numpy())
    asm, constraints = ptx(bits)
    assert constraints.count("r") == 1 + bits + 16 and asm.count("fma.rn.f16x2") == 12


def test_row_blocks_put_each_word_where_the_kernels_look():
    """Row r = (run * chunks + c) * words + j of column n sits in block n // B at ((run * words + j) * chunks + c)
    * B + n % B, the address `_word_ptrs` computes; the padding columns are zeros; the inverse restores it."""
    gen = torch.Generator().manual_seed(0)
    chunks, words, block, n = 4, 3, 8, 13
    t = torch.randint(-(2**31), 2**31 - 1, (2 * chunks * words, n), generator=gen, dtype=torch.int32)
    blocked = to_row_blocks(t, block, chunks, words)
    assert blocked.shape == (2, t.shape[0] * block)
    for r, col in itertools.product(range(t.shape[0]), range(n)):
        run, c, j = r // (chunks * words), r // words % chunks, r % words
        assert blocked[col // block, ((run * words + j) * chunks + c) * block + col % block] == t[r, col]
    assert not blocked[1].view(-1, block)[:, n % block:].any()
    assert torch.equal(from_row_blocks(blocked, n, block, chunks, words), t)
    with pytest.raises(ValueError, match="runs"):
        to_row_blocks(t[:5], block, chunks, words)


@pytest.mark.parametrize("block_n", [8, 16])
def test_row_blocked_weight_has_the_same_values(block_n):
    w = torch.randn(37, 200, generator=torch.Generator().manual_seed(block_n)).half()
    qw = quantize_rtn(w, 3, 64)
    blocked = quantize_rtn(w, 3, 64, block_n)
    assert blocked.block_n == block_n and blocked.packed.shape == (-(-37 // block_n), 256 * 3 // 32 * block_n)
    assert blocked.groups == qw.groups == 4 and blocked.padded_in_features == 256
    assert torch.equal(dequantize(blocked), dequantize(qw))
    back = flat(blocked)
    for a, b in zip((back.packed, back.scales, back.mins), (qw.packed, qw.scales, qw.mins)):
        assert torch.equal(a, b)
    assert row_blocked(row_blocked(qw, 16), block_n).packed.equal(blocked.packed)
    with pytest.raises(ValueError, match="power of two"):
        row_blocked(qw, 12)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(32, 1, dtype=torch.int32), 7)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bits(torch.zeros(33, 1, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="values"):
        pack_bits(torch.full((32, 1), 16, dtype=torch.int32), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
def test_quantizer_error_is_at_most_half_a_step(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    n, k, group = 24, 200, 64  # k not a multiple of the group: the last group is padded
    w = (torch.randn(n, k, generator=gen) * torch.logspace(-3, 0, n)[:, None]).to(dtype)
    w[3, :64] = 0.25  # a constant group
    qw = quantize_rtn(w, bits, group)
    assert qw.scales.dtype == dtype and qw.packed.shape == (256 * bits // 32, n)
    w_hat = dequantize(qw)
    assert w_hat.shape == (k, n)
    step = qw.scales.float().repeat_interleave(group, 0)[:k]
    err = (w_hat - w.float().t()).abs()
    assert (err <= step / 2 * (1 + 1e-6) + 1e-6 * w.float().t().abs()).all()
    assert float(err[:64, 3].max()) == 0.0
    stats = quantization_error(w, qw)
    assert stats.max_abs == pytest.approx(float(err.max()))
    assert 0 < stats.relative < 2.0 ** (1 - bits)


def test_quantizer_rejects_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(torch.randn(4, 64), 4, 48)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(torch.randn(4, 64), 1, 32)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(torch.full((4, 64), float("nan")), 4, 32)


def _case(bits: int, n: int, k: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    return quantize_rtn(w, bits, group).to(DEVICE)


# (M, config): the CUDA-core GEMV with and without split-K, rows over the block, words double- and
# triple-buffered in registers (several steps per split, a ragged last one), and the tensor-core kernel.
SMALL_CONFIGS = [
    (1, QuantMatmulConfig(False, 1, 32, 2, 1)),
    (3, QuantMatmulConfig(False, 4, 16, 1, 3)),
    (2, QuantMatmulConfig(False, 2, 16, 2, 2, 4, 1, prefetch=1)),
    (1, QuantMatmulConfig(False, 1, 16, 1, 2, 4, 1, prefetch=2)),
    (5, QuantMatmulConfig(True, 16, 16, 2, 2)),
]


@pytest.mark.parametrize("bits", BITS)
def test_quant_matmul_matches_fp64_reference(bits):
    """Odd N and K (K neither a multiple of 32 nor of the group): clamped tails, padding, masked stores."""
    dtype = torch.float16
    qw = _case(bits, n=37, k=200, group=64, dtype=dtype, seed=bits)
    for m, cfg in SMALL_CONFIGS:
        x = torch.randn(m, 200, device=DEVICE).to(dtype)
        with nan_allocations():
            out = quant_matmul(x, qw, config=cfg)
        assert out.shape == (m, 37) and out.dtype == dtype
        assert rel_err(out, _ref64(x, qw)) < TOL[dtype], (m, cfg)


# (M, config) on the row-blocked layout (block_n 8, 16 or 64): a program's columns one block, several blocks or
# part of one, words double-buffered, split-K with a ragged last split, and the tensor-core kernel across blocks.
BLOCKED_CONFIGS = [
    (1, QuantMatmulConfig(False, 1, 16, 4, 1, 4, 1, prefetch=1)),
    (2, QuantMatmulConfig(False, 2, 8, 2, 3)),
    (5, QuantMatmulConfig(True, 16, 32, 2, 2)),
]


@pytest.mark.parametrize("bits", BITS)
def test_quant_matmul_on_row_blocked_layout_matches_fp64_reference(bits):
    dtype = torch.float16
    qw = row_blocked(_case(bits, n=37, k=200, group=64, dtype=dtype, seed=bits), (8, 16, 64)[bits % 3])
    for m, cfg in BLOCKED_CONFIGS:
        x = torch.randn(m, 200, device=DEVICE).to(dtype)
        with nan_allocations():
            out = quant_matmul(x, qw, config=cfg)
        assert rel_err(out, _ref64(x, qw)) < TOL[dtype], (m, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dot", [False, True])
def test_quant_matmul_dtypes_bias_and_even_shapes(dtype, dot):
    if dot and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("Triton 3.6's interpreter miscomputes tl.dot on bf16 values cast in the kernel")
    qw = _case(5, n=64, k=128, group=32, dtype=dtype, seed=7)
    bias = torch.randn(64, device=DEVICE).to(dtype)
    x = torch.randn(4, 128, device=DEVICE).to(dtype)
    cfg = QuantMatmulConfig(dot, 16 if dot else 4, 32, 1 if dot else 2, 2)
    with nan_allocations():
        out = quant_matmul(x, qw, bias, config=cfg)
    assert rel_err(out, _ref64(x, qw, bias)) < TOL[dtype]
    assert rel_err(out, quant_matmul_reference(x, qw, bias)) < TOL[dtype]


def test_split_k_counters_are_reset_between_calls():
    qw = _case(4, n=32, k=256, group=32, dtype=torch.float32, seed=3)
    cfg = QuantMatmulConfig(False, 1, 32, 1, 4)
    for seed in range(3):
        x = torch.randn(1, 256, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        assert rel_err(quant_matmul(x, qw, config=cfg), _ref64(x, qw)) < TOL[torch.float32]


def test_quant_matmul_rejects_bad_input():
    qw = _case(4, n=8, k=64, group=32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="x must be"):
        quant_matmul(torch.randn(2, 63, device=DEVICE), qw)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        quant_matmul(torch.randn(2, 64, device=DEVICE).double(), qw)
    with pytest.raises(ValueError, match="bias"):
        quant_matmul(torch.randn(2, 64, device=DEVICE), qw, torch.zeros(7, device=DEVICE))
    assert quant_matmul(torch.randn(0, 64, device=DEVICE), qw).shape == (0, 8)


@pytest.mark.parametrize("block_n", [0, 8])
def test_default_config_fills_the_gpu(block_n):
    qw = row_blocked(_case(4, n=64, k=4096, group=128, dtype=torch.float32, seed=0), block_n)
    for m in (1, 4, 16, 64):
        cfg = default_config(m, 4096, qw, num_sms=132)
        assert cfg.dot == (m > GEMV_MAX_M)
        tiles = -(-4096 // cfg.block_n) * -(-m // cfg.block_m)
        assert tiles * cfg.split_k >= 132
        if block_n and not cfg.dot:  # a program streams whole rows of its columns: no split-K at 8B widths
            assert cfg.block_n % block_n == 0 and cfg.split_k == 1


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("block_n", [0, 8])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])
def test_quant_matmul_llama8b_shapes_on_gpu(bits, k, n, block_n):
    qw = row_blocked(_case(bits, n=n, k=k, group=128, dtype=torch.bfloat16, seed=bits), block_n)
    for m in (1, 2, 4, 16, 64):
        x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
        with nan_allocations():
            out = quant_matmul(x, qw)
        assert rel_err(out, _ref64(x, qw)) < TOL[torch.bfloat16], m


@pytest.mark.skipif(not ON_GPU, reason="the packed-fp16 decode is inline PTX")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_f16x2_gemv_matches_portable_gemv_on_gpu(bits, dtype):
    """Both GEMV decodes on the GPU at a real shape with a ragged K, activations far from 1 included, on both
    layouts."""
    qw = _case(bits, n=4096, k=4000, group=128, dtype=dtype, seed=bits)
    x = (torch.randn(1, 4000, device=DEVICE) * torch.logspace(-3, 2, 4000, device=DEVICE)).to(dtype)
    ref = _ref64(x, qw)
    for f16x2, block_n in itertools.product((True, False), (0, 8)):
        cfg = QuantMatmulConfig(False, 1, 256 if not block_n else 8, 2 if not block_n else 64, 8 if not block_n else 1,
                                4, 1, prefetch=1, f16x2=f16x2)
        with nan_allocations():
            out = quant_matmul(x, row_blocked(qw, block_n), config=cfg)
        assert rel_err(out, ref) < TOL[dtype], (f16x2, block_n)


# The CUDA C++ tensor-core kernel (quant_mma.cu): compiled here whenever nvcc is present, run on a GPU with
# cuda-python. The variants: every width in bf16 on the row-blocked layout, fp16 and the flat layout, two token
# tiles, two steps in flight, the register-capped build, programmatic dependent launch triggered early, late
# and at the start on both layouts (weights loaded before the wait in some), the load-only diagnostic, 512-thread
# blocks (16 warps), and row blocks of 32 and 64 columns.
MMA_VARIANTS = [Variant(b, True, 16, 1, 1, 1, b % 3 + 1) for b in BITS] + [
    Variant(3, False, 0, 2, 1, 1), Variant(8, False, 16, 1, 2, 1), Variant(4, True, 0, 1, 1, 2, 1, preload=True),
    Variant(4, True, 16, 2, 1, 2, 2, preload=True), Variant(4, True, 16, 1, 1, 1, 0, True),
    Variant(3, True, 16, 1, 1, 1, 1, False, 512, True), Variant(4, True, 16, 1, 1, 1, 3, False, 512, True),
    Variant(6, False, 16, 2, 1, 1, 0, False, 512), Variant(3, True, 32, 1, 1, 2, 3, preload=True),
    Variant(5, False, 64, 2, 1, 1),
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_mma_source_compiles_for_sm90_without_spills(tmp_path):
    for v in MMA_VARIANTS:
        res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "-Xptxas", "-v", *v.defines(), "-o",
                              str(tmp_path / "k.cubin"), str(SOURCE)], check=False, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, (v, res.stderr)
        assert "0 bytes spill stores" in res.stderr and "warning" not in res.stderr, (v, res.stderr)


def _cuobjdump() -> str | None:
    """The CUDA toolkit's disassembler, or the copy Triton ships."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or (str(bundled) if bundled.exists() else None)


@pytest.mark.skipif(shutil.which("nvcc") is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_mma_reads_x_only_after_the_grid_dependency_wait(tmp_path):
    """Under PDL no load of x may be scheduled above griddepcontrol.wait (ACQBULK in sm_90 SASS): with x read
    through the non-coherent path ptxas put x loads there in 13 of these 16 launch shapes, the wrong outputs of
    graph replays with the trigger before the wait. Above it only the preload may be: weights (LDG.E.NA.128,
    non-coherent and not kept in L1), scales and minimums (LDG.E.64); with the trigger between (pdl 3) the
    weights must be there."""
    for (bits, layout), nt, warps in itertools.product(((3, 16), (4, 16), (2, 16), (4, 0)), (1, 2), (8, 16)):
        v = Variant(bits, True, layout, nt, 1, 1, 3, False, 512 if warps > 8 else 256, True)
        cubin = tmp_path / "k.cubin"
        subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", *v.defines(), "-o", str(cubin), str(SOURCE)],
                       check=True, capture_output=True, timeout=120)
        sass = subprocess.run([_cuobjdump(), "-sass", "-fun", "quant_mma_gemv", str(cubin)], check=True,
                              capture_output=True, text=True, timeout=60).stdout
        before_wait = [line for line in sass.split("ACQBULK")[0].splitlines() if "LDG" in line]
        assert all("LDG.E.NA.128.CONSTANT" in line or "LDG.E.64.CONSTANT" in line for line in before_wait), (
            v, before_wait)
        assert any("LDG.E.NA.128.CONSTANT" in line for line in before_wait), (v, before_wait)


def test_mma_is_the_default_only_where_it_runs():
    qw = _case(4, n=64, k=256, group=128, dtype=torch.float32, seed=0)
    assert default_config(1, 64, qw, 132, mma=True).mma is not None
    assert default_config(64, 64, qw, 132, mma=True).mma is None
    assert default_config(1, 64, qw, 132).mma is None
    x = torch.randn(1, 256)
    assert unsupported_reason(x, qw) is not None
    with pytest.raises(ValueError, match="quant_mma"):
        quant_mma_matmul(x, qw)


def test_mma_config_takes_16_warps_for_one_block_per_sm():
    """down (K 14336, 128 blocks) at 2-4 bits takes 16 warps at any M, o (short K) at M = 1; gate_up (many
    blocks), 8 bits and qkv (192 blocks) keep their shapes; at M = 1 and 2-4 bits every shape overlaps its start
    with the previous kernels' ends (PDL triggered before the wait, weights loaded before it)."""
    solo = MmaConfig(16, pdl=3, preload=True)
    assert mma_config(1, 4096, 132, 14336, 3) == mma_config(1, 4096, 132, 4096, 2) == solo
    assert mma_config(2, 4096, 132, 14336, 4) == mma_config(16, 4096, 132, 14336, 4) == MmaConfig(16)
    assert mma_config(2, 4096, 132, 4096, 3) == mma_config(4, 4096, 132, 14336, 8) == MmaConfig(8)
    assert mma_config(1, 6144, 132, 4096, 4) == MmaConfig(8, pdl=3, preload=True)
    assert mma_config(1, 28672, 132, 14336, 3) == MmaConfig(4, 1, 2, pdl=3, preload=True)
    assert mma_config(1, 4096, 132, 14336, 8) == MmaConfig(8)
    qw = _case(3, n=64, k=8192, group=128, dtype=torch.float32, seed=0)
    assert default_config(1, 64, qw, 132, mma=True).mma == solo


ON_MMA = ON_GPU and available()


@pytest.mark.skipif(not ON_MMA, reason="needs an NVIDIA GPU and cuda-python")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_n", [0, 16, 32, 64])
def test_mma_matches_fp64_reference_on_gpu(bits, block_n):
    """Real widths, N not a multiple of the block's 32 columns (flat: of 16 either), group 128 and 256, M from 1
    to 16 (one and two token tiles, partial ones), bias, activations up to ~1e4 (no fp16 sums to overflow), and
    each launch shape; every output element must be written."""
    shapes = ((4100, 4096, 128), (1000, 1024, 256))
    for dtype, (n, k, group) in itertools.product((torch.bfloat16, torch.float16), shapes):
        qw = row_blocked(_case(bits, n=n, k=k, group=group, dtype=dtype, seed=bits), block_n)
        w_hat = dequantize(qw).double()  # on the GPU: the fp64 reference without a CPU matmul per case
        bias = torch.randn(n, device=DEVICE).to(dtype)
        for m, cfg in ((1, MmaConfig()), (3, MmaConfig(4, 1, 2)), (8, MmaConfig(8, 2)), (9, MmaConfig(2, 1)),
                       (16, MmaConfig(4, 1)), (1, MmaConfig(8, 1, 2, 1, preload=True)), (2, MmaConfig(4, 1, 2, 2)),
                       (11, MmaConfig(8, 1, 1, 2)), (1, MmaConfig(16, pdl=1, preload=True)), (13, MmaConfig(12)),
                       (5, MmaConfig(4, 1, 2, 3, preload=True)), (1, MmaConfig(16, pdl=3, preload=True))):
            x = (torch.randn(m, k, device=DEVICE) * torch.logspace(-2, 4, k, device=DEVICE)).to(dtype)
            assert usable(x, qw, bias)
            with nan_allocations():
                out = quant_matmul(x, qw, bias if m % 2 else None, QuantMatmulConfig(False, 1, 32, 4, 1, mma=cfg))
            ref = x.double() @ w_hat + (bias.double() if m % 2 else 0)
            assert rel_err(out, ref) < TOL[dtype], (dtype, n, m, cfg)


@pytest.mark.skipif(not ON_MMA, reason="needs an NVIDIA GPU and cuda-python")
def test_mma_runs_in_cuda_graphs_on_torch_stream():
    qw = row_blocked(_case(3, n=4096, k=4096, group=128, dtype=torch.bfloat16, seed=0), 16)
    x = torch.randn(1, 4096, device=DEVICE).to(torch.bfloat16)
    assert default_config(1, 4096, qw, 132, usable(x, qw)).mma is not None
    out = quant_matmul(x, qw)  # compiles and loads before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_matmul(x, qw)
    for seed in range(2):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, _ref64(x, qw)) < TOL[torch.bfloat16]


# Overlapped launches: PDL triggering the next grid past the wait, past the main loop or at the start (three
# grids in flight), waiting before any load or loading the weights first, 4-, 8- and 16-warp blocks.
OVERLAPPED = [MmaConfig(8, 1, 2, 1), MmaConfig(4, 1, 2, 2), MmaConfig(8, 1, 2, 1, preload=True),
              MmaConfig(8, 1, 2, 2, preload=True), MmaConfig(16, 1, 1, 1, preload=True),
              MmaConfig(8, 1, 1, 3, preload=True), MmaConfig(16, 1, 1, 3, preload=True),
              MmaConfig(4, 1, 2, 3, preload=True)]


def _launch_id(c: MmaConfig) -> str:
    return f"w{c.warps}-mb{c.min_blocks}-pdl{c.pdl}{'-pre' if c.preload else ''}"


@pytest.mark.skipif(not ON_MMA, reason="needs an NVIDIA GPU and cuda-python")
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("overlapped", OVERLAPPED, ids=_launch_id)
def test_mma_dependent_launch_reads_what_the_previous_kernel_wrote(m, overlapped):
    """With programmatic dependent launch each GEMV may start before the previous kernel ends: a chain whose
    every input is the previous GEMV's output (three GEMVs in a row, then a torch kernel), eager and
    replayed from a CUDA graph, must give bit for bit what the same kernel gives launched plainly. Only graph
    replays overlap the launches for real (eagerly the host is slower than the GPU): there, x loads that ptxas
    had moved above the wait gave wrong outputs with the trigger before the wait (quant_mma.cu)."""
    qws = [row_blocked(_case(b, n=4096, k=4096, group=128, dtype=torch.bfloat16, seed=b), 16) for b in (3, 4, 2)]
    qws += [_case(4, n=4096, k=4096, group=128, dtype=torch.bfloat16, seed=5)]  # flat
    plain = MmaConfig(overlapped.warps, 1, overlapped.min_blocks)

    def chain(x: torch.Tensor, mma: MmaConfig) -> torch.Tensor:
        for i, qw in enumerate(qws * 3):
            x = quant_matmul(x, qw, config=QuantMatmulConfig(False, 1, 32, 4, 1, mma=mma))
            if i % 3 == 2:
                x = x / x.float().norm(dim=1, keepdim=True).to(x.dtype)
        return x

    x = torch.randn(m, 4096, device=DEVICE).to(torch.bfloat16)
    with nan_allocations():
        want, got = chain(x, plain), chain(x, overlapped)
    assert torch.isfinite(want).all() and torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x, overlapped)
    for seed in range(4):
        x.copy_(torch.randn(m, 4096, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        want = chain(x, plain)
        torch.cuda.synchronize()
        assert torch.equal(out, want), seed


@pytest.mark.skipif(not ON_MMA, reason="needs an NVIDIA GPU and cuda-python")
def test_mma_catalog_solution_takes_the_definitions_flat_weight():
    from treadle.kernels import catalog

    qw = _case(4, n=4096, k=4096, group=128, dtype=torch.bfloat16, seed=1)
    x = torch.randn(4, 4096, device=DEVICE).to(torch.bfloat16)
    out = catalog.gemm_wna16_cuda_mma(x, qw.packed, qw.scales, qw.mins, 4, 128)
    assert rel_err(out, _ref64(x, qw)) < TOL[torch.bfloat16]
    assert "gemm_w4a16_g128_n4096_k4096_cuda_mma" in catalog.REGISTRY.solutions
