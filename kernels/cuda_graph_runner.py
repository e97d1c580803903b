"""Decode steps of the Llama-family model on CUDA: the Triton kernels of this package, replayed from CUDA graphs.

At decode batch sizes a step is ~10 small kernels per layer around the GEMVs, and launching them one by one from
Python costs more than running them. So each batch-size bucket (1, 2, 4, 8, then multiples of 8) gets one CUDA
graph, captured once at start-up. Everything that changes between steps (token ids, positions, the new tokens'
slots, the KV index in CSR form) lives in one static int32 device buffer at fixed addresses; a step fills a pinned
host copy, sends it with one async copy, and replays the graph of the smallest bucket that fits. Rows past the
real batch are padding: empty KV index (attention gives 0) and slot -1 (no KV write), so they touch nothing.

Per layer: RMSNorm fused with the residual add, QKV projection, RoPE fused with the KV append, split-KV paged
decode attention (+ merge), O projection, RMSNorm+residual, gate/up projection, SiLU*mul, down projection. Up to
GEMV_MAX_BATCH rows the projections and the LM head are Triton GEMVs (kernels/gemv.py, a little faster than
cuBLAS there), SiLU*mul is fused into the gate/up projection's GEMV and the LM head writes the logits buffer
directly: each launch saved is a few microseconds of a graph replay; above, cuBLAS. The weights are the model's own tensors (no copies). Prefill stays on the model's
eager path; both write the same KV cache tensors.

On a CPU (tests, under Triton's interpreter) the same step runs eagerly, without graphs.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from .activation import silu_and_mul
from .attention_decode import decode_num_splits, paged_decode_attention
from .gemv import gemv
from .norm import rmsnorm
from .quant_linear import QuantLinear
from .rope import rope_cos_sin_cache, rope_kv_append


GEMV_MAX_BATCH = 16  # up to here projections run as Triton GEMVs (kernels/gemv.py); above, through cuBLAS


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including max_batch_size."""
    sizes = [b for b in (1, 2, 4) if b < max_batch_size] + list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


