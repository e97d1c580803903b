"""KV page accounting: append, prefix caching with LRU eviction, copy-on-write fork, merge, positions."""

from hypothesis import given, settings
from hypothesis import strategies as st

from treadle.engine.kv_cache import KVCacheManager, OutOfPagesError, SeqKV

import pytest


def fill(kv: KVCacheManager, tokens: list[int]) -> SeqKV:
    """Prefill `tokens` into a fresh sequence (reusing cached pages) and publish its full pages."""
    seq = SeqKV()
    hit = kv.match_prefix(seq, tokens)
    try:
        kv.append(seq, len(tokens) - hit)
    except OutOfPagesError:
        kv.free(seq)  # as the scheduler does: give the matched prefix pages back
        raise
    kv.register_computed(seq, tokens, len(tokens))
    return seq


def test_append_and_free_return_every_page():
    kv = KVCacheManager(num_pages=4, page_size=4)
    a, b = SeqKV(), SeqKV()
    slots_a = kv.append(a, 5)
    slots_b = kv.append(b, 3)
    assert slots_a[:4] == list(range(slots_a[0], slots_a[0] + 4))
    assert not set(slots_a) & set(slots_b)
    assert kv.num_free_pages == 1
    assert a.positions == [0, 1, 2, 3, 4] and a.next_position == 5
    with pytest.raises(OutOfPagesError):
        kv.append(b, 10)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_pages == kv.num_pages


def test_prefix_cache_hit_shares_pages_and_leaves_last_token():
    kv = KVCacheManager(num_pages=8, page_size=4)
    prompt = list(range(100, 110))  # 2 full pages + 2 tokens
    a = fill(kv, prompt)
    b = SeqKV()
    assert kv.match_prefix(b, prompt) == 8
    assert b.slots == a.slots[:8]
    assert b.positions == list(range(8))
    assert kv.refcount(a.pages[0]) == 2
    c = SeqKV()
    assert kv.match_prefix(c, prompt[:8]) == 4  # one token always stays to compute
    d = SeqKV()
    assert kv.match_prefix(d, [1] + prompt[1:]) == 0
    for s in (a, b, c, d):
        kv.free(s)
    assert kv.num_free_pages == kv.num_pages
    assert kv.num_cached_pages == 2  # still reusable after every owner left
    e = SeqKV()
    assert kv.match_prefix(e, prompt) == 8
    kv.free(e)


def test_lru_eviction_keeps_accounting_exact():
    kv = KVCacheManager(num_pages=4, page_size=2)
    old = fill(kv, [1, 2, 3, 4, 5])  # pages: [1,2] [3,4] cached, [5] partial
    kv.free(old)
    assert kv.num_cached_pages == 2 and kv.num_free_pages == 4
    new = SeqKV()
    kv.append(new, 8)  # needs every page: the cached ones are evicted
    assert kv.num_free_pages == 0 and kv.num_cached_pages == 0
    kv.free(new)
    probe = SeqKV()
    assert kv.match_prefix(probe, [1, 2, 3, 4, 5]) == 0
    assert kv.num_free_pages == kv.num_pages


def test_fork_is_copy_on_write_without_copies():
    kv = KVCacheManager(num_pages=8, page_size=4)
    parent = SeqKV()
    kv.append(parent, 6)  # one full page, one half page
    child = kv.fork(parent)
    assert child.slots == parent.slots and child.positions == parent.positions
    assert all(kv.refcount(p) == 2 for p in parent.pages)
    new_child = kv.append(child, 1)
    new_parent = kv.append(parent, 1)
    assert new_child[0] // 4 not in parent.pages  # the child writes into a page of its own
    assert new_parent[0] == parent.slots[5] + 1  # the parent keeps filling its page
    assert new_child[0] not in parent.slots and new_parent[0] not in child.slots
    assert child.positions[-1] == parent.positions[-1] == 6
    kv.free(parent)
    assert kv.num_free_pages == kv.num_pages - len(child.pages)
    kv.free(child)
    assert kv.num_free_pages == kv.num_pages


