"""The engine's attention seam with the Triton kernel (the CUDA path: one kernel call for every decode row and
prefill chunk) equals its torch SDPA path on the same ragged batch."""

from __future__ import annotations

import torch

from kernels_testing import DEVICE  # noqa: I001  (sets up the interpreter first)

from treadle.engine.models.attention import AttentionMetadata, paged_attention


def test_kernel_index_path_matches_sdpa_path():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, num_slots = 6, 2, 16, 96
    perm = torch.randperm(num_slots, generator=gen).tolist()
    # Two decode rows and two prefill chunks (a fresh prompt and an extend over a cached prefix), shuffled slots.
    lengths, new = [17, 5, 9, 23], [1, 1, 9, 6]
    seqs = []
    for n in lengths:
        seqs.append(perm[:n])
        perm = perm[n:]
    slot_mapping = [s for seq, k in zip(seqs, new) for s in seq[len(seq) - k :]]
    tokens = sum(new)
    q = torch.randn(tokens, heads, dim, generator=gen)
    k = torch.randn(tokens, kv_heads, dim, generator=gen)
    v = torch.randn(tokens, kv_heads, dim, generator=gen)
    cache = torch.randn(2, num_slots, kv_heads, dim, generator=gen)
    outs = []
    for use_kernels in (False, True):
        meta = AttentionMetadata.build(seqs[:2], seqs[2:], new[2:], slot_mapping, [0, 1, 10, 16],
                                       torch.device(DEVICE), use_kernels=use_kernels)
        k_cache, v_cache = (c.clone().to(DEVICE) for c in cache)
        outs.append(paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), k_cache, v_cache, meta, dim**-0.5))
    assert outs[1].shape == (tokens, heads * dim)
    torch.testing.assert_close(outs[1].cpu(), outs[0].cpu(), rtol=1e-4, atol=1e-5)
