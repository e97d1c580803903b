"""APE (Adaptive Parallel Encoding) cached contexts: documents encoded once each, kept in the paged KV pool and
combined at query time without re-encoding (features brief, section B).

Layout. The model's shared prefix P (p tokens, `shared_prefix`) sits at positions 0..p-1. A context c is encoded
as the ordinary causal prompt P ‖ c, so its tokens sit at positions p..p+|c|-1 whichever other contexts a request
combines it with; being a plain prefill, its pages may also enter the prefix cache. A request with contexts c_1..c_k
runs one sequence over R = P ‖ query ‖ generated, where the query is the request's prompt after P (`ApeLayout`)
and the query and generated tokens take positions from p + max|c_i|. Its query and generated tokens attend R
causally and the union of the contexts' own slots (never their copies of P) with temperature T, merged by
log-sum-exp with the context part scaled by S·T (engine/models/attention.py); P's tokens attend only P.

Store. Contexts are keyed by a hash of their token ids, so an inline text and a created context with the same
tokens share one entry and one KV copy. An entry's KV is held by its encoder sequence (suspended once computed).
Every request holds a use on each entry it attends; only entries without users are evicted, least recently used
first, when the scheduler runs short of pages. If nothing can run at all because contexts held only by requests
still waiting for other contexts fill the pool, one of those is dropped and queued for encoding again. Created (pinned) entries keep their record when their KV is evicted
and are encoded again on next use; inline ones are forgotten. A request waits outside the scheduler until all its
contexts are encoded. KV accounting stays exact: once every request has ended and every context is deleted,
every page is free again.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .batch import ApeChunk
from .kv_cache import KVCacheManager
from .sampling_params import ApeParams, InvalidParameterError, SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence
from .tokenizer import Tokenizer

_SENTINEL = "\x00APE\x00"


def shared_prefix_text(tokenizer: Tokenizer, mode: str) -> str:
    """The text every context is encoded after: "chat" renders the template up to where the first user message's
    content begins (falling back to "bos" without a template); "bos" is the BOS token alone, if the model has one."""
    if mode not in ("chat", "bos"):
        raise ValueError(f"ape_shared_prefix must be 'chat' or 'bos', got {mode!r}")
    if mode == "chat" and tokenizer.chat_template is not None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=False)
        if _SENTINEL in rendered:
            return rendered[: rendered.index(_SENTINEL)]
    bos = tokenizer.bos_token_id
    return "" if bos is None else tokenizer.hf.convert_ids_to_tokens(bos)


@dataclass(frozen=True)
class ApeLayout:
    """Where a request's own prompt goes: R = P ‖ query, the query being the prompt without a leading P."""

    prefix_text: str
    prefix_ids: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer: Tokenizer, mode: str) -> ApeLayout:
        text = shared_prefix_text(tokenizer, mode)
        return cls(text, tuple(tokenizer.encode(text, add_special_tokens=False)))

    def query_from_text(self, tokenizer: Tokenizer, text: str) -> list[int] | None:
        """R for a rendered prompt that begins with P's text; None if it does not."""
        if not text.startswith(self.prefix_text):
            return None
        return list(self.prefix_ids) + tokenizer.encode(text[len(self.prefix_text) :], add_special_tokens=False)

    def request_ids(self, prompt: list[int]) -> list[int]:
        """R for token ids: a prompt that begins with P keeps it, any other gets P in front."""
        p = len(self.prefix_ids)
        if tuple(prompt[:p]) == self.prefix_ids:
            return list(prompt)
        return list(self.prefix_ids) + list(prompt)


