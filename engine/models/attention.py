"""Paged attention in pure torch: the one seam that GPU kernels (Triton, the megakernel) replace.

The KV cache of a layer is a pair of [num_slots, num_kv_heads, head_dim] tensors. Each sequence attends the
slots of its token-level index, in order; a new token attends its index up to and including its own slot. The
batch is laid out decode rows first (one new token each), then prefill chunks. All decode rows share one padded
gather and one SDPA call with a length mask; each prefill chunk gets one SDPA call with a causal-with-offset mask.

GQA without repeating K/V: a decode row's query heads that share a KV head are laid out as that KV head's
"query positions" ([B, kv_heads, group, head_dim]), which is exact because a single-token row has no causal mask.

On CUDA the decode rows and prefill chunks instead go to the Triton prefill kernel in one call per layer
(`KernelIndex`, kernels/attention_prefill.py): one SDPA call per chunk costs ~0.25 ms of launches and masks there,
which made a step with many short chunks (e.g. forked Multiverse paths prefilling their headers) ~100 ms.

APE sequences (engine/ape.py) come last in the batch, one call each: their tokens attend their own index causally
(R) and the cached contexts' slots (C) with temperature T, and the two parts merge by log-sum-exp with C's LSE
scaled by S·T (features brief B1). Every LSE here is in natural-log units, as the Triton kernels return theirs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

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
class ApeSeq:
    """One APE sequence's chunk: causal over `slots` plus non-causal over `context_slots`."""

    start: int
    num_new: int
    slots: torch.Tensor  # [L] long: the sequence's own index (shared prefix, query, generated)
    mask: torch.Tensor  # [num_new, L] bool, causal with offset
    context_slots: torch.Tensor  # [Lc] long
    first_query: int  # rows before it are shared-prefix tokens, which never attend the contexts
    temperature: float
    scale: float


@dataclass
class KernelIndex:
    """Decode rows and prefill chunks in the Triton kernels' CSR form: sequence i's new tokens are q rows
    qo_indptr[i]..qo_indptr[i+1] and its KV index kv_indices[kv_indptr[i]:kv_indptr[i+1]]."""

    qo_indptr: torch.Tensor  # [B+1] int32
    kv_indptr: torch.Tensor  # [B+1] int32
    kv_indices: torch.Tensor  # [nnz] int32
    max_q_len: int
    num_tokens: int


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] long: the cache slot each new token's K/V is written to
    num_decode: int  # rows 0 .. num_decode - 1 are single-token sequences
    decode_slots: torch.Tensor | None  # [num_decode, L_max] long, padded with slot 0 (masked out)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, L_max] bool
    prefills: list[PrefillSeq]
    logits_indices: torch.Tensor  # rows whose hidden states the model returns, in output order
    ape: list[ApeSeq] = field(default_factory=list)  # after the prefill chunks
    kernel_index: KernelIndex | None = None  # set: decode rows and prefill chunks go to the Triton kernel

    @staticmethod
    def build(
        decode_slots: list[list[int]],
        prefill_slots: list[list[int]],
        prefill_num_new: list[int],
        slot_mapping: list[int],
        logits_indices: list[int],
        device: torch.device,
        ape_chunks: list | None = None,
        use_kernels: bool = False,
    ) -> "AttentionMetadata":
        """Tensors from the per-sequence KV indices (decode rows first, then prefill chunks, then APE chunks
        (engine.batch.SeqChunk with `ape` set), in batch order). `use_kernels`: a KernelIndex for the Triton
        kernel instead of the SDPA layouts."""
        num_decode = len(decode_slots)
        dec_slots = dec_mask = None
        kernel_index = None
        if use_kernels:
            kernel_index = _kernel_index(decode_slots, prefill_slots, prefill_num_new, device)
        elif num_decode:
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
        for slots, num_new in zip([] if use_kernels else prefill_slots, prefill_num_new):
            total = len(slots)
            mask = torch.arange(total) <= torch.arange(total - num_new, total)[:, None]
            prefills.append(
                PrefillSeq(start, num_new, torch.tensor(slots, dtype=torch.long).to(device), mask.to(device))
            )
            start += num_new
        if use_kernels:
            start = num_decode + sum(prefill_num_new)
        ape = []
        for c in ape_chunks or ():
            total, num_new = len(c.kv_slots), len(c.token_ids)
            mask = torch.arange(total) <= torch.arange(total - num_new, total)[:, None]
            ape.append(ApeSeq(
                start, num_new, torch.tensor(c.kv_slots, dtype=torch.long).to(device), mask.to(device),
                torch.tensor(c.ape.context_slots, dtype=torch.long).to(device),
                max(0, c.ape.num_prefix - (total - num_new)), c.ape.temperature, c.ape.scale,
            ))
            start += num_new
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long).to(device),
            num_decode=num_decode,
            decode_slots=dec_slots,
            decode_mask=dec_mask,
            prefills=prefills,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(device),
            ape=ape,
            kernel_index=kernel_index,
        )


