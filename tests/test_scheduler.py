"""The scheduler with no model at all: lengths, budgets, pages and preemption."""

from conveyor.memory import DynamicReservation, KVCacheManager
from conveyor.scheduler import (
    FCFSPolicy,
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerLimits,
)


def make(max_seqs=8, budget=64, pages=64, page_size=4, chunked=True):
    kv = KVCacheManager(pages, page_size, DynamicReservation(beta=0.0))
    return Scheduler(SchedulerLimits(max_seqs, budget, 1024, chunked), FCFSPolicy(), kv)


def req(rid, n_prompt, max_new=4, t=0.0):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_new), max_new, arrival_time=t)


def run_to_completion(s: Scheduler, max_steps=1000):
    """Drive the scheduler as the engine does, with a fake model that emits token 7."""
    steps = []
    for _ in range(max_steps):
        batch = s.schedule()
        if batch is None:
            break
        steps.append(batch)
        for seq in batch.seqs:
            r = seq.request
            if seq.samples and not r.is_finished and seq.sample_index == len(r.output_token_ids):
                r.output_token_ids.append(7)
                if len(r.output_token_ids) >= r.max_new_tokens:
                    s.finish(r, FinishReason.LENGTH)
        s.batch_done(batch)
    return steps


def test_prefill_is_chunked_under_the_token_budget_and_decodes_go_first():
    s = make(budget=8)
    s.add(req("a", 3, t=0))
    s.add(req("b", 20, t=1))
    first = s.schedule()
    assert [(q.request.request_id, q.num_tokens) for q in first.seqs] == [("a", 3), ("b", 5)]
    assert first.seqs[0].samples and not first.seqs[1].samples
    second = s.schedule()  # a decodes (1 token, listed first), b continues its prompt
    assert [(q.request.request_id, q.start, q.num_tokens) for q in second.seqs] == [("a", 3, 1), ("b", 5, 7)]
    assert second.num_decodes == 1


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_budget():
    s = make(budget=8, chunked=False)
    s.add(req("a", 20))
    assert s.schedule() is None


def test_max_num_seqs_caps_running():
    s = make(max_seqs=2)
    for i in range(4):
        s.add(req(str(i), 2, t=i))
    batch = s.schedule()
    assert len(batch.seqs) == 2 and s.num_waiting == 2


def test_length_finish_is_left_out_of_the_next_batch():
    s = make()
    r = req("a", 2, max_new=1)
    s.add(r)
    b = s.schedule()
    assert b.seqs[0].samples and r.num_launched_outputs == 1
    # Its one token is in flight; the next batch must not run it again.
    assert s.schedule() is None


def test_preemption_recomputes_latest_arrival_and_everything_finishes():
    s = make(pages=6, page_size=4, budget=32)  # 24 tokens of KV for three 6-token prompts + 6 new each
    rs = [req(str(i), 6, max_new=6, t=i) for i in range(3)]
    for r in rs:
        s.add(r)
    steps = run_to_completion(s)
    assert s.num_preemptions > 0
    assert all(r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 6 for r in rs)
    victims = [p.request_id for b in steps for p in b.preempted]
    assert "0" not in victims  # the oldest request is never the victim while others run
    s.check_integrity()
    assert s.kv.num_free_pages == 6 and s.slots.num_free == 8


def test_abort_of_a_waiting_request_leaves_nothing_behind():
    s = make(max_seqs=1)
    a, b = req("a", 2, t=0), req("b", 2, t=1)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.finish(b, FinishReason.ABORT)  # still waiting
    s.finish(a, FinishReason.ABORT)  # running, and in the launched batch: pages kept until it is done
    assert s.kv.holds("a") and s.draining == [a]
    s.check_integrity()
    s.batch_done(batch)
    assert not s.has_work() and not s.kv.holds("a")
    s.check_integrity()
    assert s.kv.num_free_pages == 64


def test_a_draining_request_keeps_its_slot_until_its_batch_is_done():
    s = make(max_seqs=1)
    a, b = req("a", 2, max_new=8, t=0), req("b", 2, t=1)
    s.add(a)
    s.add(b)
    first = s.schedule()
    s.finish(a, FinishReason.ABORT)  # found after `first` launched: a still holds slot and pages
    assert s.schedule() is None  # b must wait: the only slot is a's until `first` is processed
    s.batch_done(first)
    second = s.schedule()
    assert [q.request.request_id for q in second.seqs] == ["b"]
    s.check_integrity()


def test_a_younger_decode_picked_first_still_loses_its_pages_to_an_older_prefill():
    """Decodes go first whatever their rank, so when memory runs out for an older request's prefill
    chunk, a younger decode already in the batch is the victim (FCFS: latest arrival), not the older one."""
    s = make(budget=8, pages=6, page_size=4)
    young, old = req("young", 3, max_new=20, t=1.0), req("old", 18, max_new=2, t=0.0)
    s.add(young)
    batches = []

    def step():
        batch = s.schedule()
        for seq in batch.seqs:
            r = seq.request
            if seq.samples and seq.sample_index == len(r.output_token_ids):
                r.output_token_ids.append(7)
        s.batch_done(batch)
        batches.append(batch)

    step()
    s.add(old)  # arrived earlier, admitted later: ranked ahead of young, still prefilling
    for _ in range(3):
        step()
    victims = [p.request_id for b in batches for p in b.preempted]
    assert victims == ["young"]
    assert [(q.request.request_id, q.num_tokens) for q in batches[3].seqs] == [("old", 4)]
    s.check_integrity()