def context_key(token_ids: list[int]) -> str:
    """Content hash of a context's tokens; its API id is "ctx_" + this."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=12).hexdigest()


@dataclass(eq=False)
class CachedContext:
    key: str
    token_ids: list[int]
    pinned: bool = False  # created through the API: the record stays (its KV may be evicted) until deleted
    encoder: Sequence | None = None  # the prefill of P ‖ context that holds this context's KV
    ready: bool = False  # the encoder has computed every token
    users: int = 0  # live requests attending it
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return "ctx_" + self.key

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ContextInfo:
    """A snapshot of one context for the API (read on other threads)."""

    id: str
    num_tokens: int
    created: int
    cached: bool  # its KV is in the pool now


@dataclass(eq=False)
class ApeState:
    """One request's APE view, shared by its choices."""

    prefix_len: int
    offset: int  # the longest context: sequence entry i >= prefix_len sits at position i + offset
    contexts: list[CachedContext]
    temperature: float
    scale: float
    _chunk: ApeChunk | None = None

    def positions(self, start: int, n: int) -> list[int]:
        p, off = self.prefix_len, self.offset
        return [i if i < p else i + off for i in range(start, start + n)]

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.contexts)

    def chunk(self) -> ApeChunk:
        """What attention needs; built once, since a ready context's KV never moves while the request uses it."""
        if self._chunk is None:
            slots: list[int] = []
            for c in self.contexts:
                slots += c.encoder.kv.slots[self.prefix_len :]
            self._chunk = ApeChunk(slots, self.prefix_len, self.temperature, self.scale)
        return self._chunk


