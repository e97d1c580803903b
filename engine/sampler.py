"""Turn a batch of next-token logits into tokens: penalties, bans, grammar mask, temperature, truncation, draw.

Called once per engine step with one row per sequence, so everything is batched tensor work; Python cost is
O(1) per sequence (parameter lists, no per-row `.item()`), and steps that no row needs are skipped.
The same code runs on CPU and CUDA.

Sampling uses the exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks i with probability p_i. It needs
no normalised cumulative sums and no host sync, and a seeded row simply draws its q from its own generator, so
its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass
class TokenLogprobIds:
    """Logprobs of one sampled token, by id; the engine adds the token texts.

    Values come from the model's raw distribution (log_softmax of the logits before penalties, masks and
    temperature), as vLLM reports by default, so they describe the model rather than the sampling settings.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first, params.logprobs entries


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobIds | None]  # None for rows that did not ask for logprobs


class SeqSamplingState:
    """One sequence's sampling parameters and the history its penalties need, kept incrementally.

    Penalty rows keep device tensors (output token counts, prompt-token mask) created at the first step and
    updated by `append`, so a step never rebuilds them from the whole history.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], seed: int | None):
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.seed = seed
        self.output_token_ids: list[int] = []
        self.generator: torch.Generator | None = None  # created on the sampler's device at the first draw
        self.uses_repetition = params.repetition_penalty != 1.0
        self.uses_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.output_counts: torch.Tensor | None = None  # float32 [V], when any penalty is set
        self.prompt_mask: torch.Tensor | None = None  # bool [V], when repetition_penalty != 1

    def append(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.output_counts is not None:
            self.output_counts[token_id] += 1

    def ensure_penalty_tensors(self, vocab_size: int, device: torch.device) -> None:
        if self.output_counts is not None or not (self.uses_repetition or self.uses_counts):
            return
        counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if self.output_token_ids:
            ids = torch.tensor(self.output_token_ids, dtype=torch.long, device=device)
            counts.index_add_(0, ids, torch.ones(len(self.output_token_ids), device=device))
        self.output_counts = counts
        if self.uses_repetition:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if self.prompt_token_ids:
                mask[torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)] = True
            self.prompt_mask = mask

    def ensure_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device | str):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self._bit_shifts = torch.arange(32, dtype=torch.int32, device=self.device)

    # ---- public API ------------------------------------------------------------------------------------------
    def sample(
        self,
        logits: torch.Tensor,
        states: list[SeqSamplingState],
        bitmask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick one token per row of `logits` [B, V] for the matching state (the caller appends it)."""
        logits = self._check(logits, states)
        x = self._penalized(logits, states, bitmask)
        sampling_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if not sampling_rows:
            tokens = x.argmax(dim=-1)
        elif len(sampling_rows) == len(states):
            tokens = self._draw(self._truncated(x, states), states)
        else:
            rows = torch.tensor(sampling_rows, device=self.device)
            sub = [states[i] for i in sampling_rows]
            tokens = x.argmax(dim=-1)
            tokens[rows] = self._draw(self._truncated(x[rows], sub), sub)
        return SamplerOutput(tokens.tolist(), self._logprobs(logits, tokens, states))

    def sampling_logits(
        self,
        logits: torch.Tensor,
        states: list[SeqSamplingState],
        bitmask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logits whose softmax is the distribution `sample` draws from (disallowed tokens at -inf).

        Greedy rows get the penalised, masked logits without temperature; their argmax is what `sample` picks.
        Useful wherever the exact sampling distribution is needed (speculative-decoding acceptance, tests).
        """
        logits = self._check(logits, states)
        x = self._penalized(logits, states, bitmask)
        sampling_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampling_rows:
            rows = torch.tensor(sampling_rows, device=self.device)
            x = x.clone()
            x[rows] = self._truncated(x[rows], [states[i] for i in sampling_rows])
        return x

    # ---- steps -----------------------------------------------------------------------------------------------
    def _check(self, logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states) or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must be [{len(states)}, {self.vocab_size}], got {list(logits.shape)}"
            )
        return logits.float()

    def _penalized(
        self, logits: torch.Tensor, states: list[SeqSamplingState], bitmask: torch.Tensor | None
    ) -> torch.Tensor:
        """Penalties, min_tokens bans and the grammar mask; a new tensor whenever anything applies."""
        rep_rows = [i for i, s in enumerate(states) if s.uses_repetition]
        count_rows = [i for i, s in enumerate(states) if s.uses_counts]
        ban_rows, ban_cols = self._min_tokens_bans(states)
        if not (rep_rows or count_rows or ban_rows or bitmask is not None):
            return logits
        x = logits.clone()
        for i in set(rep_rows) | set(count_rows):
            states[i].ensure_penalty_tensors(self.vocab_size, self.device)
        if rep_rows:
            sub = [states[i] for i in rep_rows]
            rows = torch.tensor(rep_rows, device=self.device)
            seen = torch.stack([s.prompt_mask for s in sub]) | (torch.stack([s.output_counts for s in sub]) > 0)
            penalty = self._column([s.params.repetition_penalty for s in sub])
            xr = x[rows]
            # HF semantics: shrink a seen token's logit towards zero side (divide if positive, multiply if not).
            x[rows] = torch.where(seen, torch.where(xr < 0, xr * penalty, xr / penalty), xr)
        if count_rows:
            sub = [states[i] for i in count_rows]
            rows = torch.tensor(count_rows, device=self.device)
            counts = torch.stack([s.output_counts for s in sub])
            freq = self._column([s.params.frequency_penalty for s in sub])
            pres = self._column([s.params.presence_penalty for s in sub])
            x[rows] -= counts * freq + (counts > 0).float() * pres
        if ban_rows:
            r = torch.tensor(ban_rows, device=self.device)
            c = torch.tensor(ban_cols, device=self.device)
            x[r, c] = -math.inf
        if bitmask is not None:
            x.masked_fill_(~self._unpack_bitmask(bitmask, len(states)), -math.inf)
        return x

    def _min_tokens_bans(self, states: list[SeqSamplingState]) -> tuple[list[int], list[int]]:
        """(row, token) pairs to ban: stop tokens (and EOS unless ignored) while output < min_tokens."""
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(states):
            p = s.params
            if len(s.output_token_ids) >= p.min_tokens:
                continue
            stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | set(self.eos_token_ids)
            ids = [t for t in stops if 0 <= t < self.vocab_size]
            rows += [i] * len(ids)
            cols += ids
        return rows, cols

    def _unpack_bitmask(self, bitmask: torch.Tensor, batch: int) -> torch.Tensor:
        """xgrammar's layout: int32 [B, ceil(V/32)], bit j of word w allows token 32*w + j."""
        words = (self.vocab_size + 31) // 32
        if bitmask.dtype != torch.int32 or tuple(bitmask.shape) != (batch, words):
            raise ValueError(f"bitmask must be int32 [{batch}, {words}], got {bitmask.dtype} {list(bitmask.shape)}")
        bm = bitmask.to(self.device, non_blocking=True)
        bits = (bm.unsqueeze(-1) >> self._bit_shifts) & 1
        return bits.view(batch, words * 32)[:, : self.vocab_size].bool()

    def _truncated(self, x: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        """Temperature, then top_k, top_p and min_p (HF order), as -inf outside the kept set."""
        temps = [s.params.temperature for s in states]
        if any(t != 1.0 for t in temps):
            x = x / self._column(temps)
        k_rows = [i for i, s in enumerate(states) if 0 < s.params.top_k < self.vocab_size]
        p_rows = [i for i, s in enumerate(states) if s.params.top_p < 1.0]
        trunc_rows = sorted(set(k_rows) | set(p_rows))
        if trunc_rows:
            sub = [states[i] for i in trunc_rows]
            if len(trunc_rows) == len(states):
                x = self._top_k_top_p(x, sub, use_p=bool(p_rows))
            else:
                rows = torch.tensor(trunc_rows, device=self.device)
                x = x.clone()
                x[rows] = self._top_k_top_p(x[rows], sub, use_p=bool(p_rows))
        min_p = [s.params.min_p for s in states]
        if any(m > 0 for m in min_p):
            # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); log(0) = -inf keeps every token.
            log_min_p = torch.tensor(min_p, device=self.device).log().unsqueeze(1)
            x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + log_min_p, -math.inf)
        return x

    def _top_k_top_p(self, x: torch.Tensor, states: list[SeqSamplingState], use_p: bool) -> torch.Tensor:
        V = self.vocab_size
        ks = [s.params.top_k if 0 < s.params.top_k < V else V for s in states]
        k = torch.tensor(ks, device=self.device).unsqueeze(1)
        if not use_p:  # top_k alone needs only the k best, not a full sort
            kth = x.topk(max(ks), dim=-1).values.gather(1, k - 1)
            return x.masked_fill(x < kth, -math.inf)
        sorted_x, order = x.sort(dim=-1, descending=True)
        kth = sorted_x.gather(1, k - 1)
        sorted_x = sorted_x.masked_fill(sorted_x < kth, -math.inf)  # ties with the k-th are kept, as in HF
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p; top_p = 1 rows keep all (inf never reached).
        top_p = self._column([s.params.top_p if s.params.top_p < 1.0 else math.inf for s in states])
        sorted_x = sorted_x.masked_fill(mass_before >= top_p, -math.inf)
        return torch.empty_like(x).scatter_(1, order, sorted_x)

    def _draw(self, x: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(states) if s.seed is not None]
        if len(seeded) < len(states):
            if seeded:
                unseeded = [i for i, s in enumerate(states) if s.seed is None]
                rows = torch.tensor(unseeded, device=self.device)
                q[rows] = torch.empty(len(unseeded), q.shape[1], device=self.device).exponential_()
            else:
                q.exponential_()
        for i in seeded:
            q[i].exponential_(generator=states[i].ensure_generator(self.device))
        # A zero draw would make 0/0 = NaN for a banned token, and argmax prefers NaN.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, states: list[SeqSamplingState]
    ) -> list[TokenLogprobIds | None]:
        out: list[TokenLogprobIds | None] = [None] * len(states)
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not rows:
            return out
        idx = torch.tensor(rows, device=self.device)
        lp = torch.log_softmax(logits[idx], dim=-1)
        chosen_ids = tokens[idx]
        chosen = lp.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
        chosen_ids = chosen_ids.tolist()
        k = max(states[i].params.logprobs for i in rows)
        if k > 0:
            top_v, top_i = lp.topk(k, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            n = states[i].params.logprobs
            top = list(zip(top_i[j][:n], top_v[j][:n])) if n else []
            out[i] = TokenLogprobIds(chosen_ids[j], chosen[j], top)
        return out

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(1)