class CudaGraphDecoder:
    """Runs decode steps (one new token per sequence) of `model` against the runner's KV cache.

    `model` is an `engine.models.llama.LlamaForCausalLM` (Llama, Qwen2 with qkv bias, Qwen3 with q/k norm);
    `kv_caches` the runner's per-layer (K, V) tensors [num_slots, Hkv, D]. `max_model_len` bounds each sequence's
    KV index and its position ids. `buckets` (default `batch_buckets(max_batch_size)`) are the batch sizes that
    get a graph; the largest must be max_batch_size.
    """

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_batch_size: int,
                 max_model_len: int, buckets: list[int] | None = None, use_cuda_graphs: bool | None = None):
        cfg = model.config
        self.model = model
        self.kv_caches = kv_caches
        self.device = model.embed_tokens.weight.device
        self.vocab_size = cfg.vocab_size
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.lm_head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        inv_freq = model.rotary.inv_freq
        self.cos_sin = rope_cos_sin_cache(inv_freq, max_model_len, self.device)

        # One int32 buffer: tokens, positions, new slots [max_batch] each, kv_indptr [max_batch + 1], kv_indices.
        b = max_batch_size
        self._offsets = {"tokens": 0, "positions": b, "slots": 2 * b, "indptr": 3 * b, "indices": 4 * b + 1}
        size = 4 * b + 1 + b * max_model_len
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=on_cuda)
        self._host_np = self._host.numpy()
        self._meta = torch.zeros(size, dtype=torch.int32, device=self.device)
        self._logits = torch.zeros(b, self.vocab_size, dtype=torch.float32, device=self.device)
        self._copied = torch.cuda.Event() if on_cuda else None
        if on_cuda:
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            sms = 4
        self.buckets = sorted(buckets) if buckets else batch_buckets(max_batch_size)
        if self.buckets[0] < 1 or self.buckets[-1] != max_batch_size:
            raise ValueError("buckets must be positive and end at max_batch_size")
        self._splits = {bb: decode_num_splits(bb, self.num_kv_heads, sms) for bb in self.buckets}
        self.use_cuda_graphs = on_cuda if use_cuda_graphs is None else use_cuda_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.use_cuda_graphs:
            self._capture()

    def _field(self, name: str, n: int) -> torch.Tensor:
        off = self._offsets[name]
        return self._meta[off : off + n]

    @staticmethod
    def _linear(x: torch.Tensor, proj: torch.nn.Module, small: bool) -> torch.Tensor:
        if isinstance(proj, QuantLinear):  # weight-only quantized (--quantization): its own fused kernel
            return proj(x)
        return gemv(x, proj.weight, proj.bias) if small else F.linear(x, proj.weight, proj.bias)

    @torch.inference_mode()
    def _step(self, bucket: int) -> None:
        """The whole decode step for `bucket` rows, reading metadata from the static buffer, logits into _logits."""
        tokens = self._field("tokens", bucket)
        positions = self._field("positions", bucket)
        slots = self._field("slots", bucket)
        indptr = self._field("indptr", bucket + 1)
        indices = self._meta[self._offsets["indices"] :]
        splits = self._splits[bucket]
        small = bucket <= GEMV_MAX_BATCH
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(tokens, self.model.embed_tokens.weight)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.model.layers, self.kv_caches):
            if residual is None:  # first layer: the embedding is the residual stream
                h, residual = rmsnorm(x, layer.input_norm.weight, self.eps)[0], x
            else:
                h, residual = rmsnorm(x, layer.input_norm.weight, self.eps, residual)
            qkv = self._linear(h, layer.qkv_proj, small)
            q = qkv[:, : hq * d].view(bucket, hq, d)
            k = qkv[:, hq * d : (hq + hkv) * d].view(bucket, hkv, d)
            v = qkv[:, (hq + hkv) * d :].view(bucket, hkv, d)
            if layer.q_norm is not None:
                q = rmsnorm(q.reshape(bucket * hq, d), layer.q_norm.weight, self.eps)[0].view(bucket, hq, d)
                k = rmsnorm(k.reshape(bucket * hkv, d), layer.k_norm.weight, self.eps)[0].view(bucket, hkv, d)
            q = rope_kv_append(q, k, v, positions, self.cos_sin, slots, k_cache, v_cache)
            o, _ = paged_decode_attention(q, k_cache, v_cache, indptr, indices, layer.scale, num_splits=splits)
            x = self._linear(o.view(bucket, hq * d), layer.o_proj, small)
            h, residual = rmsnorm(x, layer.post_attention_norm.weight, self.eps, residual)
            gate_up = layer.gate_up_proj
            if small and not isinstance(gate_up, QuantLinear):  # the activation fused into the GEMV's epilogue
                act = gemv(h, gate_up.weight, gate_up.bias, silu_mul=True)
            else:
                act = silu_and_mul(self._linear(h, gate_up, small))
            x = self._linear(act, layer.down_proj, small)
        h, _ = rmsnorm(x, self.model.norm.weight, self.eps, residual)
        if small:
            gemv(h, self.lm_head, out_dtype=torch.float32, out=self._logits[:bucket])
        else:
            self._logits[:bucket].copy_(F.linear(h, self.lm_head))

    def _capture(self) -> None:
        """Warm up (Triton compiles here) and capture every bucket, largest first so smaller ones reuse its pool."""
        self._fill([], [], [])  # all rows padding: nothing is read from or written to the KV cache
        self._send(0)
        pool = torch.cuda.graph_pool_handle()
        for bucket in sorted(self.buckets, reverse=True):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def _fill(self, token_ids: list[int], positions: list[int], kv_slots: list[list[int]]) -> int:
        """Write one step's metadata into the host buffer (padding rows beyond the batch); return its nnz."""
        b, host, off = len(token_ids), self._host_np, self._offsets
        pad = self.max_batch_size
        host[off["tokens"] : off["tokens"] + b] = token_ids
        host[off["tokens"] + b : off["tokens"] + pad] = 0
        host[off["positions"] : off["positions"] + b] = positions
        host[off["positions"] + b : off["positions"] + pad] = 0
        lengths = np.fromiter((len(s) for s in kv_slots), dtype=np.int64, count=b)
        ends = np.cumsum(lengths)
        nnz = int(ends[-1]) if b else 0
        host[off["slots"] : off["slots"] + b] = [s[-1] for s in kv_slots]
        host[off["slots"] + b : off["slots"] + pad] = -1
        host[off["indptr"]] = 0
        host[off["indptr"] + 1 : off["indptr"] + 1 + b] = ends
        host[off["indptr"] + 1 + b : off["indptr"] + 1 + pad] = nnz
        host[off["indices"] : off["indices"] + nnz] = np.fromiter(
            itertools.chain.from_iterable(kv_slots), dtype=np.int32, count=nnz
        )
        return nnz

    def _send(self, nnz: int) -> None:
        n = self._offsets["indices"] + nnz
        self._meta[:n].copy_(self._host[:n], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def decode(self, token_ids: list[int], positions: list[int], kv_slots: list[list[int]]) -> torch.Tensor:
        """One decode step: row i feeds token_ids[i] at positions[i]; kv_slots[i] is that sequence's whole KV
        index, whose last entry is the slot for the new token's K/V. Returns float32 logits [B, vocab]."""
        b = len(token_ids)
        if not 0 < b <= self.max_batch_size or len(positions) != b or len(kv_slots) != b:
            raise ValueError(f"need 1..{self.max_batch_size} rows with one position and one KV index each")
        if max(positions) >= self.max_model_len or min(positions) < 0:
            raise ValueError(f"position ids must be in [0, {self.max_model_len})")
        if any(not 0 < len(s) <= self.max_model_len for s in kv_slots):
            raise ValueError(f"each KV index needs 1..{self.max_model_len} entries")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        nnz = self._fill(token_ids, positions, kv_slots)
        self._send(nnz)
        bucket = next(bb for bb in self.buckets if bb >= b)
        if self.use_cuda_graphs:
            self.graphs[bucket].replay()
        else:
            self._step(bucket)
        return self._logits[:b].clone()
