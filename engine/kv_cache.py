"""Paged KV-cache bookkeeping: pages, per-sequence token-level indices, prefix caching, fork and merge.

The KV tensors live in the model runner; this module only decides which slot (page * page_size + offset) each
token's K/V goes to and which slots a sequence attends. Each sequence holds a token-level index rather than a
page table, so a fork shares its parent's slots without copying (new tokens go to fresh pages), a merge is a
concatenation of indices, and position ids are stored per token, independent of where a token sits in the index.

Accounting invariant: every page is either referenced by live sequences (refcount > 0), free, or cached for
prefix reuse with refcount 0 (evictable, LRU). `num_free_pages` counts the last two, so once every request has
ended it equals `num_pages`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np


class OutOfPagesError(RuntimeError):
    """Raised when an allocation finds no free or evictable page; the scheduler preempts before this happens."""


@dataclass
class SeqKV:
    """One sequence's view of the cache."""

    slots: list[int] = field(default_factory=list)  # every KV slot the sequence attends, in order
    positions: list[int] = field(default_factory=list)  # position id of each entry of `slots`
    pages: list[int] = field(default_factory=list)  # pages this sequence holds one reference to
    write_page: int = -1  # page this sequence appends into (owned for writing), -1 = none
    write_offset: int = 0
    next_position: int = 0  # position id of the next appended token: one past the furthest so far
    cacheable: bool = True  # index is a plain causal prefill of its tokens (pages may enter the prefix cache)
    num_hashed_pages: int = 0  # leading pages already registered in the prefix cache
    last_hash: bytes = b""  # chained hash of those pages

    def __len__(self) -> int:
        return len(self.slots)


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = np.zeros(num_pages, dtype=np.int64)
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount-0 cached pages, LRU first
        self._page_hash: dict[int, bytes] = {}
        self._hash_page: dict[bytes, int] = {}

    # ---- page pool -------------------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self._page_hash)

    def _take_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._hash_page[self._page_hash.pop(page)]
        else:
            raise OutOfPagesError("KV cache is full")
        self._refcount[page] = 1
        return page

    def _incref(self, page: int) -> None:
        if self._refcount[page] == 0:
            self._evictable.pop(page)  # only cached pages are revived with refcount 0
        self._refcount[page] += 1

    def _decref(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            if page in self._page_hash:
                self._evictable[page] = None
            else:
                self._free.append(page)
        elif self._refcount[page] < 0:
            raise AssertionError(f"page {page} released twice")

    def refcount(self, page: int) -> int:
        return int(self._refcount[page])

    # ---- sequences -------------------------------------------------------------------------------------------
    def pages_needed(self, seq: SeqKV, num_tokens: int) -> int:
        room = self.page_size - seq.write_offset if seq.write_page >= 0 else 0
        extra = num_tokens - room
        return 0 if extra <= 0 else -(-extra // self.page_size)

    def can_append(self, seq: SeqKV, num_tokens: int, reserve: int = 0) -> bool:
        return self.pages_needed(seq, num_tokens) + reserve <= self.num_free_pages

    def append(self, seq: SeqKV, num_tokens: int, positions: list[int] | None = None) -> list[int]:
        """Give `num_tokens` new slots to `seq` (appended to its index) and return them.

        Positions default to consecutive ids from `seq.next_position`.
        """
        if self.pages_needed(seq, num_tokens) > self.num_free_pages:
            raise OutOfPagesError(f"need {self.pages_needed(seq, num_tokens)} pages, {self.num_free_pages} free")
        new: list[int] = []
        remaining = num_tokens
        while remaining:
            if seq.write_page < 0 or seq.write_offset == self.page_size:
                seq.write_page = self._take_page()
                seq.write_offset = 0
                seq.pages.append(seq.write_page)
            take = min(remaining, self.page_size - seq.write_offset)
            base = seq.write_page * self.page_size + seq.write_offset
            new.extend(range(base, base + take))
            seq.write_offset += take
            remaining -= take
        if positions is None:
            positions = list(range(seq.next_position, seq.next_position + num_tokens))
        elif len(positions) != num_tokens:
            raise ValueError("one position per new token")
        seq.slots.extend(new)
        seq.positions.extend(positions)
        if positions:
            seq.next_position = max(seq.next_position, max(positions) + 1)
        return new

    def free(self, seq: SeqKV) -> None:
        """Drop the sequence's references; its pages return to the pool (or stay cached for prefix reuse)."""
        for page in reversed(seq.pages):  # tail pages first, so the LRU evicts suffixes before prefixes
            self._decref(page)
        seq.pages.clear()
        seq.slots.clear()
        seq.positions.clear()
        seq.write_page = -1
        seq.write_offset = 0

    def fork(self, parent: SeqKV) -> SeqKV:
        """Copy-on-write fork: the child shares every slot of the parent; its new tokens go to fresh pages."""
        for page in parent.pages:
            self._incref(page)
        return SeqKV(
            slots=list(parent.slots),
            positions=list(parent.positions),
            pages=list(parent.pages),
            next_position=parent.next_position,
            cacheable=parent.cacheable,
            num_hashed_pages=parent.num_hashed_pages,
            last_hash=parent.last_hash,
        )

    def merge(self, parts: list[SeqKV], shared_prefix_len: int) -> SeqKV:
        """One sequence attending the shared prefix once, then every part's own tail, in order.

        Positions continue one past the furthest part. The result is not a causal prefill of its tokens, so it
        never enters the prefix cache.
        """
        if not parts:
            raise ValueError("merge needs at least one sequence")
        prefix = parts[0].slots[:shared_prefix_len]
        for p in parts[1:]:
            if p.slots[:shared_prefix_len] != prefix:
                raise ValueError("merged sequences must share the prefix")
        merged = SeqKV(cacheable=False)
        merged.slots = list(prefix)
        merged.positions = list(parts[0].positions[:shared_prefix_len])
        seen: set[int] = set()
        for p in parts:
            merged.slots.extend(p.slots[shared_prefix_len:])
            merged.positions.extend(p.positions[shared_prefix_len:])
            for page in p.pages:
                if page not in seen:
                    seen.add(page)
                    self._incref(page)
                    merged.pages.append(page)
        merged.next_position = max(p.next_position for p in parts)
        return merged

    # ---- prefix cache ----------------------------------------------------------------------------------------
    def _page_key(self, prev: bytes, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(np.asarray(tokens, dtype=np.int64).tobytes())
        return h.digest()

    def match_prefix(self, seq: SeqKV, token_ids: list[int], salt: bytes = b"") -> int:
        """Attach cached pages holding a prefix of `token_ids` to the empty `seq`; return how many tokens hit.

        At least one token is always left to compute, so the caller gets logits for the last prompt token.
        """
        if seq.slots:
            raise ValueError("prefix matching needs an empty sequence")
        usable = (len(token_ids) - 1) // self.page_size
        if not self.enable_prefix_caching:
            return 0
        key = salt
        matched = 0
        for i in range(usable):
            key = self._page_key(key, token_ids[i * self.page_size : (i + 1) * self.page_size])
            page = self._hash_page.get(key)
            if page is None:
                break
            self._incref(page)
            seq.pages.append(page)
            base = page * self.page_size
            seq.slots.extend(range(base, base + self.page_size))
            seq.last_hash = key
            matched += 1
        n = matched * self.page_size
        seq.positions.extend(range(n))
        seq.next_position = n
        seq.num_hashed_pages = matched
        return n

    def register_computed(self, seq: SeqKV, token_ids: list[int], num_computed: int) -> None:
        """Publish the sequence's full pages whose KV has been computed, so later requests can reuse them."""
        if not (self.enable_prefix_caching and seq.cacheable):
            return
        p = self.page_size
        while (seq.num_hashed_pages + 1) * p <= num_computed:
            i = seq.num_hashed_pages
            first = seq.slots[i * p]
            page = first // p
            # Only a page that holds exactly this stretch of the sequence, in order, can stand for it.
            if first % p or seq.slots[i * p + p - 1] != first + p - 1 or seq.positions[i * p] != i * p:
                seq.cacheable = False
                return
            key = self._page_key(seq.last_hash, token_ids[i * p : (i + 1) * p])
            if key not in self._hash_page and page not in self._page_hash:
                self._hash_page[key] = page
                self._page_hash[page] = key
            seq.last_hash = key
            seq.num_hashed_pages += 1