class ContextStore:
    """Cached contexts and the requests waiting for them; touched by the engine thread only."""

    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, layout: ApeLayout, max_model_len: int):
        self.kv = kv
        self.scheduler = scheduler
        self.layout = layout
        self.max_model_len = max_model_len
        self.entries: OrderedDict[str, CachedContext] = OrderedDict()  # least recently used first
        self._parked: list[Sequence] = []  # request sequences waiting for their contexts' KV
        self.hits = 0  # contexts requests found encoded (or being encoded)
        self.misses = 0  # contexts requests had to encode
        self.evictions = 0  # context KV dropped to make room
        self.encoded_tokens = 0  # tokens computed by context encoders (prefix-cache hits excluded)

    @property
    def prefix_len(self) -> int:
        return len(self.layout.prefix_ids)

    # ---- admission checks (pure: safe from any thread) --------------------------------------------------------
    def check_context(self, token_ids: list[int], name: str = "the context") -> None:
        """A context must leave room for a query after the shared prefix and fit the KV pool on its own."""
        p, n = self.prefix_len, len(token_ids)
        if not n:
            raise InvalidParameterError(f"{name} is empty", "contexts")
        if p + n >= self.max_model_len:
            raise InvalidParameterError(
                f"{name} has {n} tokens; after the {p}-token shared prefix at most {self.max_model_len - p - 1} "
                f"fit this model's context length of {self.max_model_len}", "contexts")
        if -(-(p + n) // self.kv.page_size) >= self.kv.num_pages:
            raise InvalidParameterError(f"{name} has {n} tokens, more than the KV pool holds", "contexts")

    def check(self, prompt_len: int, ape: ApeParams, max_tokens: int | None) -> None:
        """Refuse what could never run: a context, or P + longest context + query + output, past the model's
        length, or contexts plus the request's own tokens larger than the KV pool."""
        p = self.prefix_len
        for i, c in enumerate(ape.contexts):
            self.check_context(c, f"context {i}")
        longest = max(len(c) for c in ape.contexts)
        need = prompt_len + longest + (max_tokens or 1)
        if need > self.max_model_len:
            raise InvalidParameterError(
                f"the shared prefix and query ({prompt_len} tokens) after the longest context ({longest}) plus "
                f"{max_tokens or 1} output tokens need {need} positions; this model's context length is "
                f"{self.max_model_len}", "contexts")
        ps = self.kv.page_size
        unique = {context_key(c): len(c) for c in ape.contexts}
        pages = sum(-(-(p + n) // ps) for n in unique.values()) + -(-(prompt_len + (max_tokens or 1)) // ps)
        if pages > self.kv.num_pages:
            raise InvalidParameterError(
                f"the contexts and the request need {pages} KV pages; the pool has {self.kv.num_pages}", "contexts")

    # ---- contexts --------------------------------------------------------------------------------------------
    def put(self, token_ids: list[int], pinned: bool = False) -> CachedContext:
        """The entry for these tokens (created and queued for encoding if new or evicted), marked recently used."""
        key = context_key(token_ids)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = CachedContext(key, list(token_ids))
        entry.pinned |= pinned
        self.entries.move_to_end(key)
        if entry.encoder is None:
            self._encode(entry)
        return entry

    def get(self, key: str) -> CachedContext | None:
        return self.entries.get(key)

    def delete(self, key: str) -> bool:
        """Forget a context; its KV goes once no request attends it."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        entry.pinned = False
        if not entry.users:
            self._drop_kv(entry)
        return True

    def info(self, entry: CachedContext) -> ContextInfo:
        return ContextInfo(entry.id, entry.num_tokens, entry.created, entry.ready)

    @property
    def cached_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries.values() if e.ready)

    def _encode(self, entry: CachedContext) -> None:
        req = Request(f"ctx-encode-{entry.key}", list(self.layout.prefix_ids) + entry.token_ids, SamplingParams())
        seq = Sequence(req, 0, list(req.prompt_token_ids), encodes=entry)
        req.seqs.append(seq)
        req.forked = True
        entry.encoder = seq
        entry.ready = False
        self.scheduler.add(seq)

    def _drop_kv(self, entry: CachedContext) -> None:
        if entry.encoder is not None:
            self.scheduler.remove(entry.encoder)
            entry.encoder = None
        entry.ready = False

    # ---- requests --------------------------------------------------------------------------------------------
    def attach(self, seq: Sequence, ape: ApeParams) -> None:
        """Give a request's sequence its contexts (encoding the missing ones) and schedule it once they are in."""
        entries: list[CachedContext] = []
        req = seq.request
        for tokens in ape.contexts:
            known = self.entries.get(context_key(tokens))
            hit = known is not None and known.encoder is not None
            if hit:
                self.hits += 1
            else:
                self.misses += 1
            entry = self.put(tokens)
            if entry not in entries:
                entries.append(entry)
                entry.users += 1
                req.num_context_tokens += len(tokens)
                req.num_cached_context_tokens += len(tokens) if hit else 0
        longest = max(e.num_tokens for e in entries)
        seq.ape = ApeState(self.prefix_len, longest, entries, ape.temperature, ape.scale)
        if seq.ape.ready:
            self.scheduler.add(seq)
        else:
            self._parked.append(seq)

    def release(self, req: Request) -> None:
        """A request ended: drop its uses; contexts deleted meanwhile lose their KV with their last user."""
        state = req.seqs[0].ape if req.seqs else None
        if state is None:
            return
        self._parked = [s for s in self._parked if s.request is not req]
        for entry in state.contexts:
            entry.users -= 1
            if entry.users == 0 and self.entries.get(entry.key) is not entry:
                self._drop_kv(entry)

    def on_computed(self, seq: Sequence, num_tokens: int) -> None:
        """After a forward pass: an encoder that has computed all its tokens holds its context's KV from now on."""
        entry = seq.encodes
        if entry is None:
            return
        self.encoded_tokens += num_tokens
        if seq.num_uncomputed:
            return
        self.scheduler.suspend(seq)
        entry.ready = True
        waiting = self._parked
        self._parked = [s for s in waiting if not s.ape.ready]
        for s in waiting:
            if s.ape.ready:
                self.scheduler.add(s)

    def relieve(self) -> bool:
        """Nothing could be scheduled: contexts that only waiting requests hold may fill the pool while an encoder
        those or other requests wait for finds no room. Drop the least recently used such context's KV and queue it
        for encoding again, behind the encoders already waiting; True if one was dropped."""
        held = Counter(e for s in self._parked for e in s.ape.contexts)
        order = {e: i for i, e in enumerate(self.entries.values())}  # deleted entries (not in the LRU) go first
        for entry in sorted(held, key=lambda e: order.get(e, -1)):
            if entry.ready and entry.users == held[entry]:
                self._drop_kv(entry)
                self._encode(entry)
                self.evictions += 1
                return True
        return False

    def reclaim(self, pages: int) -> None:
        """Free at least `pages` pages if possible by dropping the KV of contexts no request uses, LRU first."""
        target = self.kv.num_free_pages + pages
        for entry in list(self.entries.values()):
            if self.kv.num_free_pages >= target:
                return
            if entry.users or not entry.ready:
                continue
            self._drop_kv(entry)
            self.evictions += 1
            if not entry.pinned:
                del self.entries[entry.key]
