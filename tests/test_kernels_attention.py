"""Paged decode and prefill/extend attention against a dense fp64 torch reference: shuffled non-contiguous pages
and slots, lengths at page boundaries +-1, ragged batches, GQA, split-KV, empty sequences, poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU, nan_allocations, rel_err  # noqa: I001  (sets up the interpreter first)

from treadle.kernels.attention_decode import decode_num_splits, paged_decode_attention
from treadle.kernels.attention_prefill import paged_prefill_attention
from treadle.kernels.reference import paged_attention_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# Triton's interpreter multiplies bf16 tiles as raw uint16, so bf16 runs on a GPU only; fp16 takes the same path.
BF16 = torch.bfloat16 if ON_GPU else torch.float16
BLOCK = 64 if ON_GPU else 16  # small blocks under the interpreter so short sequences still span several


def _paged_index(lengths: list[int], page_size: int, num_pages: int, gen: torch.Generator):
    """Each sequence gets its own shuffled pages; returns CSR (indptr, slots) as int32."""
    pages = torch.randperm(num_pages, generator=gen).tolist()
    slots, indptr = [], [0]
    for n in lengths:
        own = [pages.pop() for _ in range(-(-n // page_size))]
        slots += [own[i // page_size] * page_size + i % page_size for i in range(n)]
        indptr.append(len(slots))
    return torch.tensor(indptr, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32)


def _caches(num_slots, hkv, d, dtype, gen):
    k = torch.randn(num_slots, hkv, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(num_slots, hkv, d, generator=gen).to(DEVICE, dtype)
    return k, v


def _check(out, lse, ref_o, ref_lse, dtype):
    live = torch.isfinite(ref_lse).all(-1)
    assert rel_err(out[live.to(out.device)], ref_o[live]) < TOL[dtype]
    assert rel_err(lse[live.to(lse.device)], ref_lse[live]) < 1e-5
    assert torch.isneginf(lse[(~live).to(lse.device)]).all()
    assert (out[(~live).to(out.device)] == 0).all()


@pytest.mark.parametrize(
    "dtype,hq,hkv,d,splits",
    [
        (torch.float32, 6, 2, 32, 1),
        (torch.float32, 9, 3, 64, 3),  # SmolLM2's head layout, non-power-of-two group
        (BF16, 4, 4, 48, 5),  # MHA, head_dim not a power of two
        (torch.float16, 8, 2, 32, 2),
    ],
)
def test_decode_matches_reference(dtype, hq, hkv, d, splits):
    gen = torch.Generator().manual_seed(hq * 100 + d)
    page_size = 16
    lengths = [15, 16, 17, 1, 0, 47, 33]  # page boundary -1/0/+1, one token, empty, ragged
    indptr, slots = _paged_index(lengths, page_size, 20, gen)
    k_cache, v_cache = _caches(20 * page_size, hkv, d, dtype, gen)
    q = torch.randn(len(lengths), hq, d, generator=gen).to(DEVICE, dtype)
    with nan_allocations():
        out, lse = paged_decode_attention(
            q, k_cache, v_cache, indptr.to(DEVICE), slots.to(DEVICE), num_splits=splits, block_n=BLOCK
        )
    ref_o, ref_lse = paged_attention_reference(
        q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), torch.arange(len(lengths) + 1), indptr, slots
    )
    _check(out, lse, ref_o, ref_lse, dtype)


def test_decode_token_level_index_and_custom_scale():
    """A fork/merge-style index (arbitrary slot list, shared slots between sequences) and a non-default scale."""
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = _caches(50, 2, 32, torch.float32, gen)
    shared = torch.randperm(50, generator=gen)[:20].tolist()
    seqs = [shared[:12] + shared[15:20], shared[:12] + shared[12:15], shared[::-1]]
    indptr = torch.tensor([0, 17, 32, 52], dtype=torch.int32)
    slots = torch.tensor(sum(seqs, []), dtype=torch.int32)
    q = torch.randn(3, 4, 32, generator=gen).to(DEVICE)
    with nan_allocations():
        out, lse = paged_decode_attention(q, k_cache, v_cache, indptr.to(DEVICE), slots.to(DEVICE), sm_scale=0.3,
                                          num_splits=4, block_n=BLOCK)
    ref_o, ref_lse = paged_attention_reference(
        q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), torch.arange(4), indptr, slots, sm_scale=0.3
    )
    _check(out, lse, ref_o, ref_lse, torch.float32)


def test_decode_splits_do_not_change_the_result():
    gen = torch.Generator().manual_seed(8)
    indptr, slots = _paged_index([70, 3], 8, 12, gen)
    k_cache, v_cache = _caches(96, 2, 32, torch.float32, gen)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    outs = [
        paged_decode_attention(q, k_cache, v_cache, indptr.to(DEVICE), slots.to(DEVICE), num_splits=s, block_n=BLOCK)
        for s in (1, 2, 8)  # 8 splits of a 70-token sequence: several are empty
    ]
    for o, lse in outs[1:]:
        assert rel_err(o, outs[0][0]) < 1e-6 and rel_err(lse, outs[0][1]) < 1e-6


def test_decode_num_splits_fills_the_gpu():
    assert decode_num_splits(1, 8, 132) == 32
    assert decode_num_splits(8, 8, 132) == 5
    assert decode_num_splits(64, 8, 132) == 1


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_prefill_extend_matches_reference(dtype):
    gen = torch.Generator().manual_seed(9)
    page_size = 16
    # (new tokens, total KV): plain prefill, extend over a cached prefix at page boundaries +-1, one-token extend
    shapes = [(17, 17), (5, 21), (16, 32), (1, 15), (33, 33), (3, 50)]
    q_lens, kv_lens = zip(*shapes)
    indptr, slots = _paged_index(list(kv_lens), page_size, 16, gen)
    qo = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    hq, hkv, d = 6, 2, 32
    k_cache, v_cache = _caches(16 * page_size, hkv, d, dtype, gen)
    q = torch.randn(int(qo[-1]), hq, d, generator=gen).to(DEVICE, dtype)
    with nan_allocations():
        out, lse = paged_prefill_attention(q, k_cache, v_cache, qo.to(DEVICE), indptr.to(DEVICE), slots.to(DEVICE),
                                           max(q_lens), block_m=BLOCK, block_n=BLOCK)
    ref_o, ref_lse = paged_attention_reference(
        q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), qo, indptr, slots
    )
    _check(out, lse, ref_o, ref_lse, dtype)


def test_chunked_prefill_equals_one_pass_and_decode():
    """Prefill in two chunks == one chunk; the last token's row == a decode step over the same index."""
    gen = torch.Generator().manual_seed(10)
    indptr, slots = _paged_index([29], 8, 6, gen)
    k_cache, v_cache = _caches(48, 2, 32, torch.float32, gen)
    q = torch.randn(29, 4, 32, generator=gen).to(DEVICE)
    dev = {"device": DEVICE, "dtype": torch.int32}
    full, full_lse = paged_prefill_attention(q, k_cache, v_cache, torch.tensor([0, 29], **dev), indptr.to(DEVICE),
                                             slots.to(DEVICE), 29, block_m=BLOCK, block_n=BLOCK)
    first, _ = paged_prefill_attention(q[:13], k_cache, v_cache, torch.tensor([0, 13], **dev),
                                       torch.tensor([0, 13], **dev), slots[:13].to(DEVICE), 13, block_m=BLOCK,
                                       block_n=BLOCK)
    second, _ = paged_prefill_attention(q[13:], k_cache, v_cache, torch.tensor([0, 16], **dev), indptr.to(DEVICE),
                                        slots.to(DEVICE), 16, block_m=BLOCK, block_n=BLOCK)
    assert rel_err(torch.cat([first, second]), full) < 1e-6
    dec, dec_lse = paged_decode_attention(q[-1:], k_cache, v_cache, indptr.to(DEVICE), slots.to(DEVICE),
                                          num_splits=2, block_n=BLOCK)
    assert rel_err(dec, full[-1:]) < 1e-6 and rel_err(dec_lse, full_lse[-1:]) < 1e-6


