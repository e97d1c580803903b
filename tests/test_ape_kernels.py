"""The GPU path of APE attention (paged prefill + decode kernels, then the Triton LSE merge) against the torch path,
on tiny shapes; without a GPU the kernels run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from kernels_testing import DEVICE
from treadle.engine.models.attention import ApeSeq, ape_attention
from treadle.kernels import attention_ape
from treadle.kernels.attention_ape import ape_attention_triton


@pytest.mark.parametrize("num_new,first_query,index_cap", [(1, 0, None), (5, 2, None), (5, 0, 64)])
def test_triton_path_matches_torch(num_new, first_query, index_cap, monkeypatch):
    if index_cap is not None:  # the context part runs in blocks of rows (2 rows of 29 entries per call here)
        monkeypatch.setattr(attention_ape, "_MAX_INDEX_ENTRIES", index_cap)
    torch.manual_seed(0)
    heads, kv_heads, dim, num_slots = 4, 2, 16, 96
    k_cache = torch.randn(num_slots, kv_heads, dim)
    v_cache = torch.randn(num_slots, kv_heads, dim)
    perm = torch.randperm(num_slots)
    slots, context_slots = perm[:11], perm[11:40]  # own index (new tokens at its tail), then the contexts' union
    q = torch.randn(num_new, heads, dim)
    scale, temperature, ape_scale = dim**-0.5, 0.7, 0.8
    total = len(slots)
    mask = torch.arange(total) <= torch.arange(total - num_new, total)[:, None]
    seq = ApeSeq(0, num_new, slots, mask, context_slots, first_query, temperature, ape_scale)
    expected = ape_attention(q, k_cache, v_cache, seq, scale)
    got = ape_attention_triton(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), slots.to(DEVICE),
                               context_slots.to(DEVICE), first_query, scale, temperature, ape_scale)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    # Shared-prefix rows never see the contexts: they equal plain causal attention over the own index.
    if first_query:
        plain = torch.nn.functional.scaled_dot_product_attention(
            q[:first_query].transpose(0, 1), k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1),
            attn_mask=mask[:first_query], scale=scale, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[:first_query].cpu(), plain, atol=1e-4, rtol=1e-4)
