"""The kernel decode step (CudaGraphDecoder) against the model's own torch path (engine.models, itself tested against
transformers): same logits over ragged, shuffled KV indices, padded buckets, for Llama, Qwen2 (qkv bias) and Qwen3
(q/k norm). Without a GPU the step runs eagerly under Triton's interpreter; with one, through CUDA graphs."""

from __future__ import annotations

import random

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU, rel_err  # noqa: I001  (sets up the interpreter first)

from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig, ModelConfig
from treadle.engine.model_runner import ModelRunner
from treadle.engine.models.llama import LlamaForCausalLM
from treadle.kernels import cuda_graph_runner
from treadle.kernels.cuda_graph_runner import CudaGraphDecoder, batch_buckets

ARCHS = {
    "llama": dict(architecture="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": dict(architecture="qwen2", attention_bias=True),
    "qwen3": dict(architecture="qwen3", qk_norm=True, tie_word_embeddings=False),
}


def _model(arch: str) -> LlamaForCausalLM:
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2,
                      head_dim=16, rope_theta=1e4, max_position_embeddings=256,
                      **{"tie_word_embeddings": True, **ARCHS[arch]})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # the model leaves its parameters uninitialized (a checkpoint always fills them)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial gains, so a norm applied with the wrong weight shows
            elif "bias" in name or "embed" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return model.to(DEVICE).eval()


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize("arch,gemv", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)])
def test_decode_steps_match_the_torch_model(arch, gemv, monkeypatch):
    """`gemv`: projections through the Triton GEMV (small batches), else through torch's linear (cuBLAS)."""
    monkeypatch.setattr(cuda_graph_runner, "GEMV_MAX_BATCH", 16 if gemv else 0)
    model = _model(arch)
    page_size, num_pages = 4, 40
    engine_cfg = EngineConfig(device=DEVICE, dtype="float32", max_num_seqs=4)
    runner = ModelRunner(model, model.config, engine_cfg, page_size * num_pages)
    runner.graph_decoder = None  # the reference is the model's own torch path (on CUDA the runner has both)
    decoder = CudaGraphDecoder(model, runner.kv_caches, max_batch_size=4, max_model_len=64)
    rng = random.Random(1)
    free_pages = list(range(num_pages))
    rng.shuffle(free_pages)

    def grow(slots: list[int], n: int) -> None:
        for _ in range(n):
            if len(slots) % page_size == 0:
                slots_page.append(free_pages.pop())
            slots.append(slots_page[-1] * page_size + len(slots) % page_size)

    # Three sequences, prompt lengths around a page boundary; each prefilled by the model's own path.
    seqs = []
    for prompt_len in (3, 4, 9):
        slots_page: list[int] = []
        slots: list[int] = []
        grow(slots, prompt_len)
        ids = [rng.randrange(96) for _ in range(prompt_len)]
        runner.execute([SeqChunk(ids, list(range(prompt_len)), list(slots), True)])
        seqs.append((slots, slots_page))

    for _ in range(3):  # decode steps: batch 3 runs in bucket 4 with one padding row
        chunks = []
        for slots, pages in seqs:
            slots_page = pages
            grow(slots, 1)
            chunks.append(SeqChunk([rng.randrange(96)], [len(slots) - 1], list(slots), True))
        new = torch.tensor([c.kv_slots[-1] for c in chunks], device=DEVICE)
        before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        ours = decoder.decode([c.token_ids[0] for c in chunks], [c.positions[0] for c in chunks],
                              [c.kv_slots for c in chunks])
        others = torch.ones(page_size * num_pages, dtype=torch.bool, device=DEVICE)
        others[new] = False
        for (k0, v0), (k1, v1) in zip(before, runner.kv_caches):
            assert torch.equal(k0[others], k1[others]) and torch.equal(v0[others], v1[others])
        ref = runner.execute(chunks)  # rewrites the same slots with its own K/V, then attends
        assert ours.shape == (3, 96)
        assert rel_err(ours, ref) < 1e-5
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_decode_rejects_bad_steps():
    model = _model("llama")
    kv = [(torch.zeros(32, 2, 16, device=DEVICE), torch.zeros(32, 2, 16, device=DEVICE)) for _ in range(2)]
    decoder = CudaGraphDecoder(model, kv, max_batch_size=2, max_model_len=8)
    with pytest.raises(ValueError, match="rows"):
        decoder.decode([1, 2, 3], [0, 0, 0], [[0], [1], [2]])
    with pytest.raises(ValueError, match="position"):
        decoder.decode([1], [8], [[0]])
    with pytest.raises(ValueError, match="KV index"):
        decoder.decode([1], [0], [list(range(9))])
    assert ON_GPU or not decoder.use_cuda_graphs
