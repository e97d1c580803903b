"""Paged attention in pure torch: the one seam that GPU kernels (Triton, the megakernel) replace.

The KV cache of a layer is a pair of [num_slots, num_kv_heads, head_dim] tensors. Each sequence attends the
slots of its token-level index, in order; a new token attends its index up to and including its own slot. The
batch is laid out decode rows first (one new token each), then prefill chunks. All decode rows share one padded
gather and one SDPA call with a length mask; each prefill chunk gets one SDPA call with a causal-with-offset mask.

GQA without repeating K/V: a decode row's query heads that share a KV head are laid out as that KV head's
"query positions" ([B, kv_heads, group, head_dim]), which is exact because a single-token row has no causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    """One multi-token chunk of a sequence."""

    start: int  # first row of the chunk in the step's token batch
    num_new: int
    slots: torch.Tensor  # [L] long: the sequence's whole KV index; the chunk's slots are its tail
    mask: torch.Tensor  # [num_new, L] bool: row i sees entries 0 .. L - num_new + i


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] long: the cache slot each new token's K/V is written to
    num_decode: int  # rows 0 .. num_decode - 1 are single-token sequences
    decode_slots: torch.Tensor | None  # [num_decode, L_max] long, padded with slot 0 (masked out)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, L_max] bool
    prefills: list[PrefillSeq]
    logits_indices: torch.Tensor  # rows whose hidden states the model returns, in output order

    @staticmethod
    def build(
        decode_slots: list[list[int]],
        prefill_slots: list[list[int]],
        prefill_num_new: list[int],
        slot_mapping: list[int],
        logits_indices: list[int],
        device: torch.device,
    ) -> "AttentionMetadata":
        """Tensors from the per-sequence KV indices (decode rows first, then prefill chunks, in batch order)."""
        num_decode = len(decode_slots)
        dec_slots = dec_mask = None
        if num_decode:
            lengths = [len(s) for s in decode_slots]
            max_len = max(lengths)
            flat: list[int] = []
            for s, n in zip(decode_slots, lengths):
                flat += s
                flat += [0] * (max_len - n)
            dec_slots = torch.tensor(flat, dtype=torch.long).view(num_decode, max_len)
            dec_mask = torch.arange(max_len) < torch.tensor(lengths)[:, None]
            dec_slots = dec_slots.to(device)
            dec_mask = dec_mask.view(num_decode, 1, 1, max_len).to(device)
        prefills = []
        start = num_decode
        for slots, num_new in zip(prefill_slots, prefill_num_new):
            total = len(slots)
            mask = torch.arange(total) <= torch.arange(total - num_new, total)[:, None]
            prefills.append(
                PrefillSeq(start, num_new, torch.tensor(slots, dtype=torch.long).to(device), mask.to(device))
            )
            start += num_new
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long).to(device),
            num_decode=num_decode,
            decode_slots=dec_slots,
            decode_mask=dec_mask,
            prefills=prefills,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(device),
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend. q: [T, heads, D]; k, v: [T, kv_heads, D]; -> [T, heads * D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    outs = []
    if meta.num_decode:
        b = meta.num_decode
        qd = q[:b].view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
        kd = _gather(k_cache, meta.decode_slots)
        vd = _gather(v_cache, meta.decode_slots)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        outs.append(o.reshape(b, num_heads * head_dim))
    for p in meta.prefills:
        qp = q[p.start : p.start + p.num_new].transpose(0, 1)  # [heads, T, D]
        kp = k_cache.index_select(0, p.slots).transpose(0, 1)  # [kv_heads, L, D]
        vp = v_cache.index_select(0, p.slots).transpose(0, 1)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(0, 1).reshape(p.num_new, num_heads * head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[num_slots, kv_heads, D] gathered at [B, L] slots -> [B, kv_heads, L, D] (a strided view of one copy).

    index_select on the flat index is several times faster than advanced indexing on CPU."""
    b, length = slots.shape
    return cache.index_select(0, slots.view(-1)).view(b, length, cache.shape[1], cache.shape[2]).transpose(1, 2)
