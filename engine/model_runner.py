"""Runs one forward pass over the scheduler's ragged batch and returns the logits the sampler needs.

Owns the paged KV tensors (one [num_slots, kv_heads, head_dim] K and V per layer). Chunks are reordered decode
rows first, then prefill chunks, then APE chunks (the layout paged_attention batches over); logits come back in
the caller's order. APE chunks never run in the CUDA graphs, which know only plain causal attention.
"""

from __future__ import annotations

import torch

from .batch import SeqChunk
from .config import EngineConfig, ModelConfig
from .loader import torch_dtype
from .models.attention import AttentionMetadata
from .models.llama import LlamaForCausalLM

SMALL_STEP_TOKENS = 4


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, model_config: ModelConfig, engine_config: EngineConfig, num_slots: int
    ):
        self.model = model
        self.model_config = model_config
        self.device = torch.device(engine_config.device)
        self.dtype = torch_dtype(engine_config.dtype)
        if self.device.type == "cpu" and engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        self.num_threads = torch.get_num_threads()
        # Torch threads for steps of at most SMALL_STEP_TOKENS tokens on CPU; None: all of them. The async engine
        # leaves one core to the event loop there (see reserve_core_for_server).
        self.small_step_threads: int | None = None
        shape = (num_slots, model_config.num_kv_heads, model_config.head_dim)
        # Zeros, not empty: padded decode rows gather slot 0, and NaN garbage there would survive a zero softmax weight.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(model_config.num_layers)
        ]
        # On CUDA, decode-only steps replay the Triton kernels from per-batch-size CUDA graphs.
        self.graph_decoder = None
        if self.device.type == "cuda":
            from treadle.kernels.cuda_graph_runner import CudaGraphDecoder

            max_len = engine_config.max_model_len or model_config.max_position_embeddings
            self.graph_decoder = CudaGraphDecoder(model, self.kv_caches, engine_config.max_num_seqs, max_len)

    @staticmethod
    def kv_bytes_per_slot(model_config: ModelConfig, dtype: torch.dtype | str) -> int:
        """K and V of one token across all layers."""
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * elem

    def reserve_core_for_server(self) -> None:
        """Run small CPU steps on one core fewer, for a server whose event loop shares the machine.

        An OpenMP team that shares a core with a busy thread waits at every op's barrier for its descheduled
        member, while a step of a few rows gains little from the last core: on the 2-core box, batch-1 decode over
        HTTP streams 57 tok/s on one torch thread and 47 on two (batches of 16 still gain from both)."""
        if self.device.type == "cpu" and self.num_threads > 1:
            self.small_step_threads = self.num_threads - 1

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """float32 logits [number of chunks with need_logits, vocab], in chunk order."""
        if not chunks:
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        if self.small_step_threads is not None:
            small = sum(len(c.token_ids) for c in chunks) <= SMALL_STEP_TOKENS
            want = self.small_step_threads if small else self.num_threads
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        g = self.graph_decoder
        if g is not None and len(chunks) <= g.max_batch_size and all(
            len(c.token_ids) == 1 and c.need_logits and c.ape is None for c in chunks
        ):
            return g.decode([c.token_ids[0] for c in chunks], [c.positions[0] for c in chunks], [c.kv_slots for c in chunks])
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1 and c.ape is None]
        prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) != 1 and c.ape is None]
        ape = [i for i, c in enumerate(chunks) if c.ape is not None]  # APE: their own attention path, last
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        last_row = [0] * len(chunks)  # batch row of each chunk's last new token
        for i in decode + prefill + ape:
            c = chunks[i]
            n = len(c.token_ids)
            if n == 0:
                raise ValueError("a chunk needs at least one new token")
            ids += c.token_ids
            positions += c.positions
            slot_mapping += c.kv_slots[-n:]
            last_row[i] = len(ids) - 1
        if not len(ids) == len(positions) == len(slot_mapping):
            raise ValueError("every new token needs one position id and one KV slot")
        attn = AttentionMetadata.build(
            decode_slots=[chunks[i].kv_slots for i in decode],
            prefill_slots=[chunks[i].kv_slots for i in prefill],
            prefill_num_new=[len(chunks[i].token_ids) for i in prefill],
            slot_mapping=slot_mapping,
            logits_indices=[last_row[i] for i, c in enumerate(chunks) if c.need_logits],
            device=self.device,
            ape_chunks=[chunks[i] for i in ape],
            use_kernels=self.device.type == "cuda",
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long).to(self.device),
            torch.tensor(positions, dtype=torch.long).to(self.device),
            attn,
            self.kv_caches,
        )
        return self.model.compute_logits(hidden)
