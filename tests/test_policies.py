"""Scheduling policies with no model: ordering, victims, aging, fairness and predictor quality.

Time is simulated: every policy takes an injected clock that the fake model loop advances by
one second per step, so nothing here sleeps. The last test runs the real engine on tiny-llama
and checks that no policy changes any request's greedy tokens.
"""

from __future__ import annotations

import random
import statistics

import pytest

from memory import DynamicReservation, KVCacheManager
from scheduler import (
    FinishReason,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerLimits,
    make_policy,
)
from scheduler.length_predictor import LengthPredictor, kendall_tau
from scheduler.policies import (
    POLICY_NAMES,
    AdaptivePolicy,
    FairSharePolicy,
    PriorityPolicy,
    StaticBatchPolicy,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Oracle:
    """A length predictor that knows every answer: isolates SJF/SRTF ordering from learning."""

    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths = lengths
        self.observed: list[str] = []

    def predict(self, r: Request) -> float:
        return float(self.lengths[r.request_id])

    def observe(self, r: Request, actual: int, predicted: float | None = None) -> None:
        self.observed.append(r.request_id)


def make(policy, max_seqs=8, budget=64, pages=256, page_size=4) -> Scheduler:
    kv = KVCacheManager(pages, page_size, DynamicReservation(beta=0.0))
    return Scheduler(SchedulerLimits(max_seqs, budget, 1024), policy, kv)


def req(rid, n_prompt=4, max_new=4, t=0.0, priority=0, tenant=None, prompt=None) -> Request:
    ids = prompt if prompt is not None else list(range(1, n_prompt + 1))
    return Request(rid, ids, SamplingParams(max_tokens=max_new), max_new, arrival_time=t, priority=priority,
                   tenant=tenant)


class Run:
    """Drive the real scheduler as the engine does (fake model emits token 7); one step = one second."""

    def __init__(self, s: Scheduler, clock: Clock, lengths: dict[str, int] | None = None) -> None:
        self.s, self.clock, self.lengths = s, clock, lengths or {}
        self.finished: dict[str, int] = {}  # request id -> step it finished
        self.admitted: list[str] = []
        self.batches = []
        self.step = 0

    def once(self) -> None:
        seen = set(self.s.requests) - {r.request_id for r in self.s.policy.waiting()}
        batch = self.s.schedule()
        self.clock.now += 1.0
        self.step += 1
        if batch is None:
            return
        self.batches.append(batch)
        for seq in batch.seqs:
            r = seq.request
            if r.request_id not in seen and r.request_id not in self.admitted:
                self.admitted.append(r.request_id)
            if seq.samples and not r.is_finished and seq.epoch == r.num_preemptions \
                    and seq.sample_index == len(r.output_token_ids):
                r.output_token_ids.append(7)
                target = self.lengths.get(r.request_id, r.max_new_tokens)
                if len(r.output_token_ids) >= target:
                    reason = FinishReason.LENGTH if target >= r.max_new_tokens else FinishReason.STOP
                    self.s.finish(r, reason)
                    self.finished[r.request_id] = self.step
        self.s.batch_done(batch)
        self.s.check_integrity()

    def until_idle(self, max_steps: int = 5000) -> Run:
        while self.s.has_work():
            self.once()
            assert self.step < max_steps, "did not finish"
        self.s.check_integrity()
        assert self.s.kv.num_free_pages == self.s.kv.total_pages
        return self


def test_every_policy_is_registered_and_unknown_names_fail():
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown schedule policy"):
        make_policy("lifo")


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_completes_a_mixed_workload_under_memory_pressure(name):
    clock = Clock()
    # 12 pages of 4 tokens for requests that need 4 pages each when done: preemption happens.
    s = make(make_policy(name, clock=clock, static_batch_size=3, static_batch_timeout=2.0), max_seqs=4, pages=12)
    rng = random.Random(0)
    rs = [req(str(i), rng.randint(2, 8), rng.randint(2, 8), t=0.0, priority=rng.randint(0, 2),
              tenant=rng.choice("ab")) for i in range(12)]
    for r in rs:
        s.add(r)
    Run(s, clock).until_idle()
    assert all(r.is_finished and len(r.output_token_ids) == r.max_new_tokens for r in rs)


# -- fifo ----------------------------------------------------------------------------------
def test_fifo_runs_one_request_at_a_time_in_arrival_order():
    clock = Clock()
    s = make(make_policy("fifo"))
    for i in range(3):
        s.add(req(str(i), t=float(i)))
    run = Run(s, clock).until_idle()
    assert all(len(b.seqs) == 1 for b in run.batches)
    assert run.admitted == ["0", "1", "2"]
    assert run.finished["0"] < run.finished["1"] < run.finished["2"]


# -- priority ------------------------------------------------------------------------------
def test_priority_is_strict_between_levels_and_fcfs_inside_one():
    clock = Clock()
    p = PriorityPolicy(aging_s=0, clock=clock)
    for rid, prio, t in [("low", 2, 0), ("mid", 1, 1), ("high-late", 0, 3), ("high", 0, 2)]:
        p.add(req(rid, t=t, priority=prio))
    assert [r.request_id for r in p.waiting()] == ["high", "high-late", "mid", "low"]
    assert [p.pop().request_id for _ in range(4)] == ["high", "high-late", "mid", "low"]


def test_priority_aging_lifts_one_level_per_aging_period():
    clock = Clock()
    p = PriorityPolicy(aging_s=10, clock=clock)
    old, new = req("old", t=0, priority=2), req("new", t=0, priority=0)
    p.add(old)
    clock.now = 19.9
    assert p.effective_priority(old) == 1
    new.arrival_time = clock.now
    p.add(new)
    assert p.peek() is new
    clock.now = 20.0  # two periods: old is level 0 now, and arrived first
    assert p.effective_priority(old) == 0 and p.peek() is old


def test_priority_victim_is_least_urgent_then_latest():
    p = PriorityPolicy(aging_s=0)
    rs = [req("a", t=0, priority=1), req("b", t=1, priority=1), req("c", t=2, priority=0)]
    assert p.victim(rs).request_id == "b"


def test_urgent_arrival_preempts_least_urgent_runner_when_slots_are_the_limit():
    clock = Clock()
    s = make(PriorityPolicy(aging_s=0, clock=clock), max_seqs=2)
    s.add(req("low-a", max_new=20, t=0, priority=5))
    s.add(req("low-b", max_new=20, t=1, priority=5))
    run = Run(s, clock)
    run.once()
    s.add(req("urgent", max_new=3, t=clock.now, priority=0))
    run.once()
    assert [r.request_id for r in run.batches[-1].preempted] == ["low-b"]
    assert "urgent" in {q.request.request_id for q in run.batches[-1].seqs}
    run.until_idle()
    assert run.finished["urgent"] < run.finished["low-a"] < run.finished["low-b"]
    assert s.num_preemptions == 1  # no ping-pong once the urgent one runs


def test_fcfs_never_preempts_for_an_arrival():
    clock = Clock()
    s = make(make_policy("fcfs"), max_seqs=2)
    s.add(req("a", max_new=20, t=0, priority=5))
    s.add(req("b", max_new=20, t=1, priority=5))
    run = Run(s, clock)
    run.once()
    s.add(req("urgent", max_new=3, t=clock.now, priority=0))
    run.until_idle()
    assert s.num_preemptions == 0 and run.finished["urgent"] > run.finished["b"]


def test_priority_aging_bounds_starvation_under_a_stream_of_urgent_arrivals():
    clock = Clock()
    s = make(PriorityPolicy(aging_s=5, clock=clock), max_seqs=1)
    s.add(req("low", max_new=2, t=0, priority=3))
    run = Run(s, clock)
    for i in range(100):  # an urgent 2-token request every step: more than the one slot can serve
        s.add(req(f"u{i}", max_new=2, t=clock.now, priority=0))
        run.once()
    # Without aging "low" would wait forever. With it, "low" must be 3 levels ahead of the oldest
    # waiting urgent request, which itself has waited half the time (the slot serves one every
    # two steps while one arrives every step): about 2 x 3 levels x 5 s.
    assert "low" in run.finished and run.finished["low"] <= 2 * 3 * 5 + 5
    run.until_idle()


# -- sjf / srtf ----------------------------------------------------------------------------
def test_sjf_admits_the_shortest_predicted_first_and_lowers_mean_latency():
    lengths = {"long": 40, "mid": 10, "short": 2}

    def mean_finish(name):
        clock = Clock()
        s = make(make_policy(name, predictor=Oracle(lengths), clock=clock, priority_aging_s=1e9), max_seqs=1)
        for i, rid in enumerate(lengths):
            s.add(req(rid, max_new=64, t=i * 1e-3))
        run = Run(s, clock, lengths).until_idle()
        return run, statistics.mean(run.finished.values())

    sjf, sjf_mean = mean_finish("sjf")
    _, fcfs_mean = mean_finish("fcfs")
    assert sjf.admitted == ["short", "mid", "long"]
    assert sjf_mean * 1.5 < fcfs_mean
    assert sorted(sjf.s.policy.predictor.observed) == sorted(lengths)  # on_finish reached the predictor


def test_srtf_preempts_a_long_runner_for_a_short_arrival_and_sjf_does_not():
    for name, preempts in [("srtf", True), ("sjf", False)]:
        lengths = {"long": 50, "short": 3}
        clock = Clock()
        s = make(make_policy(name, predictor=Oracle(lengths), clock=clock, priority_aging_s=1e9), max_seqs=1)
        s.add(req("long", max_new=64, t=0))
        run = Run(s, clock, lengths)
        for _ in range(5):
            run.once()
        s.add(req("short", max_new=64, t=clock.now))
        run.until_idle()
        assert (s.num_preemptions == 1) is preempts, name
        assert (run.finished["short"] < run.finished["long"]) is preempts, name


def test_srtf_ranks_running_requests_by_predicted_remaining_tokens():
    lengths = {"a": 30, "b": 5, "c": 12}
    p = make_policy("srtf", predictor=Oracle(lengths), priority_aging_s=1e9)
    rs = [req(rid, max_new=64) for rid in lengths]
    rs[0].num_tokens += 28  # a has produced 28 of its 30: 2 left, the least
    assert [r.request_id for r in p.order_running(rs)] == ["a", "b", "c"]
    assert p.victim(rs).request_id == "c"


def test_sjf_aging_bounds_how_long_a_long_job_waits():
    lengths = {"long": 30}
    clock = Clock()
    s = make(make_policy("sjf", predictor=Oracle(lengths), clock=clock, priority_aging_s=5), max_seqs=1)
    lengths["first"] = 2
    s.add(req("long", max_new=64, t=0))
    s.add(req("first", max_new=64, t=0))  # occupies the slot first
    run = Run(s, clock, lengths)
    for i in range(200):  # a fresh 2-token job every step
        lengths[f"s{i}"] = 2
        s.add(req(f"s{i}", max_new=64, t=clock.now))
        run.once()
        if "long" in run.admitted:
            break
    # The backlog ages too (its head arrived about half-way); "long" wins once shorts arriving
    # 5 * log2(30 / 2) ~ 20 s after it are at the head: about step 40.
    assert "long" in run.admitted and run.step < 60


# -- predictor -----------------------------------------------------------------------------
def synthetic(rng: random.Random, rid: str) -> tuple[Request, int]:
    """Length depends on a task marker in the prompt (a 'template'), plus noise."""
    kind = rng.choice([0, 1, 2])
    prompt = [900 + kind, 901 + kind] + [rng.randrange(1000, 5000) for _ in range(rng.randint(3, 30))]
    actual = max(1, int([8, 60, 300][kind] * rng.uniform(0.7, 1.3)))
    return req(rid, max_new=512, prompt=prompt), actual


def test_predictor_ranks_better_after_learning_from_finished_requests():
    rng = random.Random(0)
    holdout = [synthetic(rng, f"h{i}") for i in range(100)]
    actual = [a for _, a in holdout]
    pred = LengthPredictor(window=100)  # the reported tau covers the last 100 finishes
    before = kendall_tau([pred.predict(r) for r, _ in holdout], actual)
    for i in range(300):
        r, a = synthetic(rng, str(i))
        pred.observe(r, a, pred.predict(r))
    after = kendall_tau([pred.predict(r) for r, _ in holdout], actual)
    assert before < 0.2 and after > 0.6, (before, after)
    assert pred.kendall_tau() > 0.5  # the reported tau (predictions made at arrival, recent window)


def test_kendall_tau_basics():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0


# -- fair ----------------------------------------------------------------------------------
def test_fair_share_serves_a_light_tenant_despite_a_heavy_one():
    clock = Clock()
    policy = FairSharePolicy()
    s = make(policy, max_seqs=2)
    for i in range(16):
        s.add(req(f"a{i}", max_new=8, t=i * 1e-3, tenant="A"))
    for i in range(4):
        s.add(req(f"b{i}", max_new=8, t=1 + i * 1e-3, tenant="B"))  # every A request arrived first
    run = Run(s, clock)
    gaps = []
    while s.has_work():
        run.once()
        if any(r.tenant == "A" for r in s.policy.waiting()) and any(r.tenant == "B" for r in s.policy.waiting()):
            gaps.append(abs(policy.counters["A"] - policy.counters["B"]))
    # B's four requests are interleaved with A's, not served after all sixteen.
    assert max(run.finished[f"b{i}"] for i in range(4)) < min(run.finished[f"a{i}"] for i in range(12, 16))
    # While both are backlogged, the service gap stays within about one request's cost.
    assert max(gaps) <= 4 + 2 * 8 + 4 + 2 * 8


def test_fair_share_lifts_an_idle_tenant_so_it_cannot_bank_credit():
    p = FairSharePolicy()
    p.add(req("a0", t=0, tenant="A"))
    p.pop()  # A is running and charged for its prompt
    p.counters["A"] = 500.0
    p.add(req("c0", t=1, tenant="C"))  # C was idle: starts level with the active minimum
    assert p.counters["C"] == 500.0


def test_fair_share_weights_give_proportional_service():
    clock = Clock()
    policy = FairSharePolicy(tenant_weights={"gold": 3.0})
    s = make(policy, max_seqs=1)
    for i in range(40):
        s.add(req(f"g{i}", max_new=4, t=0, tenant="gold"))
        s.add(req(f"b{i}", max_new=4, t=0, tenant="basic"))
    run = Run(s, clock)
    for _ in range(120):
        run.once()
    served = [rid[0] for rid in run.finished]
    assert served.count("g") == pytest.approx(3 * served.count("b"), abs=2)


# -- round robin ---------------------------------------------------------------------------
def test_round_robin_alternates_queues_each_time_slice():
    clock = Clock()
    s = make(make_policy("round-robin", round_robin_time_slice=2), max_seqs=1)
    for i in range(3):
        s.add(req(f"a{i}", max_new=2, t=i, tenant="A"))
    for i in range(3):
        s.add(req(f"b{i}", max_new=2, t=10 + i, tenant="B"))
    run = Run(s, clock).until_idle()
    assert run.admitted == ["a0", "b0", "a1", "b1", "a2", "b2"]


# -- static --------------------------------------------------------------------------------
def test_static_batches_wait_to_fill_or_time_out_and_count_padding():
    clock = Clock()
    policy = StaticBatchPolicy(batch_size=3, timeout_s=5, clock=clock)
    s = make(policy)
    s.add(req("p2", n_prompt=2, max_new=2, t=0))
    s.add(req("p6", n_prompt=6, max_new=8, t=0))
    run = Run(s, clock)
    for _ in range(4):
        run.once()
    assert not run.batches  # neither full nor timed out
    run.once()
    run.once()
    assert run.admitted == ["p2", "p6"]
    s.add(req("late", n_prompt=2, max_new=2, t=clock.now))
    run.until_idle()
    first_batch_end = run.finished["p6"]
    assert run.admitted[-1] == "late" and run.finished["late"] > first_batch_end
    # Batch 1: useful 2+6 prompt + 2+8 output = 18; padded 2 x (6 + 8) = 28. Batch 2 has no padding.
    assert policy.num_batches == 2
    assert policy.padding_tokens == 10 and policy.useful_tokens == 18 + 4


# -- adaptive ------------------------------------------------------------------------------
def test_adaptive_switches_with_hysteresis_and_logs_each_switch():
    clock = Clock()
    policy = AdaptivePolicy(clock=clock, low_load=0.5, high_load=2.0, patience=3, priority_window=4)
    s = make(policy, max_seqs=2)
    run = Run(s, clock)
    s.add(req("x", max_new=3, t=0))
    for _ in range(5):
        run.once()
    assert policy.active == "fcfs" and not policy.switches
    for i in range(12):  # a burst: 10 waiting for 2 slots
        s.add(req(f"burst{i}", max_new=30, t=clock.now))
    for _ in range(2):
        run.once()
    assert policy.active == "fcfs"  # not yet: a choice must hold for `patience` steps
    run.once()
    assert policy.active == "sjf"
    s.add(req("vip", max_new=3, t=clock.now, priority=-1))
    for _ in range(4):
        run.once()
    assert policy.active == "priority"
    run.until_idle()
    for _ in range(4):  # vip is gone but was among the last 4 arrivals: no flapping back
        run.once()
    assert policy.active == "priority"
    for i in range(4):
        s.add(req(f"calm{i}", max_new=2, t=clock.now))
    run.until_idle()
    for _ in range(4):
        run.once()
    assert policy.active == "fcfs"
    assert [(a, b) for _, a, b in policy.switches] == [("fcfs", "sjf"), ("sjf", "priority"), ("priority", "fcfs")]


# -- the engine: no policy changes a request's tokens -------------------------------------
def test_engine_outputs_do_not_depend_on_policy(tiny_llama_dir, monkeypatch):
    from runtime import EngineConfig
    from runtime.engine_core import EngineCore
    from tests.conftest import kv_bytes_for_pages
    from tests.test_pipeline import tokens

    monkeypatch.setenv("CONVEYOR_DEBUG_POISON", "1")
    rng = random.Random(3)
    work = [([rng.randrange(3, 500) for _ in range(rng.choice([3, 9, 25]))], rng.randint(0, 2), rng.choice("ab"))
            for _ in range(10)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(policy: str) -> dict[str, list[int]]:
        core = EngineCore(EngineConfig(
            model=str(tiny_llama_dir), schedule_policy=policy, max_model_len=128, max_num_batched_tokens=32,
            max_num_seqs=4, static_batch_size=3, static_batch_timeout=0.0,
            kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 8),  # small: preemption happens
        ))
        outs: dict[str, list] = {str(i): [] for i in range(len(work))}
        for i, (ids, prio, tenant) in enumerate(work):
            core.add_request(core.inputs.make_request(ids, greedy, request_id=str(i), priority=prio, tenant=tenant))
        steps = 0
        while core.has_work():
            for out in core.step():
                outs[out.request_id].append(out)
            steps += 1
            assert steps < 3000, policy
        core.check_integrity()
        assert core.scheduler.kv.num_free_pages == core.scheduler.kv.total_pages
        core.close()
        return {rid: tokens(o) for rid, o in outs.items()}

    reference = run("fcfs")
    assert all(len(t) == 12 for t in reference.values())
    for name in POLICY_NAMES:
        assert run(name) == reference, name


# -- the simulator (scripts/simulate.py) --------------------------------------------------
def load_simulator():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "simulate.py"
    spec = importlib.util.spec_from_file_location("conveyor_simulate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["heavy-tail", "priority", "tenants"])
def test_simulator_runs_every_policy_to_completion(kind):
    sim = load_simulator()
    work = sim.make_workload(kind, 60, rate=20.0, seed=1)
    limits = SchedulerLimits(8, 512, 4096)
    for name in POLICY_NAMES:
        res = sim.simulate(name, work, limits, num_pages=600, static_batch_timeout=0.05)  # integrity checked inside
        summary = sim.summarize(res, slo_ttft=1.0, slo_tpot=0.05)
        assert len(res.requests) == 60 and summary["e2e_p50"] > 0, name


def test_simulated_and_real_step_counts_agree_on_the_cpu_engine(tiny_llama_dir):
    from runtime import EngineConfig
    from runtime.engine_core import EngineCore
    from tests.conftest import kv_bytes_for_pages

    sim = load_simulator()
    rng = random.Random(5)
    work = [sim.SimRequest(str(i), 0.0, tuple(rng.randrange(3, 500) for _ in range(rng.choice([30, 50, 70]))),
                           n, n) for i, n in enumerate(rng.choice([20, 40, 50]) for _ in range(8))]
    config = EngineConfig(model=str(tiny_llama_dir), pipeline_depth=1, max_model_len=128, max_num_batched_tokens=32,
                          max_num_seqs=4, kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 8))  # tight: preempts
    core = EngineCore(config)
    core.step_records = []
    for w in work:
        params = SamplingParams(temperature=0, max_tokens=w.max_new_tokens, ignore_eos=True)
        core.add_request(core.inputs.make_request(list(w.prompt), params, request_id=w.request_id))
    while core.has_work():
        core.step()
    core.close()
    limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, 128)
    res = sim.simulate("fcfs", work, limits, num_pages=8, page_size=config.block_size)
    assert core.scheduler.num_preemptions > 0  # the workload exercises recompute, not just batching
    assert res.steps == len(core.step_records) and res.preemptions == core.scheduler.num_preemptions