@pytest.mark.skipif(not ON_GPU, reason="real model shapes run on the GPU machine")
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 64), (32, 8, 128)])  # Llama-3.2-1B, Llama-3.1-8B heads
def test_real_shapes(hq, hkv, d):
    gen = torch.Generator().manual_seed(d)
    page_size = 16
    lengths = [1, 1023, 1024, 1025, 4097, 8191]
    indptr, slots = _paged_index(lengths, page_size, 1000, gen)
    k_cache, v_cache = _caches(1000 * page_size, hkv, d, torch.bfloat16, gen)
    q = torch.randn(len(lengths), hq, d, generator=gen).to(DEVICE, torch.bfloat16)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    out, lse = paged_decode_attention(q, k_cache, v_cache, indptr.to(DEVICE), slots.to(DEVICE),
                                      num_splits=decode_num_splits(len(lengths), hkv, sms))
    ref_o, ref_lse = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(),
                                               torch.arange(len(lengths) + 1), indptr, slots)
    _check(out, lse, ref_o, ref_lse, torch.bfloat16)

    shapes = [(1000, 3000), (2048, 2048), (1, 777), (129, 4097)]
    q_lens, kv_lens = zip(*shapes)
    indptr, slots = _paged_index(list(kv_lens), page_size, 1000, gen)
    qo = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qo[-1]), hq, d, generator=gen).to(DEVICE, torch.bfloat16)
    out, lse = paged_prefill_attention(q, k_cache, v_cache, qo.to(DEVICE), indptr.to(DEVICE), slots.to(DEVICE),
                                       max(q_lens))
    ref_o, ref_lse = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), qo, indptr, slots)
    _check(out, lse, ref_o, ref_lse, torch.bfloat16)


def test_attention_rejects_bad_metadata():
    q = torch.randn(2, 4, 32, device=DEVICE)
    cache = torch.randn(10, 2, 32, device=DEVICE)
    good = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, cache, cache, good.long(), good)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(2, 3, 32, device=DEVICE), cache, cache, good, good)
    with pytest.raises(ValueError, match="kv_indptr"):
        paged_decode_attention(q, cache, cache, good[:2], good)
    with pytest.raises(ValueError, match="dtype"):
        paged_prefill_attention(q.half(), cache, cache, good, good, good, 1)
