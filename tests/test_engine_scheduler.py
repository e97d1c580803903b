"""Scheduler budgets, chunked prefill, priorities and preemption, driven without a model.

`run_step` plays the model runner: it marks scheduled tokens computed and, when a sequence has computed all its
tokens, appends a fake sampled token (finishing it after `max_new` tokens).
"""

from treadle.engine.kv_cache import KVCacheManager
from treadle.engine.sampling_params import SamplingParams
from treadle.engine.scheduler import Scheduler
from treadle.engine.sequence import Request, Sequence, SeqStatus


def make_seq(sched: Scheduler, n_prompt: int, priority: int = 0, rid: str = "r") -> Sequence:
    req = Request(rid, list(range(1, n_prompt + 1)), SamplingParams(), priority=priority)
    seq = Sequence(req, 0, list(req.prompt_token_ids))
    req.seqs.append(seq)
    req.forked = True
    sched.add(seq)
    return seq


def run_step(sched: Scheduler, max_new: int = 4):
    out = sched.schedule()
    for c in out.chunks:
        seq = c.seq
        seq.num_computed += c.num_tokens
        assert len(seq.kv.slots) == seq.num_computed
        if seq.num_computed == len(seq.token_ids):
            seq.token_ids.append(0)
            if seq.num_generated >= max_new:
                sched.remove(seq)
    return out


def test_token_budget_and_chunked_prefill():
    kv = KVCacheManager(num_pages=64, page_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    long = make_seq(sched, 25, rid="long")
    short = make_seq(sched, 3, rid="short")
    out = run_step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(long, 10)]
    out = run_step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(long, 10)]
    out = run_step(sched)  # the last 5 prompt tokens, then the short prompt fills the rest of the budget
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(long, 5), (short, 3)]
    out = run_step(sched)  # both decode now: one token each
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(long, 1), (short, 1)]
    while sched.has_work():
        assert run_step(sched).num_tokens <= 10
    assert kv.num_free_pages == kv.num_pages


def test_decodes_go_before_new_prefills_and_max_num_seqs_holds():
    kv = KVCacheManager(num_pages=64, page_size=4)
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = (make_seq(sched, 3, rid=x) for x in "abc")
    out = run_step(sched)
    assert [x.seq for x in out.chunks] == [a, b]
    out = run_step(sched)
    assert [(x.seq, x.num_tokens) for x in out.chunks] == [(a, 1), (b, 1)]  # c waits: only 2 sequences
    assert c.status is SeqStatus.WAITING
    while sched.has_work():
        out = run_step(sched)
        assert len(sched.running) <= 2
    assert kv.num_free_pages == kv.num_pages


def test_priority_orders_admission():
    kv = KVCacheManager(num_pages=64, page_size=4)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    low = make_seq(sched, 3, priority=5, rid="low")
    high = make_seq(sched, 3, priority=-1, rid="high")
    out = run_step(sched)
    assert [x.seq for x in out.chunks] == [high]
    while high.status is not SeqStatus.FINISHED:
        run_step(sched)
    assert [x.seq for x in run_step(sched).chunks] == [low]


def test_preemption_by_recompute_when_pages_run_out():
    kv = KVCacheManager(num_pages=7, page_size=2)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_seq(sched, 3, rid=f"s{i}") for i in range(3)]
    run_step(sched, max_new=6)
    assert all(s.status is SeqStatus.RUNNING for s in seqs)
    preempted = []
    for _ in range(40):
        if not sched.has_work():
            break
        out = run_step(sched, max_new=6)
        preempted += out.preempted
        assert kv.num_free_pages >= 0
    assert preempted, "a 14-slot pool cannot hold three 9-token sequences at once"
    assert sched.num_preemptions == len(preempted)
    assert preempted[0] is seqs[-1]  # the lowest-ranked sequence goes first
    assert all(s.status is SeqStatus.FINISHED and s.num_generated == 6 for s in seqs)
    assert kv.num_free_pages == kv.num_pages


def test_prefix_cache_counts_and_readmission_reuses_pages():
    kv = KVCacheManager(num_pages=32, page_size=4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    first = make_seq(sched, 13, rid="a")
    run_step(sched)
    kv.register_computed(first.kv, first.token_ids, first.num_computed)
    second = make_seq(sched, 13, rid="b")
    out = run_step(sched)
    assert (second, 1) in [(c.seq, c.num_tokens) for c in out.chunks]  # 12 of 13 prompt tokens cached
    assert sched.prefix_cache_hits == 12 and sched.prefix_cache_queries == 26
    while sched.has_work():
        run_step(sched)
    assert kv.num_free_pages == kv.num_pages
