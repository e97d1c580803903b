"""Sampler against references it does not share code with: transformers' logits processors, torch, xgrammar."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from treadle.engine.sampler import Sampler, SeqSamplingState
from treadle.engine.sampling_params import SamplingParams

V = 1000
EOS = [2]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def state(prompt=(), output=(), seed=None, **kw) -> SeqSamplingState:
    s = SeqSamplingState(SamplingParams(**kw), list(prompt), seed)
    for t in output:
        s.append(t)
    return s


def randn(*shape, seed=0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_ties_to_lowest_id(device):
    logits = randn(6, V, device=device)
    logits[0, [5, 17, 900]] = 100.0  # a three-way tie
    sampler = Sampler(V, EOS, device)
    out = sampler.sample(logits, [state(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == 5
    assert out.logprobs == [None] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_matches_transformers(device):
    g = torch.Generator().manual_seed(1)
    logits = randn(4, V, seed=1, device=device)
    rows = []
    for i, penalty in enumerate([1.3, 0.7, 1.0, 2.0]):
        prompt = torch.randint(0, 40, (20,), generator=g).tolist()  # a narrow range: plenty of repeats
        output = torch.randint(0, 40, (7 + 40 * i,), generator=g).tolist()  # past the history buffer's size
        rows.append((prompt, output, penalty))
    states = [state(p, o, temperature=0.0, repetition_penalty=r) for p, o, r in rows]
    got = Sampler(V, EOS, device).sampling_logits(logits, states).cpu()
    for i, (prompt, output, penalty) in enumerate(rows):
        ids = torch.tensor([prompt + output])
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].cpu().clone())[0]
        torch.testing.assert_close(got[i], want)


@pytest.mark.parametrize("device", DEVICES)
def test_presence_and_frequency_penalties_count_output_tokens_only(device):
    logits = randn(3, V, seed=2, device=device)
    specs = [([1, 2, 3], [7, 7, 9, 3], 0.5, 0.25), ([4], [4, 4, 4], -1.0, 2.0), ([5], [], 1.0, 1.0)]
    states = [state(p, o, temperature=0.0, presence_penalty=pp, frequency_penalty=fp) for p, o, pp, fp in specs]
    sampler = Sampler(V, EOS, device)
    got = sampler.sampling_logits(logits, states).cpu()
    for i, (_prompt, output, pp, fp) in enumerate(specs):
        want = logits[i].cpu().clone()
        for tok, n in Counter(output).items():
            want[tok] -= fp * n + pp
        torch.testing.assert_close(got[i], want)
    # Counts keep up with tokens appended after the first step, past the history buffer's first size.
    more = torch.randint(0, 50, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    for t in more:
        states[2].append(t)
    got = sampler.sampling_logits(logits, states).cpu()
    want = logits[2].cpu().clone()
    for tok, n in Counter(more).items():
        want[tok] -= 1.0 * n + 1.0
    torch.testing.assert_close(got[2], want)


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_then_presence_and_frequency_in_one_row(device):
    logits = randn(1, V, seed=6, device=device)
    prompt, output = [3, 4, 5, 5], [5, 6, 6, 9]
    s = state(prompt, output, temperature=0.0, repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3)
    got = Sampler(V, EOS, device).sampling_logits(logits, [s]).cpu()[0]
    want = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), logits.cpu().clone())[0]
    for tok, n in Counter(output).items():  # the prompt's tokens are not "output" for these two
        want[tok] -= 0.3 * n + 0.4
    torch.testing.assert_close(got, want)


def hf_chain(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' sampling warpers in generate()'s order (temperature, top-k, top-p, min-p)."""
    x = logits.clone().unsqueeze(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(ids, x)
    if min_p > 0:
        x = MinPLogitsWarper(min_p)(ids, x)
    return x[0]


WARPER_CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 50, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (0.5, 0, 1.0, 0.05),
    (1.0, 20, 0.8, 0.0),
    (0.9, 100, 0.95, 0.02),
    (2.0, -1, 0.5, 0.1),
    (50.0, 0, 0.9, 0.0),  # nearly flat: the top-p set is larger than the sampler's first candidate search
    (1.0, 600, 0.99, 0.0),  # top_k above the candidate count
]


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_top_k_top_p_min_p_match_transformers(device):
    logits = randn(len(WARPER_CASES) + 1, V, seed=3, device=device)
    states = [state(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in WARPER_CASES]
    states.append(state(temperature=0.0))  # a greedy row in the same batch is left untruncated
    got = Sampler(V, EOS, device).sampling_logits(logits, states).cpu()
    for i, (t, k, p, m) in enumerate(WARPER_CASES):
        want = hf_chain(logits[i].cpu(), t, k, p, m)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), WARPER_CASES[i]
        keep = ~torch.isinf(want)
        torch.testing.assert_close(got[i][keep], want[keep])
    torch.testing.assert_close(got[-1], logits[-1].cpu())
    # sample() draws inside the same kept sets.
    for _ in range(3):
        tokens = Sampler(V, EOS, device).sample(logits, states).token_ids
        assert all(not math.isinf(got[i, t]) for i, t in enumerate(tokens))


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_bans_eos_and_stop_tokens_until_reached(device):
    logits = torch.zeros(4, V, device=device)
    states = [
        state(output=[5], temperature=0.0, min_tokens=2, stop_token_ids=[7, 8]),
        state(output=[5, 6], temperature=0.0, min_tokens=2, stop_token_ids=[7, 8]),  # reached
        state(output=[], temperature=0.0, min_tokens=1, ignore_eos=True, stop_token_ids=[9]),
        state(output=[], temperature=1.0, min_tokens=3),
    ]
    got = Sampler(V, EOS, device).sampling_logits(logits, states).cpu()
    banned = [{2, 7, 8}, set(), {9}, {2}]
    for i, ban in enumerate(banned):
        assert {int(j) for j in torch.nonzero(torch.isinf(got[i]))} == ban


