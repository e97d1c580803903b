"""Device sampling against transformers' warpers: greedy is exact argmax, draws never leave the top-k/top-p support,
their frequencies match the filtered distribution, and a row's draw depends only on its own seed."""

from __future__ import annotations

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU  # noqa: I001  (sets up the interpreter first)

from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from treadle.kernels.reference import sampling_probs_reference
from treadle.kernels.sampling import sample_tokens

VOCAB = 4000 if ON_GPU else 70
BLOCK = 1024 if ON_GPU else 32  # several blocks per row: exercises the carries between blocks
# The interpreter runs ~0.1 s per sampled row, so the distribution checks draw few rows, one block each.
DRAWS, DRAW_BLOCK = (4000, 1024) if ON_GPU else (100, 128)


def _params(n, temperature, top_k, top_p):
    return (
        torch.full((n,), temperature, device=DEVICE),
        torch.full((n,), top_k, dtype=torch.int32, device=DEVICE),
        torch.full((n,), top_p, device=DEVICE),
    )


def _hf_probs(logits, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].double())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


def test_greedy_is_first_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB, device=DEVICE)
    logits[1, 3] = logits[1, VOCAB - 2] = 50.0  # a tie: the lower id wins, as torch.argmax
    logits[2] = -float("inf")
    logits[2, VOCAB - 1] = 0.0  # everything banned but the last token
    logits[3, :] = 1.0  # all equal
    out = sample_tokens(logits, *_params(5, 0.0, 0, 1.0), torch.arange(5, device=DEVICE), block=BLOCK)
    assert out.tolist() == [int(torch.argmax(r)) for r in logits.cpu()]
    assert out.tolist()[1:4] == [3, VOCAB - 1, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (1.5, 0, 0.6), (1.2, 9, 0.7)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    logits = (torch.randn(VOCAB, generator=gen) * 2.5).to(DEVICE)
    expected = sampling_probs_reference(logits[None], torch.tensor([temperature]), torch.tensor([top_k]),
                                        torch.tensor([top_p]))[0].cpu()
    assert torch.allclose(expected, _hf_probs(logits.cpu(), temperature, top_k, top_p), atol=1e-9)
    seeds = torch.arange(DRAWS, device=DEVICE) * 7919 + 11
    out = sample_tokens(logits.expand(DRAWS, VOCAB), *_params(DRAWS, temperature, top_k, top_p), seeds,
                        block=DRAW_BLOCK)
    counts = torch.bincount(out.cpu(), minlength=VOCAB).double()
    assert counts[expected == 0].sum() == 0, "drew a token outside the top-k/top-p support"
    # Total variation distance of the empirical distribution, against 3x its expected sampling noise.
    noise = 0.5 * (2 * expected * (1 - expected) / (torch.pi * DRAWS)).sqrt().sum().item()
    tvd = 0.5 * (counts / DRAWS - expected).abs().sum().item()
    assert tvd < 3 * noise, (tvd, noise)


def test_draw_depends_only_on_the_row_seed():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB, device=DEVICE)
    seeds = torch.tensor([3, 5, 8, 13], device=DEVICE)
    params = (
        torch.tensor([1.0, 0.7, 1.3, 1.0], device=DEVICE),
        torch.tensor([0, 5, 0, 3], dtype=torch.int32, device=DEVICE),
        torch.tensor([1.0, 0.9, 0.5, 0.8], device=DEVICE),
    )
    together = sample_tokens(logits, *params, seeds, block=BLOCK)
    again = sample_tokens(logits, *params, seeds, block=BLOCK)
    assert torch.equal(together, again)
    for r in range(4):
        alone = sample_tokens(logits[r : r + 1], *(p[r : r + 1] for p in params), seeds[r : r + 1], block=BLOCK)
        assert alone.item() == together[r].item()


def test_sampling_rejects_bad_parameters():
    logits = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(logits, torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE),
                      torch.zeros(2, dtype=torch.int64, device=DEVICE))


@pytest.mark.skipif(not ON_GPU, reason="real vocabulary sizes run on the GPU machine")
def test_real_vocab():
    torch.manual_seed(2)
    batch, vocab = 64, 128256
    logits = torch.randn(batch, vocab, device=DEVICE) * 3
    seeds = torch.arange(batch, device=DEVICE)
    greedy = sample_tokens(logits, *_params(batch, 0.0, 0, 1.0), seeds)
    assert torch.equal(greedy, logits.argmax(-1))
    expected = sampling_probs_reference(logits[:8], torch.ones(8), torch.full((8,), 50), torch.full((8,), 0.9))
    drawn = sample_tokens(logits, *_params(batch, 1.0, 50, 0.9), seeds)
    assert (expected[torch.arange(8), drawn[:8]] > 0).all()
