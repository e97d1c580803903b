"""Device sampling against transformers' warpers: greedy is exact argmax, draws never leave the top-k/top-p support,
their frequencies match the filtered distribution, and a row's draw depends only on its own seed."""

from __future__ import annotations

import pytest
import torch

from kernels_testing import DEVICE, ON_GPU  # noqa: I001  (sets up the interpreter first)

from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from treadle.kernels.reference import sampling_probs_reference
from treadle.kernels.sampling import DrawScratch, draw_tokens, sample_tokens

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
    assert_close_in_distribution(counts, expected)


def assert_close_in_distribution(counts: torch.Tensor, expected: torch.Tensor) -> None:
    """Total variation distance of the empirical distribution, against 3x its expected sampling noise."""
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


# ---- the plain draw (temperature only) with the grammar bitmask read in the same pass -----------------------------
PLAIN_BLOCK = 1024 if ON_GPU else 64  # the smallest block: several blocks and parts per row in the interpreter


def _bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """xgrammar's layout of a [B, V] bool tensor: int32 words, bit j of word w for token 32w + j."""
    batch, vocab = allowed.shape
    padded = torch.zeros(batch, (vocab + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.cpu().long()
    words = (padded.view(batch, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("parts", [1, 3])
def test_plain_greedy_is_the_first_argmax_among_allowed_tokens(parts):
    torch.manual_seed(3)
    logits = torch.randn(4, VOCAB, device=DEVICE)
    allowed = torch.rand(4, VOCAB) < 0.5
    allowed[:, VOCAB - 1] = True
    logits[0, 5] = logits[0, VOCAB - 1] = 50.0  # a tie between allowed tokens: the lower id wins
    allowed[0, 5] = True
    logits[1, 2] = 60.0  # the largest logit, banned
    allowed[1, 2] = False
    out = draw_tokens(logits, torch.zeros(4, device=DEVICE), torch.arange(4, device=DEVICE), _bitmask(allowed),
                      parts=parts, block=PLAIN_BLOCK)
    expected = logits.cpu().masked_fill(~allowed, -float("inf")).argmax(-1)
    assert out.tolist() == expected.tolist()
    assert out[0].item() == 5 and out[1].item() != 2
    unmasked = draw_tokens(logits, torch.zeros(4, device=DEVICE), torch.arange(4, device=DEVICE), parts=parts,
                           block=PLAIN_BLOCK)
    assert unmasked.tolist() == logits.cpu().argmax(-1).tolist()


def test_plain_draws_follow_the_masked_softmax():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(VOCAB, generator=gen) * 2.0
    allowed = torch.rand(VOCAB, generator=gen) < 0.6
    temperature = 0.8
    expected = torch.softmax((logits / temperature).masked_fill(~allowed, -float("inf")).double(), -1)
    seeds = torch.arange(DRAWS, device=DEVICE) * 7919 + 11
    out = draw_tokens(logits.to(DEVICE).expand(DRAWS, VOCAB), torch.full((DRAWS,), temperature, device=DEVICE),
                      seeds, _bitmask(allowed.expand(DRAWS, VOCAB)), parts=1, block=128 if not ON_GPU else 1024)
    counts = torch.bincount(out.cpu(), minlength=VOCAB).double()
    assert counts[~allowed].sum() == 0, "drew a banned token"
    assert_close_in_distribution(counts, expected)


def test_plain_draw_depends_on_the_row_seed_not_on_the_split():
    torch.manual_seed(5)
    logits = torch.randn(3, VOCAB, device=DEVICE)
    temps = torch.tensor([1.0, 0.7, 1.6], device=DEVICE)
    seeds = torch.tensor([3, 5, 8], device=DEVICE)
    one = draw_tokens(logits, temps, seeds, parts=1, block=PLAIN_BLOCK)
    assert torch.equal(one, draw_tokens(logits, temps, seeds, parts=2, block=PLAIN_BLOCK))
    assert torch.equal(one[1:2], draw_tokens(logits[1:2], temps[1:2], seeds[1:2], parts=1, block=PLAIN_BLOCK))
    base = 1 << 40  # an int stands for the seeds base + row
    assert torch.equal(draw_tokens(logits, temps, base, parts=2, block=PLAIN_BLOCK),
                       draw_tokens(logits, temps, base + torch.arange(3, device=DEVICE), parts=1, block=PLAIN_BLOCK))
    scratch = DrawScratch(torch.device(DEVICE))  # reused across launches of other shapes: left clean by each
    for parts, rows in ((2, slice(0, 3)), (1, slice(1, 2)), (2, slice(0, 3)), (2, slice(1, 3))):
        again = draw_tokens(logits[rows], temps[rows], seeds[rows], parts=parts, block=PLAIN_BLOCK, scratch=scratch)
        assert torch.equal(again, one[rows])
    assert not scratch.counts.any()
    others = [draw_tokens(logits, temps, seeds + k, parts=1, block=PLAIN_BLOCK) for k in range(1, 6)]
    assert any(not torch.equal(one, o) for o in others), "the seed does not reach the noise"


def test_plain_draw_rejects_bad_inputs():
    logits = torch.randn(2, 40, device=DEVICE)
    temps, seeds = torch.ones(2, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="bitmask"):
        draw_tokens(logits, temps, seeds, torch.zeros(2, 1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seeds"):
        draw_tokens(logits, temps, seeds.int())
    with pytest.raises(ValueError, match="temperature"):
        draw_tokens(logits, temps.double(), seeds)