@pytest.mark.parametrize("device", DEVICES)
def test_grammar_allowing_only_eos_outranks_min_tokens(device):
    logits = randn(3, V, seed=7, device=device)
    words = (V + 31) // 32
    bm = torch.zeros(3, words, dtype=torch.int32)
    bm[:, 0] = 1 << EOS[0]  # row 0 and 1: only EOS
    bm[1, 0] |= 1 << 9  # row 1 also allows token 9
    bm[2] = -1
    logits[0, 7] = 50.0  # a banned stop token the grammar does not allow must stay banned
    kw = dict(min_tokens=5, stop_token_ids=[7])
    states = [state(temperature=0.0, **kw), state(temperature=1.0, **kw), state(temperature=0.0, **kw)]
    out = Sampler(V, EOS, device).sample(logits, states, bm)
    assert out.token_ids[:2] == [EOS[0], 9]
    assert out.token_ids[2] != EOS[0]


def random_bitmask(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = (vocab + 31) // 32
    bm = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=g, dtype=torch.int64).to(torch.int32)
    bm[0] = -1  # an unconstrained row: all ones
    return bm


@pytest.mark.parametrize("device", DEVICES)
def test_bitmask_matches_per_token_reference_and_xgrammar(device):
    vocab = 1003  # not a multiple of 32: the last word is partly padding
    logits = randn(5, vocab, seed=4, device=device)
    bm = random_bitmask(5, vocab, seed=4)
    states = [state(temperature=0.0) for _ in range(5)]
    sampler = Sampler(vocab, EOS, device)
    got = sampler.sampling_logits(logits, states, bm).cpu()
    want = logits.cpu().clone()
    words = bm.tolist()
    for b in range(5):
        for tok in range(vocab):
            if not (words[b][tok // 32] >> (tok % 32)) & 1:
                want[b, tok] = -math.inf
    assert torch.equal(got, want)
    xgr = pytest.importorskip("xgrammar")
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, bm.to(device))
    assert torch.equal(got, ref.cpu())
    # Sampled tokens always respect the mask.
    out = sampler.sample(logits, [state(temperature=1.5) for _ in range(5)], bm)
    assert all(not math.isinf(want[b, t]) for b, t in enumerate(out.token_ids))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_draws_follow_the_softmax_over_allowed_tokens(device):
    """Rows with temperature alone and a grammar mask (on CUDA the kernel reads the mask in its one pass)."""
    vocab, n = 40, 20000
    base = torch.linspace(-2.0, 2.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(5))]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[1, 3, 4, 9, 17, 20, 33, 39]] = True
    probs = (base / 0.9).masked_fill(~allowed, -math.inf).softmax(-1).tolist()
    words = sum(1 << t for t in range(32) if allowed[t]), sum(1 << (t - 32) for t in range(32, vocab) if allowed[t])
    bm = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in words]], dtype=torch.int32).repeat(n, 1)
    torch.manual_seed(1)
    out = Sampler(vocab, EOS, device).sample(base.to(device).repeat(n, 1), [state(temperature=0.9)] * n, bm)
    counts = [0] * vocab
    for tok in out.token_ids:
        counts[tok] += 1
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0)
    assert chi_square(counts, probs) < 30 + 3 * (sum(p > 0 for p in probs) - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA upload path")
@pytest.mark.parametrize("pinned", [True, False])
def test_bitmask_uploaded_beside_queued_work_is_exact_step_after_step(pinned):
    """The upload runs on a stream of its own while earlier work is still queued, into buffers reused every step:
    each step must see its own mask, whether it comes pinned (the worker processes' shared one) or staged."""
    vocab = 4099
    sampler = Sampler(vocab, EOS, "cuda")
    host = torch.empty(3, (vocab + 31) // 32, dtype=torch.int32, pin_memory=pinned)
    busy = torch.randn(2048, 2048, device="cuda")
    for step in range(4):
        host.copy_(random_bitmask(3, vocab, seed=step))
        logits = randn(3, vocab, seed=step, device="cuda")
        for _ in range(10):  # queued ahead of sampling, as the forward pass is
            busy = torch.tanh(busy @ busy)
        greedy = [state(temperature=0.0) for _ in range(3)]
        got = sampler.sampling_logits(logits, greedy, host).cpu()
        words = host.tolist()
        want = logits.cpu().clone()
        for b in range(3):
            banned = [t for t in range(vocab) if not (words[b][t // 32] >> (t % 32)) & 1]
            want[b, banned] = -math.inf
        assert torch.equal(got, want)
        for _ in range(10):
            busy = torch.tanh(busy @ busy)
        # The device draw reads the uploaded mask itself.
        assert sampler.sample(logits, greedy, host).token_ids == want.argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_logits_are_masked_in_their_float_copy_and_logprobs_stay_raw(device):
    """bf16 logits are converted to float, and penalties and the mask go into that copy: the caller's tensor is
    untouched, and a row that wants logprobs gets them from the unmasked logits."""
    vocab = 1003
    logits = randn(4, vocab, seed=7, device=device).to(torch.bfloat16)
    given = logits.clone()
    bm = random_bitmask(4, vocab, seed=7)
    greedy = [state(temperature=0.0, repetition_penalty=1.3, output=[int(logits[i].argmax())]) for i in range(4)]
    sampler = Sampler(vocab, EOS, device)
    out = sampler.sample(logits, greedy, bm)
    assert out.token_ids == sampler.sampling_logits(logits.float(), greedy, bm).argmax(dim=-1).tolist()
    assert torch.equal(logits, given)
    out = sampler.sample(logits, [state(temperature=0.0, logprobs=0) for _ in range(4)], bm)
    words = bm.tolist()
    ref = torch.log_softmax(logits.cpu().double(), dim=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert (words[i][tok // 32] >> (tok % 32)) & 1
        assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
    assert torch.equal(logits, given)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2),
                                dict(temperature=0.8, repetition_penalty=1.2)])
def test_seeded_rows_reproduce_whatever_else_is_in_the_batch(device, kw):
    """Also a row drawn by the CUDA kernel (temperature alone) in a batch whose other rows the torch path draws."""
    sampler = Sampler(V, EOS, device)

    def run(batch_of: str, steps: int = 8) -> list[int]:
        target = state([1, 2, 3], seed=1234, **kw)
        others = {
            "alone": [],
            "mixed": [
                state([4], temperature=0.0),
                state([5], seed=99, temperature=1.0, top_k=5),
                state([6], temperature=1.1, min_p=0.1),
            ],
        }[batch_of]
        states = others[:1] + [target] + others[1:]
        row = states.index(target)
        tokens = []
        for step in range(steps):
            logits = randn(len(states), V, seed=200 + step, device=device)
            logits[row] = randn(V, seed=100 + step, device=device)
            out = sampler.sample(logits, states)
            for s, t in zip(states, out.token_ids):
                s.append(t)
            tokens.append(out.token_ids[row])
        return tokens

    alone = run("alone")
    assert run("mixed") == alone
    assert run("alone") == alone


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_give_different_draws(device):
    sampler = Sampler(V, EOS, device)
    logits = torch.zeros(1, V, device=device)  # uniform: any two seeds agreeing 8 times is ~1e-24
    draws = []
    for seed in (1, 2):
        s = state(seed=seed, temperature=1.0)
        draws.append([sampler.sample(logits, [s]).token_ids[0] for _ in range(8)])
    assert draws[0] != draws[1]


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.7), dict(top_k=6, top_p=0.9, temperature=0.8),
                                dict(temperature=0.7)])
def test_sampled_frequencies_follow_the_truncated_distribution(device, kw):
    vocab, n = 12, 20000
    base = torch.tensor([0.0, 1.5, -3.0, 1.0, 0.5, -1.0, 2.0, -0.5, 0.3, -1.5, -2.0, 1.4])  # ids not in rank order
    t = kw.get("temperature", 1.0)
    probs = hf_chain(base, t, kw.get("top_k", 0), kw.get("top_p", 1.0), 0.0).softmax(-1).tolist()
    torch.manual_seed(0)  # unseeded rows share the global generator; fixing it keeps the test deterministic
    sampler = Sampler(vocab, EOS, device)
    out = sampler.sample(base.to(device).repeat(n, 1), [state(**kw) for _ in range(n)])
    counts = [0] * vocab
    for tok in out.token_ids:
        counts[tok] += 1
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0)
    dof = sum(p > 0 for p in probs) - 1
    assert chi_square(counts, probs) < 30 + 3 * dof  # far beyond the 1e-4 tail for these dof


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_raw_log_softmax(device):
    logits = randn(3, V, seed=5, device=device)
    states = [
        state(temperature=0.0, logprobs=3, repetition_penalty=1.5, output=[int(logits[0].argmax())]),
        state(temperature=1.0, logprobs=0),
        state(temperature=1.0),
    ]
    out = Sampler(V, EOS, device).sample(logits, states)
    ref = torch.log_softmax(logits.cpu().double(), dim=-1)
    for i in (0, 1):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-5)
    top = out.logprobs[0].top
    want = ref[0].topk(3)
    assert [t for t, _ in top] == want.indices.tolist()
    assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert out.logprobs[1].top == []
    assert out.logprobs[2] is None


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_are_rejected(device):
    """On CUDA the default row (temperature alone) goes to the device draw, which checks the mask itself."""
    sampler = Sampler(V, EOS, device)
    with pytest.raises(ValueError, match="logits must be"):
        sampler.sample(torch.zeros(2, V, device=device), [state()])
    with pytest.raises(ValueError, match="bitmask must be"):
        sampler.sample(torch.zeros(1, V, device=device), [state()], torch.zeros(1, 3, dtype=torch.int32))
