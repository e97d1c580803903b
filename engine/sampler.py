"""Turn a batch of next-token logits into tokens: penalties, bans, grammar mask, temperature, truncation, draw.

Called once per engine step with one row per sequence, so everything is batched tensor work; Python cost is
O(1) per sequence (parameter lists, no per-row `.item()`), and steps that no row needs are skipped.
The same code runs on CPU and CUDA, except for the device draw below.

Sampling is by inverse CDF with one uniform number per row: a seeded row draws its number from its own
generator, so its tokens do not depend on what else is in the batch. The only host syncs are the returned
token ids (and logprobs) and, when a row uses top_p, one check of whether its candidates sufficed.
On CUDA, rows that use temperature alone (and greedy rows beside them or under a grammar mask) are drawn by one
Triton pass instead (`treadle.kernels.sampling.draw_tokens`: Gumbel-max with the grammar bitmask read in the same
pass): at 64 rows over a 128k vocabulary the softmax, float64 CDF and search took ~0.35 ms of an H100 step, and a
constrained row's mask one more pass over its logits. A seeded row there takes its Philox seed from its own
generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .sampling_params import SamplingParams

# Best logits searched for the top-p cutoff before falling back to a full sort; enough for the peaked
# distributions of instruction-tuned models at the usual top_p (0.9-0.95).
_TOP_P_CANDIDATES = 256


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

    A penalised sequence keeps its token history in a growable array, so `append` is O(1) and a step gathers and
    scatters only the seen tokens, with no [V]-sized per-sequence state and no per-token device writes.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], seed: int | None):
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.seed = seed
        self.output_token_ids: list[int] = []
        self.generator: torch.Generator | None = None  # created on the sampler's device at the first draw
        # Sampled by temperature alone: the CUDA sampler's one-pass device draw takes these rows.
        self.temperature_only = not params.greedy and params.top_k <= 0 and params.top_p >= 1.0 and params.min_p == 0
        self.uses_repetition = params.repetition_penalty != 1.0
        self.uses_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        # Penalised sequences: token history on the host (prompt too when repetition_penalty is set), appended
        # in O(1) and uploaded as one batch per step.
        self._history: np.ndarray | None = None
        self._history_len = 0
        self._output_start = len(prompt_token_ids) if self.uses_repetition else 0
        if self.uses_repetition or self.uses_counts:
            ids = prompt_token_ids if self.uses_repetition else []
            self._history = np.empty(max(64, 2 * len(ids)), dtype=np.int64)
            self._history[: len(ids)] = ids
            self._history_len = len(ids)

    def append(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self._history is None:
            return
        if self._history_len == len(self._history):
            self._history = np.concatenate([self._history, np.empty_like(self._history)])
        self._history[self._history_len] = token_id
        self._history_len += 1

    def seen_tokens(self) -> np.ndarray:
        """Prompt and output token ids (with repeats), for the repetition penalty."""
        return self._history[: self._history_len]

    def output_tokens(self) -> np.ndarray:
        """Output token ids (with repeats), for the presence and frequency penalties."""
        return self._history[self._output_start : self._history_len]

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
        self._apply_kernel = None
        self._draw_kernel = None
        self._draw_scratch = None
        self._byte_bias = None
        if self.device.type == "cuda":  # Triton comes with CUDA builds of torch, not necessarily with CPU ones
            from treadle.kernels.bitmask import apply_token_bitmask_
            from treadle.kernels.sampling import DrawScratch, draw_tokens

            self._apply_kernel = apply_token_bitmask_
            self._draw_kernel = draw_tokens
            self._draw_scratch = DrawScratch(self.device)
        else:  # bias (0 allowed, -inf banned) of the 8 tokens of each bitmask byte value, bit j = token j
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            self._byte_bias = torch.zeros(256, 8).masked_fill_(bits == 0, -math.inf).to(self.device)
        self._staging: torch.Tensor | None = None  # pinned host copy of the bitmask (CUDA)
        self._on_device: torch.Tensor | None = None  # the bitmask uploaded (CUDA)
        self._copy_stream: torch.cuda.Stream | None = None  # uploads it beside the forward pass
        self._uploaded: torch.cuda.Event | None = None  # the last upload, before the staging copy is overwritten
        self._applied: torch.cuda.Event | None = None  # the last apply, before the device copy is overwritten
        self._temps: tuple[list[float], torch.Tensor | None] = ([], None)  # the device draw's last temperatures

    # ---- public API ------------------------------------------------------------------------------------------
    def sample(
        self,
        logits: torch.Tensor,
        states: list[SeqSamplingState],
        bitmask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick one token per row of `logits` [B, V] for the matching state (the caller appends it)."""
        given, logits = logits, self._check(logits, states)
        # The float copy of lower-precision logits is ours to overwrite unless logprobs need it raw (on a GPU at
        # batch 64 over a 128k vocabulary another copy is ~1% of a step).
        scratch = logits is not given and all(s.params.logprobs is None for s in states)
        # Rows the device draw takes: greedy ones, and on CUDA those using temperature alone (always the same
        # rows whatever else is in the batch, so a seeded row's tokens never depend on its neighbours).
        device_draw = self._draw_kernel is not None
        by_torch = [i for i, s in enumerate(states)
                    if not s.params.greedy and not (device_draw and s.temperature_only)]
        # With no other row to sample, the kernel reads the grammar's mask itself, so the logits are not masked
        # first; a min_tokens ban must be weighed against the mask, which needs the masked logits.
        bans = self._min_tokens_bans(states)
        fused = device_draw and not by_torch and (bitmask is None or not bans[0])
        x = self._penalized(logits, states, bans, None if fused else bitmask, in_place=scratch)
        if len(by_torch) == len(states):
            tokens = self._draw_rows(x, states)
        else:
            tokens = self._draw_plain(x, states, bitmask if fused else None)
            if by_torch:
                rows = torch.tensor(by_torch, device=self.device)
                tokens[rows] = self._draw_rows(x[rows], [states[i] for i in by_torch])
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
        x = self._penalized(logits, states, self._min_tokens_bans(states), bitmask)
        sampling_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampling_rows:
            sub = [states[i] for i in sampling_rows]
            dense = torch.full((len(sub), self.vocab_size), -math.inf, device=self.device)
            for rows, values, token_ids in self._groups(x[torch.tensor(sampling_rows, device=self.device)], sub):
                dropped = self._min_p_dropped(values.softmax(dim=-1), [sub[i] for i in rows])
                if dropped is not None:
                    values = values.masked_fill(dropped, -math.inf)
                rows_t = torch.tensor(rows, device=self.device)
                if token_ids is None:
                    dense[rows_t] = values
                else:
                    dense[rows_t] = dense[rows_t].scatter(1, token_ids, values)
            x = x.clone()
            x[torch.tensor(sampling_rows, device=self.device)] = dense
        return x

    # ---- steps -----------------------------------------------------------------------------------------------
    def _check(self, logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states) or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must be [{len(states)}, {self.vocab_size}], got {list(logits.shape)}"
            )
        return logits.float()

    def _penalized(
        self, logits: torch.Tensor, states: list[SeqSamplingState], bans: tuple[list[int], list[int]],
        bitmask: torch.Tensor | None, in_place: bool = False,
    ) -> torch.Tensor:
        """Penalties, min_tokens `bans` (`_min_tokens_bans`) and the grammar mask: into `logits` itself if
        `in_place`, else into a new tensor whenever anything applies."""
        rep_rows = [i for i, s in enumerate(states) if s.uses_repetition]
        count_rows = [i for i, s in enumerate(states) if s.uses_counts]
        ban_rows, ban_cols = bans
        if not (rep_rows or count_rows or ban_rows or bitmask is not None):
            return logits
        # Flat views: gather/scatter on them never sync the host on CUDA, unlike index_put with accumulate.
        x = logits if in_place and logits.is_contiguous() else logits.clone(memory_format=torch.contiguous_format)
        flat_x = x.view(-1)
        if rep_rows:
            sub = [states[i] for i in rep_rows]
            group, idx = self._flat_index(rep_rows, [s.seen_tokens() for s in sub])
            penalty = self._values([s.params.repetition_penalty for s in sub])[group]
            seen = flat_x.gather(0, idx)
            # HF semantics: a seen token's logit moves towards less likely (divided if positive, else multiplied).
            # Repeated ids write the same value, so each token is penalised once.
            flat_x.scatter_(0, idx, torch.where(seen < 0, seen * penalty, seen / penalty))
        if count_rows:
            sub = [states[i] for i in count_rows]
            group, idx = self._flat_index(count_rows, [s.output_tokens() for s in sub])
            presence = self._values([s.params.presence_penalty for s in sub])[group]
            frequency = self._values([s.params.frequency_penalty for s in sub])[group]
            flat_x.scatter_(0, idx, flat_x.gather(0, idx) - presence)  # once per distinct token
            flat_x.scatter_add_(0, idx, -frequency)  # once per occurrence
        if ban_rows:
            r = torch.tensor(ban_rows, device=self.device)
            c = torch.tensor(ban_cols, device=self.device)
            ban = r * self.vocab_size + c
            before_ban = flat_x.gather(0, ban)
            flat_x.scatter_(0, ban, -math.inf)
        if bitmask is not None:
            self._apply_bitmask(x, bitmask)
            if ban_rows:
                # A grammar that allows nothing but stop tokens outranks min_tokens: a row left with no token
                # gets back the stop tokens its grammar allows.
                cols = np.asarray(ban_cols)
                words = bitmask.cpu().numpy()[ban_rows, cols // 32]
                granted = torch.from_numpy((words >> (cols % 32)) & 1 == 1).to(self.device)
                dead = (x.amax(dim=-1) == -math.inf)[r]
                flat_x.scatter_(0, ban, torch.where(dead & granted, before_ban, -math.inf))
        return x

    def _flat_index(self, batch_rows: list[int], ids: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """For every id of every row: its index in the group and its position in the flattened [B, V] logits.

        Built on the host and uploaded in one copy.
        """
        sizes = [len(a) for a in ids]
        group = np.repeat(np.arange(len(ids)), sizes)
        flat = np.asarray(batch_rows, dtype=np.int64)[group] * self.vocab_size + np.concatenate(ids)
        both = torch.from_numpy(np.stack([group, flat])).to(self.device)
        return both[0], both[1]

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

    def _draw_plain(
        self, x: torch.Tensor, states: list[SeqSamplingState], bitmask: torch.Tensor | None
    ) -> torch.Tensor:
        """Greedy rows' argmax and plain rows' draws (any other row gets a token the caller replaces): on CUDA one
        kernel, reading `bitmask` if given; elsewhere, or for greedy rows alone with nothing to mask, the argmax
        (a Triton launch costs the host more than torch's argmax, and here the host is what a step waits for)."""
        if self._draw_kernel is None or (bitmask is None and not any(s.temperature_only for s in states)):
            return x.argmax(dim=-1)
        temps = [s.params.temperature if s.temperature_only else 0.0 for s in states]
        if temps != self._temps[0]:  # a batch's temperatures rarely change from one step to the next
            self._temps = (temps, self._values(temps))
        # Unseeded rows: Philox seeds base + row, base from torch's default generator (so torch.manual_seed
        # reproduces them); a seeded row takes its seed from its own generator (only rows drawn here, so
        # the others' generators stay where the torch path expects them).
        seeded = [i for i, s in enumerate(states) if s.seed is not None and s.temperature_only]
        seeds: torch.Tensor | int = int(torch.randint(1 << 32, 1 << 62, ()))
        if seeded:
            seeds = seeds + torch.arange(len(states), device=self.device)
            for i in seeded:
                seeds[i : i + 1].random_(1 << 32, 1 << 62, generator=states[i].ensure_generator(self.device))
        mask = None
        if bitmask is not None:
            self._check_bitmask(bitmask, len(states))
            mask = self._upload(bitmask)
        tokens = self._draw_kernel(x.contiguous(), self._temps[1], seeds, mask, scratch=self._draw_scratch)
        if mask is not None and self._applied is not None:
            self._applied.record()
        return tokens

    def _check_bitmask(self, bitmask: torch.Tensor, batch: int) -> None:
        words = (self.vocab_size + 31) // 32
        if bitmask.dtype != torch.int32 or tuple(bitmask.shape) != (batch, words):
            raise ValueError(f"bitmask must be int32 [{batch}, {words}], got {bitmask.dtype} {list(bitmask.shape)}")

    def _apply_bitmask(self, x: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Banned tokens' logits of x [B, V] to -inf, in place.

        xgrammar's layout: int32 [B, ceil(V/32)], bit j of word w allows token 32*w + j. On CUDA one Triton pass
        over the logits (expanding the bits with torch ops took several passes, and a byte-table gather 0.6 ms
        for 64 rows on an H100). On CPU, read as little-endian bytes, byte i of the row holds tokens
        8*i .. 8*i+7, so one table lookup per byte expands the mask into a bias to add.
        """
        batch, words = x.shape[0], (self.vocab_size + 31) // 32
        self._check_bitmask(bitmask, batch)
        if self._apply_kernel is not None:
            self._apply_kernel(x, self._upload(bitmask), vocab_size=self.vocab_size)
            if self._applied is not None:
                self._applied.record()
            return
        row_bytes = bitmask.contiguous().view(torch.uint8).reshape(-1).long()
        x.add_(self._byte_bias.index_select(0, row_bytes).view(batch, words * 32)[:, : self.vocab_size])

    def _upload(self, bitmask: torch.Tensor) -> torch.Tensor:
        """The bitmask on the GPU, without waiting for it.

        A blocking copy from pageable memory synchronizes the stream, so the host would wait for the whole
        forward pass before queueing the rest of sampling; pinned memory (the grammar workers' shared bitmask)
        is copied as it is, anything else through a pinned staging buffer. The copy runs on a stream of its own,
        beside the forward pass still running on the current one (on an H100 a 64-row mask over a 128k vocabulary
        is 1 MB, tens of microseconds that would otherwise follow the forward); sampling waits for it. The host's
        sync on the sampled tokens ends it before the host memory is written again.
        """
        if bitmask.device.type == "cuda":
            return bitmask
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._uploaded, self._applied = torch.cuda.Event(), torch.cuda.Event()
        n = bitmask.numel()
        if not (bitmask.is_contiguous() and bitmask.is_pinned()):
            self._uploaded.synchronize()  # the staging copy's last upload has read it
            if self._staging is None or self._staging.numel() < n:
                self._staging = torch.empty(n, dtype=torch.int32, pin_memory=True)
            bitmask = self._staging[:n].view(bitmask.shape).copy_(bitmask)
        if self._on_device is None or self._on_device.numel() < n:
            self._on_device = torch.empty(n, dtype=torch.int32, device=self.device)
        on_device = self._on_device[:n].view(bitmask.shape)
        self._copy_stream.wait_event(self._applied)  # the previous step's mask is read
        with torch.cuda.stream(self._copy_stream):
            on_device.copy_(bitmask, non_blocking=True)
            self._uploaded.record()
        torch.cuda.current_stream(self.device).wait_event(self._uploaded)
        return on_device

    def _draw_rows(self, x: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        """One token per (non-greedy) row."""
        groups = self._groups(x, states)
        tokens = None if len(groups) == 1 else torch.empty(len(states), dtype=torch.long, device=self.device)
        for rows, values, token_ids in groups:
            sub = [states[i] for i in rows]
            probs = values.softmax(dim=-1)
            dropped = self._min_p_dropped(probs, sub)
            if dropped is not None:
                probs = probs * ~dropped  # a multiply is several times faster than masked_fill on CPU
            picked = self._inverse_cdf(probs, sub)
            if token_ids is not None:
                picked = token_ids.gather(1, picked.unsqueeze(1)).squeeze(1)
            if tokens is None:
                return picked  # one group holds every row, in order
            tokens[torch.tensor(rows, device=self.device)] = picked
        return tokens

    def _groups(
        self, x: torch.Tensor, states: list[SeqSamplingState]
    ) -> list[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """Temperature, top_k and top_p: the rows split by how their kept tokens are held.

        Each group is (rows, logits [r, m], token ids [r, m] or None when the logits are the whole vocabulary).
        Rows with top_k/top_p keep only their best candidates, best first, -inf past the cutoff: drawing among
        a few hundred of those is much cheaper than masking and accumulating the whole vocabulary. A full sort
        costs milliseconds per row on CPU, so candidates come from a partial top-k (`_TOP_P_CANDIDATES`, or the
        largest top_k); only rows whose top_p mass reaches past them are sorted in full.
        Ties at a top-k or top-p cutoff are broken by position in that order, so exactly k tokens survive top-k.
        """
        V = self.vocab_size
        ks = [s.params.top_k if 0 < s.params.top_k < V else V for s in states]
        ps = [s.params.top_p for s in states]
        plain = [i for i in range(len(states)) if ks[i] == V and ps[i] >= 1.0]
        trunc = [i for i in range(len(states)) if ks[i] < V or ps[i] < 1.0]
        groups: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
        if plain:
            xp = x if len(plain) == len(states) else x[torch.tensor(plain, device=self.device)]
            groups.append((plain, self._scaled(xp, [states[i] for i in plain]), None))
        if not trunc:
            return groups
        # Temperature keeps the order, so candidates are chosen unscaled and only they are scaled.
        xt = x if len(trunc) == len(states) else x[torch.tensor(trunc, device=self.device)]
        st = [states[i] for i in trunc]
        kt = [ks[i] for i in trunc]
        pt = [ps[i] for i in trunc]
        uses_p = any(p < 1.0 for p in pt)
        n = min(V, max([k for k in kt if k < V] + ([_TOP_P_CANDIDATES] if uses_p else [])))
        values, token_ids = xt.topk(n, dim=-1)
        values, covered = self._cut(xt, self._scaled(values, st), st, kt, pt)
        if all(covered):
            return groups + [(trunc, values, token_ids)]
        inside = [j for j, c in enumerate(covered) if c]
        outside = [j for j, c in enumerate(covered) if not c]
        if inside:
            idx = torch.tensor(inside, device=self.device)
            groups.append(([trunc[j] for j in inside], values[idx], token_ids[idx]))
        xo = xt[torch.tensor(outside, device=self.device)]
        so = [st[j] for j in outside]
        full_values, full_ids = xo.sort(dim=-1, descending=True)
        full_values, _ = self._cut(xo, self._scaled(full_values, so), so, [kt[j] for j in outside],
                                   [pt[j] for j in outside])
        return groups + [([trunc[j] for j in outside], full_values, full_ids)]

    def _cut(
        self, x: torch.Tensor, best: torch.Tensor, states: list[SeqSamplingState], ks: list[int], ps: list[float]
    ) -> tuple[torch.Tensor, list[bool]]:
        """Mask the sorted, scaled candidates `best` [r, n] past each row's top-k / top-p cutoff (HF semantics).

        top_p keeps the shortest prefix whose probability reaches top_p, with probabilities normalised over the
        top-k set (wholly inside `best`, as n >= every finite k) or else over the full unscaled row `x`. Returns
        whether each row's kept set is known to lie inside `best` (one host sync, only when top_p is in play).
        """
        n = best.shape[1]
        position = torch.arange(n, device=self.device)
        k = torch.tensor(ks, device=self.device).clamp_max(n).unsqueeze(1)
        if all(p >= 1.0 for p in ps):
            return best.masked_fill(position >= k, -math.inf), [True] * len(ks)
        best = best.masked_fill(position >= k, -math.inf)
        has_k = torch.tensor([k < self.vocab_size for k in ks], device=self.device)
        norm = best.logsumexp(dim=-1)
        if not all(k < self.vocab_size for k in ks):
            norm = torch.where(has_k, norm, self._scaled(x, states).logsumexp(dim=-1))
        norm = norm.unsqueeze(1)
        probs = (best - norm).exp()
        mass = probs.cumsum(dim=-1)
        # top_p = 1 never cuts (a float mass can fall just short of 1.0).
        top_p = self._column([p if p < 1.0 else math.inf for p in ps])
        best = best.masked_fill(mass - probs >= top_p, -math.inf)  # the first token always stays
        if n == self.vocab_size:
            return best, [True] * len(ks)
        covered = has_k | (mass[:, -1:] >= top_p).squeeze(1)
        return best, covered.tolist()

    def _scaled(self, x: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        temps = [s.params.temperature for s in states]
        return x / self._column(temps) if any(t != 1.0 for t in temps) else x

    def _min_p_dropped(self, probs: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor | None:
        """Tokens below min_p times the best token's probability (HF's rule), or None when no row uses min_p."""
        min_p = [s.params.min_p for s in states]
        if not any(m > 0 for m in min_p):
            return None
        return probs < probs.amax(dim=-1, keepdim=True) * self._column(min_p)

    def _inverse_cdf(self, probs: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        """Position drawn from `probs` (unnormalised) per row, with one uniform number per row.

        One number per row is cheap on CPU (unlike a noise vector per row) and lets a seeded row draw from its
        own generator. The CDF is accumulated in float64 so that rounding over a large vocabulary does not
        shift mass between tokens; zero-probability tokens have zero width and cannot be picked.
        """
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        u = torch.empty(len(states), 1, dtype=torch.float64, device=self.device)
        seeded = [i for i, s in enumerate(states) if s.seed is not None]
        if len(seeded) < len(states):
            u.uniform_()
        for i in seeded:
            u[i].uniform_(generator=states[i].ensure_generator(self.device))
        total = cdf[:, -1:]
        # u * total < total, so some token's upper CDF edge lies above it: the index is always in range.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        # The clamp only matters for a row with no allowed token at all (NaN CDF): it must not index past the row.
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)

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

    def _values(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _column(self, values: list[float]) -> torch.Tensor:
        return self._values(values).unsqueeze(1)
