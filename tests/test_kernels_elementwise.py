"""RMSNorm(+residual), RoPE (+KV append), KV append, SiLU*mul and bitmask apply against transformers, torch and
xgrammar. Runs under TRITON_INTERPRET=1 without a GPU; on a GPU the same tests run at real shapes' dtypes."""

from __future__ import annotations

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU, nan_allocations, poisoned, rel_err  # noqa: I001  (sets up the interpreter first)

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from treadle.kernels.activation import silu_and_mul
from treadle.kernels.bitmask import apply_token_bitmask_
from treadle.kernels.kv_append import kv_append
from treadle.kernels.norm import rmsnorm
from treadle.kernels.reference import apply_token_bitmask_reference, kv_append_reference, rope_reference
from treadle.kernels.rope import apply_rope, rope_cos_sin_cache, rope_kv_append

# bf16 casts truncate under Triton's interpreter (the GPU rounds to nearest), so bf16 runs on a GPU only.
HALF_DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_rounding_close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same rounding steps as the reference: any difference is one unit in the last place, from fp32 values that
    differ in their last bits (statistics summed in another order, another exp/rsqrt/cos), and rare."""
    assert out.dtype == ref.dtype and not out.isnan().any()
    ulp = torch.finfo(out.dtype).eps
    assert ((out.float() - ref.float()).abs() <= ulp * ref.float().abs() + 1e-30).all()
    assert (out != ref).float().mean() < 0.01
    return True


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("hidden,rows", [(96, 3), (100, 1)])
def test_rmsnorm_matches_transformers(dtype, hidden, rows):
    torch.manual_seed(hidden + rows)
    x, res, w = _randn(rows, hidden, dtype=dtype), _randn(rows, hidden, dtype=dtype), _randn(hidden, dtype=dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(device=DEVICE, dtype=dtype)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        with nan_allocations():
            out, none = rmsnorm(x, w, 1e-5)
        assert none is None
        ref = norm(x)
        if dtype == torch.float32:
            assert rel_err(out, ref) < 1e-6
        else:
            assert_rounding_close(out, ref)
        with nan_allocations():
            out, summed = rmsnorm(x, w, 1e-5, residual=res)
        assert torch.equal(summed, x + res)
        ref = norm(x + res)
        assert rel_err(out, ref) < 1e-6 if dtype == torch.float32 else assert_rounding_close(out, ref)


def test_rmsnorm_bf16_close_and_strided_rows():
    x = _randn(4, 160, dtype=torch.bfloat16)[:, :128]  # row stride 160, 128 used
    w = _randn(128, dtype=torch.bfloat16)
    with nan_allocations():
        out, _ = rmsnorm(x, w, 1e-6)
    ref = LlamaRMSNorm(128, eps=1e-6).to(DEVICE)
    ref.weight.data.copy_(w.float())
    with torch.no_grad():
        assert rel_err(out, ref(x.float())) < 1e-2


def test_rmsnorm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rows"):
        rmsnorm(_randn(2, 8), _randn(9), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(_randn(2, 8), _randn(8), 1e-5, residual=_randn(3, 8))


LLAMA3 = {  # transformers adds keys to the dict it is given: pass copies
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _qkv(tokens, hq, hkv, d, dtype):
    """q, k, v as strided views of one fused projection output, as the model produces them."""
    qkv = _randn(tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_rope_matches_transformers(dtype):
    torch.manual_seed(1)
    tokens, hq, hkv, d = 5, 6, 2, 32
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                      rope_theta=10000.0, max_position_embeddings=4096, rope_scaling=dict(LLAMA3))
    q, k, _ = _qkv(tokens, hq, hkv, d, dtype)
    positions = torch.tensor([0, 1, 17, 3000, 4095], device=DEVICE)
    rot = LlamaRotaryEmbedding(cfg).to(DEVICE)
    cache = rope_cos_sin_cache(rot.inv_freq, 4096, DEVICE)
    with nan_allocations():
        q_out, k_out = apply_rope(q, k, positions.to(torch.int32), cache)
    cos, sin = rot(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ref_q, ref_k = ref_q[0].transpose(0, 1), ref_k[0].transpose(0, 1)
    if dtype == torch.float32:
        assert rel_err(q_out, ref_q) < 1e-6 and rel_err(k_out, ref_k) < 1e-6
    elif ON_GPU:  # torch's GPU cos may differ from the table's in a last bit, and a - b can magnify one ulp
        assert rel_err(q_out, ref_q) < TOL[dtype] and rel_err(k_out, ref_k) < TOL[dtype]
    else:
        assert torch.equal(q_out, ref_q) and torch.equal(k_out, ref_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_append_writes_only_its_slots(dtype):
    torch.manual_seed(2)
    tokens, hq, hkv, d, num_slots = 4, 4, 2, 64, 11
    q, k, v = _qkv(tokens, hq, hkv, d, dtype)
    positions = torch.tensor([5, 0, 9, 2], device=DEVICE, dtype=torch.int32)
    slots = torch.tensor([7, -1, 0, 10], device=DEVICE, dtype=torch.int32)  # -1: a padding row, no write
    cache = rope_cos_sin_cache(1e5 ** -(torch.arange(0, d, 2) / d), 16, DEVICE)
    k_cache, v_cache = poisoned((num_slots, hkv, d), dtype), poisoned((num_slots, hkv, d), dtype)
    with nan_allocations():
        q_out = rope_kv_append(q, k, v, positions, cache, slots, k_cache, v_cache)
    ref_q, ref_k = rope_reference(q, k, positions, cache)
    ref_kc, ref_vc = poisoned((num_slots, hkv, d), dtype), poisoned((num_slots, hkv, d), dtype)
    kv_append_reference(ref_k, v, slots, ref_kc, ref_vc)
    tol = TOL[dtype]
    assert rel_err(q_out, ref_q) < tol
    written = torch.tensor([0, 7, 10])
    assert rel_err(k_cache[written], ref_kc[written]) < tol
    assert torch.equal(v_cache[written], ref_vc[written])
    untouched = torch.tensor([i for i in range(num_slots) if i not in (0, 7, 10)])
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


def test_kv_append_scatters_shuffled_slots():
    torch.manual_seed(3)
    tokens, hkv, d, num_slots = 6, 3, 24, 40
    k, v = _randn(tokens, hkv, d), _randn(tokens, hkv, d)
    slots = torch.randperm(num_slots, device=DEVICE)[:tokens].to(torch.int32)
    k_cache, v_cache = poisoned((num_slots, hkv, d), torch.float32), poisoned((num_slots, hkv, d), torch.float32)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kv_append(k, v, slots, k_cache, v_cache)
    kv_append_reference(k, v, slots, ref_k, ref_v)
    assert torch.equal(k_cache.nan_to_num(7.0), ref_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), ref_v.nan_to_num(7.0))
    with pytest.raises(ValueError, match="alike"):
        kv_append(k, v, slots, k_cache, v_cache[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("inter", [48, 100])
def test_silu_and_mul_matches_torch(dtype, inter):
    x = _randn(3, 2 * inter, dtype=dtype) * 3
    gate, up = x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    with nan_allocations():
        out = silu_and_mul(x)
    assert rel_err(out, ref) < 1e-6 if dtype == torch.float32 else assert_rounding_close(out, ref)


def test_bitmask_matches_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    torch.manual_seed(4)
    batch, vocab = 4, 100  # 100 tokens: the last word is partly padding
    bitmask = torch.randint(-(2**31), 2**31, (batch, 4), dtype=torch.int32)
    logits = torch.randn(batch, vocab + 12)  # logits wider than the mask: the extra columns stay untouched
    for kwargs in ({}, {"vocab_size": 70}, {"indices": [0, 2]}):
        ref = logits.clone()
        xgr.apply_token_bitmask_inplace(ref, bitmask, backend="torch_native", **kwargs)
        out = logits.to(DEVICE)
        indices = kwargs.get("indices")
        apply_token_bitmask_(
            out,
            bitmask.to(DEVICE),
            indices=None if indices is None else torch.tensor(indices, device=DEVICE),
            vocab_size=kwargs.get("vocab_size"),
        )
        assert torch.equal(out.cpu(), ref)
    with pytest.raises(ValueError, match="vocab_size"):
        apply_token_bitmask_(logits, bitmask, vocab_size=129)


@pytest.mark.skipif(not ON_GPU, reason="real model shapes run on the GPU machine")
def test_real_shapes():
    """Llama-3.1-8B sizes in bf16: residual sum and bitmask exact; norm and SiLU within one rounding step."""
    torch.manual_seed(5)
    x, res = _randn(64, 4096, dtype=torch.bfloat16), _randn(64, 4096, dtype=torch.bfloat16)
    w = _randn(4096, dtype=torch.bfloat16)
    norm = LlamaRMSNorm(4096, eps=1e-5).to(device=DEVICE, dtype=torch.bfloat16)
    norm.weight.data.copy_(w)
    out, summed = rmsnorm(x, w, 1e-5, res)
    with torch.no_grad():
        assert torch.equal(summed, x + res)
        assert_rounding_close(out, norm(x + res))

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=dict(LLAMA3, factor=8.0))
    rot = LlamaRotaryEmbedding(cfg).to(DEVICE)
    q, k, v = _qkv(64, 32, 8, 128, torch.bfloat16)
    positions = torch.randint(0, 131072, (64,), device=DEVICE)
    q_out, k_out = apply_rope(q, k, positions.to(torch.int32), rope_cos_sin_cache(rot.inv_freq, 131072, DEVICE))
    cos, sin = rot(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert rel_err(q_out, ref_q[0].transpose(0, 1)) < 1e-2 and rel_err(k_out, ref_k[0].transpose(0, 1)) < 1e-2

    gu = _randn(64, 2 * 14336, dtype=torch.bfloat16) * 3
    gate, up = gu.chunk(2, dim=-1)
    assert_rounding_close(silu_and_mul(gu), torch.nn.functional.silu(gate) * up)

    logits = torch.randn(64, 128256, device=DEVICE)
    bitmask = torch.randint(-(2**31), 2**31, (64, 4008), dtype=torch.int32, device=DEVICE)
    ref = apply_token_bitmask_reference(logits, bitmask)
    apply_token_bitmask_(logits, bitmask)
    assert torch.equal(logits, ref)
