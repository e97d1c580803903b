"""The synchronous engine: one `step()` = schedule, run the model once, sample, turn tokens into outputs.

It is driven by one thread (see async_engine.py) and owns all request state; nothing here is thread-safe.
"""

from __future__ import annotations

import time

import torch

from .ape import ApeLayout, ContextStore
from .batch import SeqChunk
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, token_text
from .guided import GuidedDecoder
from .kv_cache import KVCacheManager
from .loader import LoadedModel
from .model_runner import ModelRunner
from .multiverse import Multiverse
from .multiverse_tags import MultiverseTags
from .outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from .sampler import Sampler, SeqSamplingState
from .scheduler import Scheduler
from .sequence import Request, Sequence
from .stop_checker import StopChecker


def kv_pool_pages(cfg: EngineConfig, bytes_per_slot: int) -> int:
    """Pages for the KV pool: explicit, a share of free GPU memory, or a fixed size on CPU."""
    if cfg.num_pages is not None:
        return cfg.num_pages
    if cfg.device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(cfg.device))
        budget = free * cfg.kv_memory_fraction
    else:
        budget = cfg.kv_cache_gb * 2**30
    return max(1, int(budget // (bytes_per_slot * cfg.page_size)))


class LLMEngine:
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel, multiverse_tags: MultiverseTags | None = None):
        self.cfg = cfg
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        dtype = getattr(torch, cfg.dtype)
        num_pages = kv_pool_pages(cfg, ModelRunner.kv_bytes_per_slot(loaded.config, dtype))
        self.kv = KVCacheManager(num_pages, cfg.page_size, cfg.enable_prefix_caching)
        self.runner = ModelRunner(loaded.model, loaded.config, cfg, num_pages * cfg.page_size)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.sampler = Sampler(loaded.config.vocab_size, self.tokenizer.eos_token_ids, self.runner.device)
        self.guided = GuidedDecoder(self.tokenizer, loaded.config.vocab_size, cfg.grammar_workers, cfg.max_num_seqs,
                                    pin_memory=self.runner.device.type == "cuda")
        # A sequence can never outgrow the pool, or preemption could not make room for it.
        limit = cfg.max_model_len or loaded.config.max_position_embeddings
        self.max_model_len = min(limit, num_pages * cfg.page_size)
        self._eos = set(self.tokenizer.eos_token_ids)
        self._async_forward = self.runner.device.type == "cuda"
        self.multiverse = Multiverse(self.kv, self.scheduler, self.tokenizer, self.max_model_len, multiverse_tags)
        self.ape = ContextStore(self.kv, self.scheduler, ApeLayout.build(self.tokenizer, cfg.ape_shared_prefix),
                                self.max_model_len)
        self.scheduler.reclaim = self.ape.reclaim
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats(num_total_pages=num_pages)  # cumulative counters; gauges are read live
        self.published_stats = self.snapshot_stats()  # the latest copy, for readers on other threads

    # ---- requests --------------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Admit a validated request (the caller checked lengths and parameters)."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id}")
        params = req.params
        if params.ape is not None:  # the contexts go after the shared prefix, the prompt after them
            req.prompt_token_ids = self.ape.layout.request_ids(req.prompt_token_ids)
            self.ape.check(len(req.prompt_token_ids), params.ape, params.max_tokens)
        room = self.max_model_len - len(req.prompt_token_ids)
        if params.ape is not None:
            room -= max(len(c) for c in params.ape.contexts)
        req.max_tokens = min(params.max_tokens or room, room)
        seq = Sequence(req, 0, list(req.prompt_token_ids))
        self._init_decoding(seq, seed=params.seed)
        req.seqs.append(seq)
        req.forked = params.n == 1
        self.requests[req.request_id] = req
        if params.ape is not None:
            self.ape.attach(seq, params.ape)  # scheduled once its contexts are encoded
        else:
            self.scheduler.add(seq)
        self.stats.prompt_tokens += len(req.prompt_token_ids)

    def _init_decoding(self, seq: Sequence, seed: int | None) -> None:
        params = seq.request.params
        seq.sampling = SeqSamplingState(params, seq.request.prompt_token_ids, seed)
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer.hf, seq.request.prompt_token_ids, params.skip_special_tokens
        )
        seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        self.guided.add(seq, params.grammar)
        self.multiverse.start(seq)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        outs = []
        for seq in req.seqs:
            if not seq.finished:
                self.multiverse.drop(seq)
                self.scheduler.remove(seq)
                self.guided.release(seq)
                seq.finish_reason = "abort"
                outs.append(CompletionOutput(seq.index, "", [], finish_reason="abort",
                                             num_generated_tokens=seq.num_generated))
                self._count_finish("abort")
        self.ape.release(req)
        if req.on_output is not None:
            req.on_output(self._request_output(req, outs, finished=True))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def close(self) -> None:
        """Release what outlives a step: the grammar worker processes."""
        self.guided.close()

    # ---- the step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.published_stats = self.snapshot_stats()  # gauges show the batch while the model computes it
        if not sched.chunks:
            # Nothing fits: contexts of requests still waiting for theirs, or parallel documents, hold the pool.
            if self.scheduler.has_work() and not self.ape.relieve():
                self.multiverse.relieve()
            return self._emit([])
        chunks = []
        for c in sched.chunks:
            seq, n = c.seq, c.num_tokens
            start = seq.num_computed
            chunks.append(SeqChunk(
                token_ids=seq.token_ids[start : start + n],
                positions=seq.kv.positions[-n:],
                kv_slots=seq.kv.slots,
                need_logits=start + n == len(seq.token_ids) and not self.multiverse.holds(seq)
                and seq.encodes is None,
                ape=None if seq.ape is None else seq.ape.chunk(),
            ))
        # Grammar masks are filled beside the model (on the guided decoder's thread or processes). On CPU the forward
        # runs inside execute(), so they are started first; on CUDA execute() only queues it, and starting them after
        # keeps their host cost off the GPU's critical path.
        masked = [c.seq for c, chunk in zip(sched.chunks, chunks) if chunk.need_logits]
        masks = self.guided.start_masks(masked) if not self._async_forward else None
        logits = self.runner.execute(chunks)
        if self._async_forward:
            masks = self.guided.start_masks(masked)

        rows: list[int] = []
        to_sample: list[Sequence] = []
        row = 0
        for c, chunk in zip(sched.chunks, chunks):
            seq = c.seq
            seq.num_computed += c.num_tokens
            self.kv.register_computed(seq.kv, seq.token_ids, seq.num_computed)
            if not chunk.need_logits:
                continue
            for s in self._fork_if_needed(seq):
                rows.append(row)
                to_sample.append(s)
            row += 1
        for c in sched.chunks:  # forks and merges fire once the trigger tokens' KV is in
            self.multiverse.on_computed(c.seq)
            self.ape.on_computed(c.seq, c.num_tokens)
        if not to_sample:
            return self._emit([])
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            logits = logits[torch.tensor(rows, device=logits.device)]
        self._apply_logits_processors(logits, to_sample)
        result = self.sampler.sample(logits, [s.sampling for s in to_sample], self.guided.finish_masks(masks, rows))
        self.guided.sampled(to_sample, result.token_ids)
        return self._emit(zip(to_sample, result.token_ids, result.logprobs))

    def _emit(self, sampled) -> list[RequestOutput]:
        """Append the sampled (sequence, token, logprobs) and hand every request with news its output."""
        now = time.monotonic()
        news: dict[str, list[CompletionOutput]] = {}
        for seq, tok, lp in sampled:
            if seq.finished:  # its parallel document ended earlier in this step
                continue
            out = self._append_token(seq, tok, lp)
            if out is not None:
                news.setdefault(seq.request.request_id, []).append(out)
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
        for req, out in self.multiverse.take_outputs():  # one delta per parallel document with news
            if out.finish_reason is not None:
                self._count_finish(out.finish_reason)
            news.setdefault(req.request_id, []).append(out)
        outputs = []
        for rid, outs in news.items():
            req = self.requests[rid]
            finished = req.finished
            out = self._request_output(req, outs, finished)
            if finished:
                del self.requests[rid]
                self.ape.release(req)
            if req.on_output is not None:
                req.on_output(out)
            outputs.append(out)
        return outputs

    @staticmethod
    @torch.inference_mode()
    def _apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            for processor in seq.request.params.logits_processors:
                view = logits[row]
                out = processor(seq.token_ids, view)
                if out is not view:  # copy only what a processor replaced
                    view.copy_(out)

    def _fork_if_needed(self, seq: Sequence) -> list[Sequence]:
        """The prompt of an n > 1 request is prefilled once; its choices fork from it here, sharing its KV."""
        req = seq.request
        if req.forked:
            return [seq]
        req.forked = True
        seqs = [seq]
        seed = req.params.seed
        for i in range(1, req.params.n):
            child = Sequence(req, i, list(seq.token_ids), kv=self.kv.fork(seq.kv), num_computed=seq.num_computed,
                             ape=seq.ape)
            self._init_decoding(child, seed=None if seed is None else seed + i)
            req.seqs.append(child)
            self.scheduler.add_running(child)
            seqs.append(child)
        return seqs

    def _append_token(self, seq: Sequence, tok: int, lp) -> CompletionOutput | None:
        """Append a sampled token and apply the stop rules; a parallel path's output comes from its document."""
        req = seq.request
        params = req.params
        seq.token_ids.append(tok)
        seq.sampling.append(tok)
        self.stats.generation_tokens += 1
        grammar_end = self.guided.accept(seq, tok)
        logprobs = None
        if lp is not None:
            logprobs = [self._token_logprob(lp)]
        text = piece = ""
        matched = None
        if tok in self._eos and not params.ignore_eos:  # the sampler bans EOS until min_tokens
            seq.finish_reason = "stop"
        elif tok in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        else:
            piece = seq.detokenizer.step(tok)
            text, matched = seq.stop_checker.feed(piece)
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
        if seq.finish_reason is None and grammar_end is not None:
            seq.finish_reason = grammar_end
        if seq.parallel is not None:  # limits, forks and finishing are per document
            self.multiverse.on_token(seq, tok, piece, text, matched)
            return None
        if seq.finish_reason is None and (
            seq.num_generated >= req.max_tokens or len(seq.token_ids) >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if matched is None:  # ended for another reason: release every character still held back
                tail, late_match = seq.stop_checker.feed(seq.detokenizer.flush())
                text += tail if late_match else tail + seq.stop_checker.flush()
            self.scheduler.remove(seq)
            self.guided.release(seq)
            self._count_finish(seq.finish_reason)
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=[tok],
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_generated_tokens=seq.num_generated,
        )

    def _token_logprob(self, lp) -> TokenLogprob:
        hf = self.tokenizer.hf
        return TokenLogprob(
            token_id=lp.token_id,
            token=token_text(hf, lp.token_id),
            logprob=lp.logprob,
            top=[(i, token_text(hf, i), v) for i, v in lp.top],
        )

    def _count_finish(self, reason: str) -> None:
        self.stats.finished_by_reason[reason] = self.stats.finished_by_reason.get(reason, 0) + 1

    def _request_output(self, req: Request, outs: list[CompletionOutput], finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            outputs=outs,
            num_prompt_tokens=len(req.prompt_token_ids) + req.num_context_tokens,
            num_cached_tokens=req.num_cached_tokens + req.num_cached_context_tokens,
            finished=finished,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
        )

    def snapshot_stats(self) -> EngineStats:
        """A copy of the counters and gauges, safe to hand to another thread."""
        s = self.stats
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.kv.num_used_pages / self.kv.num_pages,
            num_free_pages=self.kv.num_free_pages,
            num_total_pages=self.kv.num_pages,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=s.prompt_tokens,
            generation_tokens=s.generation_tokens,
            finished_by_reason=dict(s.finished_by_reason),
            parallel_forks=self.multiverse.num_forks,
            parallel_merges=self.multiverse.num_merges,
            parallel_branches=self.multiverse.num_branches,
            parallel_tokens=self.multiverse.finished_tokens,
            parallel_depth=self.multiverse.finished_depth,
            ape_context_hits=self.ape.hits,
            ape_context_misses=self.ape.misses,
            ape_context_evictions=self.ape.evictions,
            ape_encoded_tokens=self.ape.encoded_tokens,
            ape_cached_contexts=sum(e.ready for e in self.ape.entries.values()),
            ape_cached_context_tokens=self.ape.cached_tokens,
        )