def test_merge_concatenates_branches_and_positions_are_independent():
    kv = KVCacheManager(num_pages=16, page_size=4)
    root = SeqKV()
    kv.append(root, 5)
    branches = []
    for i in range(3):
        b = kv.fork(root)
        kv.append(b, 2 + i, positions=list(range(5, 7 + i)))  # every branch restarts at position 5
        branches.append(b)
    merged = kv.merge(branches, shared_prefix_len=5)
    assert merged.slots[:5] == root.slots
    assert merged.slots[5:] == branches[0].slots[5:] + branches[1].slots[5:] + branches[2].slots[5:]
    assert merged.positions == list(range(5)) + [5, 6] + [5, 6, 7] + [5, 6, 7, 8]
    assert merged.next_position == 9
    assert len(merged) == 5 + 2 + 3 + 4 and not merged.cacheable
    conclusion = kv.append(merged, 2)
    assert merged.positions[-2:] == [9, 10] and len(set(conclusion) & set(sum((b.slots for b in branches), []))) == 0
    for s in branches + [root, merged]:
        kv.free(s)
    assert kv.num_free_pages == kv.num_pages


def test_merge_rejects_unrelated_prefixes():
    kv = KVCacheManager(num_pages=4, page_size=4)
    a, b = SeqKV(), SeqKV()
    kv.append(a, 2)
    kv.append(b, 2)
    with pytest.raises(ValueError):
        kv.merge([a, b], shared_prefix_len=2)
    kv.free(a)
    kv.free(b)


def test_forked_tail_is_not_published_as_a_prefix():
    kv = KVCacheManager(num_pages=8, page_size=4)
    tokens = [7, 8, 9, 10, 11, 12]
    parent = fill(kv, tokens)
    child = kv.fork(parent)
    kv.append(child, 4)
    child_tokens = tokens + [1, 2, 3, 4]
    kv.register_computed(child, child_tokens, len(child_tokens))
    probe = SeqKV()
    assert kv.match_prefix(probe, child_tokens + [0]) == 4  # only the parent's aligned first page
    for s in (parent, child, probe):
        kv.free(s)
    assert kv.num_free_pages == kv.num_pages


ops = st.lists(
    st.tuples(st.sampled_from(["new", "append", "fork", "merge", "free", "cached"]), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, page_size=st.sampled_from([1, 3, 16]))
def test_random_operations_keep_exact_accounting(ops, page_size):
    kv = KVCacheManager(num_pages=24, page_size=page_size)
    live: list[tuple[SeqKV, list[int]]] = []
    for op, k in ops:
        try:
            if op == "new" or not live:
                toks = [k % 5] * (1 + k % 9)
                live.append((fill(kv, toks), toks))
            elif op == "append":
                seq, toks = live[k % len(live)]
                n = 1 + k % 7
                kv.append(seq, n)
                toks += [k % 3] * n
                kv.register_computed(seq, toks, len(toks))
            elif op == "fork":
                seq, toks = live[k % len(live)]
                live.append((kv.fork(seq), list(toks)))
            elif op == "merge":
                seq, toks = live[k % len(live)]
                a, b = kv.fork(seq), kv.fork(seq)
                try:
                    kv.append(a, 1)
                    kv.append(b, 2)
                    live.append((kv.merge([a, b], len(seq)), toks + [0, 0, 0]))
                finally:
                    kv.free(a)
                    kv.free(b)
            elif op == "cached":
                live.append((fill(kv, [k % 5] * (1 + k % 9)), [k % 5] * (1 + k % 9)))
            else:
                seq, _ = live.pop(k % len(live))
                kv.free(seq)
        except OutOfPagesError:
            pass
        # Every live reference is counted exactly once, and no slot is written by two live sequences.
        refs: dict[int, int] = {}
        for seq, _ in live:
            assert len(set(seq.pages)) == len(seq.pages)
            for p in seq.pages:
                refs[p] = refs.get(p, 0) + 1
            assert len(seq.positions) == len(seq.slots)
        assert all(kv.refcount(p) == refs.get(p, 0) for p in range(kv.num_pages))
        assert kv.num_free_pages == kv.num_pages - len(refs)
    for seq, _ in live:
        kv.free(seq)
    assert kv.num_free_pages == kv.num_pages