def _kernel_index(
    decode_slots: list[list[int]], prefill_slots: list[list[int]], prefill_num_new: list[int], device: torch.device
) -> KernelIndex | None:
    seqs = decode_slots + prefill_slots
    if not seqs:
        return None
    q_lens = [1] * len(decode_slots) + list(prefill_num_new)
    kv_lens = [len(s) for s in seqs]
    qo_indptr = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    kv_indptr = torch.tensor([0, *itertools.accumulate(kv_lens)], dtype=torch.int32)
    kv_indices = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int32)
    return KernelIndex(qo_indptr.to(device), kv_indptr.to(device), kv_indices.to(device), max(q_lens),
                       int(qo_indptr[-1]))


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
    ki = meta.kernel_index
    if ki is not None:
        from treadle.kernels.attention_prefill import paged_prefill_attention

        o, _ = paged_prefill_attention(q[: ki.num_tokens], k_cache, v_cache, ki.qo_indptr, ki.kv_indptr,
                                       ki.kv_indices, ki.max_q_len, scale)
        outs.append(o.reshape(ki.num_tokens, num_heads * head_dim))
    elif meta.num_decode:
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
    for a in meta.ape:
        o = ape_attention(q[a.start : a.start + a.num_new], k_cache, v_cache, a, scale)
        outs.append(o.reshape(a.num_new, num_heads * head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def ape_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, a: ApeSeq, scale: float
) -> torch.Tensor:
    """APE's two-part attention for one sequence's new tokens q [n, heads, D] -> [n, heads, D].

    On CUDA the Triton kernels compute both parts (kernels/attention_ape.py); elsewhere this torch reference does,
    in float32.
    """
    if q.is_cuda:
        from treadle.kernels.attention_ape import ape_attention_triton

        return ape_attention_triton(q, k_cache, v_cache, a.slots, a.context_slots, a.first_query, scale,
                                    a.temperature, a.scale)
    o_r, lse_r = _attend(q, k_cache.index_select(0, a.slots), v_cache.index_select(0, a.slots), a.mask, scale)
    k_c, v_c = k_cache.index_select(0, a.context_slots), v_cache.index_select(0, a.context_slots)
    o_c, lse_c = _attend(q, k_c, v_c, None, scale / a.temperature)
    lse_c[: a.first_query] = -math.inf
    return merge_ape_states(o_r, lse_r, o_c, lse_c, a.scale * a.temperature).to(q.dtype)


def merge_ape_states(
    o_r: torch.Tensor, lse_r: torch.Tensor, o_c: torch.Tensor, lse_c: torch.Tensor, factor: float
) -> torch.Tensor:
    """(w_C·O_C + w_R·O_R) / (w_C + w_R) with ln w_C = factor · lse_C and ln w_R = lse_R (natural log, [n, heads]).

    lse_R is always finite (a token attends itself), so the weights never both vanish."""
    a = lse_c * factor
    m = torch.maximum(a, lse_r)
    w_c = torch.exp(a - m)[..., None]
    w_r = torch.exp(lse_r - m)[..., None]
    return (w_c * o_c + w_r * o_r) / (w_c + w_r)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its natural-log LSE, in float32: q [n, H, D], k/v [L, Hkv, D], mask [n, L] or None
    -> (o [n, H, D], lse [n, H]).

    The query heads of a KV head are stacked into one [group * n, D] matrix, so each part is one batched matmul
    over contiguous operands; one exp pass gives both the weights and the LSE (2-3x torch.logsumexp + softmax)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qf = q.float().view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * n, dim)
    s = torch.bmm(qf, k.float().transpose(0, 1).transpose(1, 2)).mul_(scale)  # [Hkv, group * n, L]
    if mask is not None:
        s.view(kv_heads, group, n, -1).masked_fill_(~mask, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    e = s.sub_(m).exp_()
    z = e.sum(dim=-1, keepdim=True)
    o = torch.bmm(e, v.float().transpose(0, 1)).div_(z)
    lse = (m + z.log()).view(kv_heads, group, n)
    return o.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim), lse.permute(2, 0, 1).reshape(n, heads)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[num_slots, kv_heads, D] gathered at [B, L] slots -> [B, kv_heads, L, D] (a strided view of one copy).

    index_select on the flat index is several times faster than advanced indexing on CPU."""
    b, length = slots.shape
    return cache.index_select(0, slots.view(-1)).view(b, length, cache.shape[1], cache.shape[2]).transpose(1, 2)
