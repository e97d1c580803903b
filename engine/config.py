"""Configuration records shared by the loader, the model runner, the scheduler and the server.

Plain dataclasses so that every layer can build and inspect them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Architecture facts the model code needs, filled by the loader from GGUF metadata or config.json."""

    architecture: str  # "llama" (Llama 2/3.x, SmolLM, Mistral) | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style dict, e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class EngineConfig:
    """Everything `treadle serve` passes to the engine; defaults come from configs/<device>.yaml."""

    model: str | None = None  # GGUF file, HF-style directory, or None for the embedded default model
    served_model_name: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    page_size: int = 16
    num_pages: int | None = None  # None: derive from kv_memory_fraction (CUDA) or kv_cache_gb (CPU)
    kv_cache_gb: float = 1.0
    kv_memory_fraction: float = 0.85
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int = 1024
    enable_prefix_caching: bool = True
    max_logprobs: int = 20
    seed: int = 0
    weights_cache_dir: str | None = None  # None: ~/.cache/treadle
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    quantization: str | None = None  # "wNa16": weight-only N-bit linear layers, quantized at load time
    quant_bits: int = 4  # N of wNa16: 2, 3, 4, 5, 6 or 8
    quant_group_size: int = 128  # weights sharing one scale and zero point
    # Processes holding the matchers of structured-output requests (engine/grammar_procs.py); 0 = a thread of the
    # server process, which suits a CPU box whose cores the model uses.
    grammar_workers: int = 0
    # APE cached contexts (engine/ape.py). The serve config is per deployment, so these are the served model's
    # defaults. Shared prefix: "chat" = the chat template rendered up to where the first user message's content
    # begins; "bos" = the BOS token alone (or nothing if the model has none).
    ape_shared_prefix: Literal["chat", "bos"] = "chat"
    ape_temperature: float = 0.9
    ape_scale: float = 0.9
