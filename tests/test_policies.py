"""Scheduling policies with no model: ordering, victims, aging, fairness and predictor quality.

Time is simulated: every policy takes an injected clock that the fake model loop advances by
one second per step, so nothing here sleeps. The last test runs the real engine on tiny-llama
and checks that no policy changes any request's greedy tokens.
"""

from __future__ import annotations

import random
import statistics

import msgspec
import pytest
from structlog.testing import capture_logs

from conveyor.memory import DynamicReservation, KVCacheManager
from conveyor.scheduler import (
    FinishReason,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerLimits,
    make_policy,
)
from conveyor.scheduler.length_predictor import LengthPredictor, kendall_tau
from conveyor.scheduler.policies import (
    POLICY_NAMES,
    AdaptivePolicy,
    FairSharePolicy,
    PriorityPolicy,
    SJFPolicy,
    SRTFPolicy,
    StaticBatchPolicy,
)
from conveyor.scheduler.policies.base import SchedulerLoad
from conveyor.scheduler.request import RequestStatus


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

    def metrics(self) -> dict[str, float]:
        return {}

    def predict(self, r: Request) -> float:
        return float(self.lengths[r.request_id])

    def observe(self, r: Request, actual: int, predicted: float | None = None) -> None:
        self.observed.append(r.request_id)


def make(policy, max_seqs=8, budget=64, pages=256, page_size=4, clock=None) -> Scheduler:
    kv = KVCacheManager(pages, page_size, DynamicReservation(beta=0.0))
    if clock is None:
        return Scheduler(SchedulerLimits(max_seqs, budget, 1024), policy, kv)
    return Scheduler(SchedulerLimits(max_seqs, budget, 1024), policy, kv, clock=clock)


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
        assert self.s.kv.num_available_pages == self.s.kv.total_pages
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


def test_priority_aging_ignores_a_levels_own_backlog():
    """Background overload must not age background work past fresh urgent requests."""
    clock = Clock()
    p = PriorityPolicy(aging_s=10, clock=clock)
    for i in range(50):
        p.add(req(f"bg{i}", t=0, priority=1))
    for k in range(20):  # 100 s in which a slot frees every 5 s and the background head takes it
        clock.now += 5
        assert p.pop().request_id == f"bg{k}"
    urgent = req("urgent", t=clock.now, priority=0)
    p.add(urgent)
    # By arrival, bg20 would be ten levels more urgent by now; as a head of 0 s it is level 1.
    assert p.peek() is urgent and p.effective_priority(p._levels[1][0]) == 1
    clock.now += 10  # both heads waited one period: they keep their order
    assert p.peek() is urgent
    p.pop()
    p.add(req("urgent2", t=clock.now, priority=0))  # a fresh urgent head
    assert p.peek().request_id == "bg20"  # bg20 waited a period at the head: it competes now, and is older


def test_priority_runners_age_from_admission_not_arrival():
    clock = Clock()
    p = PriorityPolicy(aging_s=10, clock=clock)
    bg = req("bg", t=0, priority=1)
    p.add(bg)
    clock.now = 100.0
    assert p.pop() is bg
    bg.status = RequestStatus.RUNNING
    clock.now = 101.0
    p.add(req("u", t=101, priority=0))
    assert p.preempt_for_waiting([bg]) == [bg]  # it has run 1 s: still level 1, so the urgent one preempts
    clock.now = 111.0
    p.pop()  # u got a slot elsewhere; a fresh urgent request arrives
    p.add(req("u2", t=111, priority=0))
    assert p.preempt_for_waiting([bg]) == []  # 11 s running: level 0, no longer preemptible by it


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


def test_srtf_ranks_running_requests_by_remaining_tokens_when_predictions_are_exact():
    lengths = {"a": 30, "b": 5, "c": 12}
    p = SRTFPolicy(Oracle(lengths), prior_sigma=0.0)  # no spread: the Gittins rank is the remaining tokens
    rs = [req(rid, max_new=64) for rid in lengths]
    rs[0].num_tokens += 28  # a has produced 28 of its 30: 2 left, the least
    assert [r.request_id for r in p.order_running(rs)] == ["a", "b", "c"]
    assert p.victim(rs).request_id == "c"


def test_srtf_does_not_trust_an_uncertain_prediction_that_a_request_is_nearly_done():
    lengths = {"a": 30, "b": 5, "c": 12}
    p = SRTFPolicy(Oracle(lengths), prior_sigma=0.75)  # predictions off by e^0.75 ~ 2x either way
    rs = [req(rid, max_new=64) for rid in lengths]
    rs[0].num_tokens += 28
    # a is at its median: as likely to run on as to stop, so it ranks near its full prediction.
    assert [r.request_id for r in p.order_running(rs)] == ["b", "c", "a"]
    rs[0].num_tokens += 200  # far past it: probably one of the long ones, so its rank grows
    assert p.predicted_remaining(rs[0]) > 1.5 * 30


def test_sjf_measures_the_predictors_spread_from_its_finishes():
    lengths = {str(i): 10 + i for i in range(30)}
    p = SJFPolicy(Oracle(lengths), prior_sigma=0.75, min_sigma_samples=20)
    s = make(p, max_seqs=4)
    for rid in lengths:
        s.add(req(rid, max_new=64))
    Run(s, Clock(), lengths).until_idle()
    assert p.sigma() == 0.0  # the oracle is never wrong
    assert p.finished_tokens == sum(lengths.values()) and p.num_finished == 30


def short_stream_until_admitted(policy: SJFPolicy, steps: int = 300) -> tuple[Run, float]:
    """"first" (2 tokens) holds the only slot, "long" (30) waits, and a 2-token job arrives every step."""
    lengths = policy.predictor.lengths  # the Oracle's: it learns each short's length as it is sent
    lengths.update(first=2, long=30)
    clock = Clock()
    s = make(policy, max_seqs=1)
    s.add(req("first", max_new=64, t=0))
    s.add(req("long", max_new=64, t=0))
    deadline = policy._deadline["long"]
    run = Run(s, clock, lengths)
    for i in range(steps):
        lengths[f"s{i}"] = 2
        s.add(req(f"s{i}", max_new=64, t=clock.now))
        run.once()
        if "long" in run.admitted:
            break
    return run, deadline


def test_sjf_aging_promotes_a_long_job_once_its_fcfs_wait_is_exceeded_by_the_slack():
    policy = SJFPolicy(Oracle({}), wait_factor=1.25, wait_slack_jobs=2.0, prior_sigma=0.0)
    run, deadline = short_stream_until_admitted(policy)
    # Work ahead of "long" at arrival: "first", 2 tokens. Deadline: 1.25 * 2 + 2 jobs * 30 tokens (its own
    # prediction stands in for the mean before anything finished) = 62.5 finished tokens, i.e. 32 shorts.
    assert deadline == pytest.approx(62.5)
    assert "long" in run.admitted
    assert deadline <= policy.finished_tokens < deadline + 2 * 2  # admitted as soon as it was promoted
    # Without aging the stream of shorter jobs starves it.
    starved, _ = short_stream_until_admitted(SJFPolicy(Oracle({}), wait_slack_jobs=1e9))
    assert "long" not in starved.admitted


def test_sjf_deadline_grows_with_the_work_ahead_and_promoted_requests_go_first_unpreempted():
    lengths = {"a": 100, "b": 5, "c": 5}
    p = SRTFPolicy(Oracle(lengths), wait_factor=1.0, wait_slack_jobs=0.0, prior_sigma=0.0)
    a, b, c = (req(rid, max_new=256, t=i) for i, rid in enumerate(lengths))
    p.add(a)  # an empty engine: FCFS would start it now, so with no slack it is promoted at once
    p.add(b)  # behind a's 100 tokens
    p.add(c)  # behind a's 100 and b's 5
    assert [p._deadline[r.request_id] for r in (a, b, c)] == [0.0, 100.0, 105.0]
    assert p.is_promoted(a) and not p.is_promoted(b)
    assert [r.request_id for r in p.waiting()] == ["a", "b", "c"]  # promoted first, though longest
    assert p.pop() is a
    assert p.preempt_for_waiting([a]) == []  # b is 20x shorter, but a promoted request is never preempted
    p.finished_tokens = 100  # a's work is done (as on_finish counts it): b is promoted, c not yet
    assert p.is_promoted(b) and not p.is_promoted(c)
    # An unpromoted runner is preempted for a waiter whose rank is preempt_ratio times smaller.
    p2 = SRTFPolicy(Oracle(lengths), wait_slack_jobs=1e9, prior_sigma=0.0)
    x = req("a", max_new=256)
    p2.add(x)
    assert p2.pop() is x
    x.num_tokens += 10  # running, 90 left
    p2.add(req("b", max_new=256, t=1))
    assert [r.request_id for r in p2.preempt_for_waiting([x])] == ["a"]  # 5 * 1.3 < 90
    x.num_tokens += 86  # 4 left: b (5) no longer outranks it by the margin
    assert p2.preempt_for_waiting([x]) == []


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


def test_predictor_state_round_trips_through_json():
    import msgspec

    from conveyor.scheduler.length_predictor import PredictorState

    rng = random.Random(0)
    pred = LengthPredictor(window=50)
    for i in range(200):
        r, a = synthetic(rng, str(i))
        pred.observe(r, a, pred.predict(r))
    state = msgspec.json.decode(msgspec.json.encode(pred.state()), type=PredictorState)
    restored = LengthPredictor(window=50)
    restored.load_state(state)
    probes = [synthetic(rng, f"p{i}")[0] for i in range(50)]
    assert [restored.predict(r) for r in probes] == [pred.predict(r) for r in probes]
    assert restored.metrics() == pred.metrics() and restored.num_observed == 200
    with pytest.raises(ValueError, match="features"):
        LengthPredictor(num_features=64).load_state(state)


def test_engine_keeps_the_predictor_across_restarts(tiny_llama_dir, tmp_path):
    from conveyor.runtime import EngineConfig
    from conveyor.runtime.build import build_engine
    from conveyor.runtime.engine.config import ConfigError

    path = tmp_path / "predictor.json"
    config = EngineConfig(model=str(tiny_llama_dir), schedule_policy="srtf", max_model_len=64,
                          length_predictor_path=str(path))
    core = build_engine(config)
    for i, n in enumerate((3, 9, 3, 9, 5)):
        core.add_request(core.inputs.make_request([5, 6, i], SamplingParams(max_tokens=n, ignore_eos=True)))
    while core.has_work():
        core.step()
    learned = core.scheduler.policy.predictor
    probe = core.inputs.make_request([5, 6, 7], SamplingParams(max_tokens=20))
    expected = learned.predict(probe)
    core.close()
    assert path.exists()
    again = build_engine(msgspec.structs.replace(config, schedule_policy="adaptive"))  # adaptive predicts too
    try:
        assert again.scheduler.policy.predictor.num_observed == 5
        assert again.scheduler.policy.predictor.predict(probe) == expected != LengthPredictor().predict(probe)
    finally:
        again.close()
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="predictor.json"):
        build_engine(config)
    with pytest.raises(ConfigError, match="predicts lengths"):
        build_engine(msgspec.structs.replace(config, schedule_policy="fcfs"))


def test_sjf_metrics_report_kendall_tau_of_predictions_at_arrival_and_actual_lengths():
    clock = Clock()
    policy = make_policy("sjf", clock=clock, priority_aging_s=1e9)
    assert policy.metrics() == {"length_predictor_kendall_tau": 0.0, "length_predictor_samples": 0}
    s = make(policy, max_seqs=4)
    rng = random.Random(1)
    run = Run(s, clock, {})
    predicted: dict[str, float] = {}
    for i in range(60):
        r, n = synthetic(rng, str(i))
        r.arrival_time = clock.now
        s.add(r)
        predicted[r.request_id] = policy.predictor.predict(r)  # what it says at arrival
        run.lengths[r.request_id] = n
        run.once()
    run.until_idle()
    m = policy.metrics()
    done = list(run.finished)
    assert m["length_predictor_samples"] == 60
    assert m["length_predictor_kendall_tau"] == kendall_tau([predicted[i] for i in done],
                                                            [run.lengths[i] for i in done])
    assert m["length_predictor_kendall_tau"] > 0.3  # it learned something while running
    assert make_policy("srtf").metrics().keys() == m.keys()
    assert make_policy("adaptive").metrics().keys() >= m.keys()


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


def test_fair_share_lifts_a_tenant_with_nothing_waiting_even_while_it_runs():
    p = FairSharePolicy()
    p.add(req("b0", t=0, tenant="B"))
    p.pop()  # B runs, nothing of B's waits
    for i in range(3):
        p.add(req(f"a{i}", t=1, tenant="A"))
    p.counters["A"] = 900.0  # A has been served a lot meanwhile
    p.add(req("b1", t=2, tenant="B"))  # B was not backlogged: it cannot have banked A's service as credit
    assert p.counters["B"] == 900.0
    assert p.metrics() == {"fair_counter_gap": 0.0, "fair_active_tenants": 2}
    p.counters["A"] = 950.0
    assert p.counter_gap() == 50.0


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


def test_tenant_weights_flag_reaches_the_fair_policy(tiny_llama_dir):
    import argparse

    from conveyor.runtime.build import build_engine
    from conveyor.runtime.engine.config import ConfigError, EngineConfig
    from conveyor.runtime.engine_args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--model", str(tiny_llama_dir), "--schedule-policy", "fair",
                              "--tenant-weights", "gold=3, free=0.5", "--max-model-len", "64"])
    config = engine_config(args)
    assert config.tenant_weights == {"gold": 3.0, "free": 0.5}
    core = build_engine(config)
    try:
        assert core.scheduler.policy.tenant_weights == {"gold": 3.0, "free": 0.5}
    finally:
        core.close()
    assert engine_config(parser.parse_args([])).tenant_weights == {}
    for bad in ("gold", "gold=x", "=2"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--tenant-weights", bad])
    with pytest.raises(ConfigError, match="tenant_weights"):
        EngineConfig(tenant_weights={"gold": 0.0})


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
    assert policy.metrics() == {"static_padding_waste": 10 / 32, "static_batches": 2}


# -- adaptive ------------------------------------------------------------------------------
def feed(policy: AdaptivePolicy, start: float, end: float, waiting: int, kv: float = 0.1, slots: int = 16,
         dt: float = 0.1) -> float:
    """Synthetic loads every ``dt`` seconds over [start, end): what the scheduler reports each step."""
    t = start
    while t < end - 1e-9:
        policy.observe(SchedulerLoad(t, waiting, slots, kv, 0))
        t = round(t + dt, 6)
    return t


def test_adaptive_switches_at_the_queue_thresholds_after_the_dwell_time():
    p = AdaptivePolicy()  # 16 slots: high_queue 0.25 = 4 waiting, overload_queue 4.0 = 64
    t = feed(p, 0, 5, waiting=3)  # 0.19 per slot: inside the band
    assert p.active == "fcfs"
    t = feed(p, t, t + 1.0, waiting=4)  # a queue, but for less than dwell_s (1 s) so far
    assert p.active == "fcfs"
    t = feed(p, t, t + 0.2, waiting=4)
    assert p.active == "srtf" and p._sjf.preemptive  # with capacity to spare: preempt for short jobs
    t = feed(p, t, t + 1.2, waiting=64)
    assert p.active == "sjf" and not p._sjf.preemptive  # overloaded: no recompute
    t = feed(p, t, t + 5, waiting=32)  # halved: still the overload band
    assert p.active == "sjf"
    t = feed(p, t, t + 1.2, waiting=31)
    assert p.active == "srtf"
    t = feed(p, t, t + 9.5, waiting=1)  # calm (1/16 = low_queue), but calming down takes 10 s
    assert p.active == "srtf"
    t = feed(p, t, t + 0.7, waiting=1)
    assert p.active == "fcfs"
    assert [(a, b) for _, a, b in p.switches] == [("fcfs", "srtf"), ("srtf", "sjf"), ("sjf", "srtf"),
                                                  ("srtf", "fcfs")]
    assert p.metrics()["adaptive_policy_switches"] == 4


def test_adaptive_does_not_flap_when_load_oscillates_inside_the_hysteresis_band():
    p = AdaptivePolicy()
    t = 0.0
    for _ in range(50):  # between 2 and 3 waiting per 16 slots: above calm, below a queue
        t = feed(p, t, t + 0.5, waiting=2)
        t = feed(p, t, t + 0.5, waiting=3)
    for _ in range(50):  # bursts shorter than the dwell time
        t = feed(p, t, t + 0.5, waiting=8)
        t = feed(p, t, t + 0.5, waiting=0)
    assert p.active == "fcfs" and p.switches == []
    t = feed(p, t, t + 2, waiting=8)
    for _ in range(50):  # now in srtf: lulls shorter than the calm dwell do not switch it back
        t = feed(p, t, t + 4, waiting=0)
        t = feed(p, t, t + 1, waiting=6)
    for _ in range(50):  # around the overload threshold (64): in and out faster than the dwell
        t = feed(p, t, t + 0.6, waiting=80)
        t = feed(p, t, t + 0.6, waiting=24)
    assert [(a, b) for _, a, b in p.switches] == [("fcfs", "srtf")]


def test_adaptive_reacts_to_kv_usage():
    p = AdaptivePolicy()
    t = feed(p, 0, 1.2, waiting=0, kv=0.95)  # memory nearly full: short jobs give pages back soonest
    assert p.active == "sjf"
    t = feed(p, t, t + 20, waiting=0, kv=0.8)  # inside the KV band: leaves sjf but does not calm down
    assert p.active == "srtf"
    t = feed(p, t, t + 10.2, waiting=0, kv=0.5)
    assert p.active == "fcfs"


def test_adaptive_counts_arrivals_and_sees_a_growing_queue():
    clock = Clock()
    p = AdaptivePolicy(clock=clock)
    n = 0
    while clock.now < 25.0:
        for _ in range(5):  # 5 arrivals and 2 admissions a second: the queue grows
            p.add(req(f"r{n}", t=clock.now))
            n += 1
        p.pop()
        p.pop()
        for _ in range(10):
            p.observe(SchedulerLoad(clock.now, 32, 16, 0.1, 0))  # 32 waiting: half the overload queue
            clock.now = round(clock.now + 0.1, 6)
    assert p.signals.arrival_rate == pytest.approx(5.0, rel=0.05)
    assert p.signals.admission_rate == pytest.approx(2.0, rel=0.05)
    # Projected one second ahead with the drift: (32 + 3) per 16 slots.
    assert p.signals.queue_pressure == pytest.approx(35 / 16, rel=0.05)
    # A queue from the start (srtf); once a whole 20 s window shows arrivals outpacing admissions,
    # overload (sjf), although the queue itself never reached the overload threshold.
    assert [(a, b) for _, a, b in p.switches] == [("fcfs", "srtf"), ("srtf", "sjf")]
    assert 20.0 <= p.switches[1][0] <= 21.5
    assert p.num_waiting() == n - 2 * 25  # moving the queue between policies lost nothing


def test_adaptive_uses_priority_when_priorities_mix_and_logs_every_switch():
    clock = Clock()
    p = AdaptivePolicy(clock=clock, priority_window=4)
    with capture_logs() as logs:
        for i in range(3):
            p.add(req(f"bg{i}", t=0, priority=1))
        p.add(req("vip", t=0.5, priority=0))
        feed(p, 0, 1.2, waiting=4)
        assert p.active == "priority" and p.peek().request_id == "vip"
        for i in range(4):  # the window of arrivals holds one level again
            p.add(req(f"x{i}", t=2, priority=1))
        assert [p.pop().request_id for _ in range(8)][:2] == ["vip", "bg0"]  # all admitted: nothing waits
        feed(p, 1.2, 12.5, waiting=0)
    assert p.active == "fcfs"
    switches = [e for e in logs if e["event"] == "schedule policy switch"]
    assert [(e["old"], e["new"]) for e in switches] == [("fcfs", "priority"), ("priority", "fcfs")]
    assert all({"queue_pressure", "kv_usage", "arrival_rate", "waiting"} <= e.keys() for e in switches)
    assert p.metrics()["adaptive_policy_switches"] == 2


def test_adaptive_under_a_burst_on_the_real_scheduler():
    clock = Clock()
    policy = AdaptivePolicy(clock=clock, dwell_s=2.0, calm_dwell_s=5.0)
    s = make(policy, max_seqs=2, clock=clock)  # observe() gets the scheduler's clock
    run = Run(s, clock)
    s.add(req("x", max_new=3, t=0))
    for _ in range(5):
        run.once()
    assert policy.active == "fcfs"
    for i in range(12):  # 10 waiting for 2 slots: overload
        s.add(req(f"burst{i}", max_new=2 + i % 5, t=clock.now))
    run.until_idle()
    for _ in range(8):
        run.once()
    assert policy.switches[0][1:] == ("fcfs", "sjf")
    assert policy.active == "fcfs" and len(run.finished) == 13
    assert policy.metrics()["length_predictor_samples"] == 13  # every finish reached the predictor


# -- the engine: no policy changes a request's tokens -------------------------------------
def test_engine_outputs_do_not_depend_on_policy(tiny_llama_dir, monkeypatch):
    from conveyor.runtime import EngineConfig
    from conveyor.runtime.build import build_engine
    from tests.conftest import kv_bytes_for_pages
    from tests.test_pipeline import tokens

    monkeypatch.setenv("CONVEYOR_DEBUG_POISON", "1")
    rng = random.Random(3)
    work = [([rng.randrange(3, 500) for _ in range(rng.choice([3, 9, 25]))], rng.randint(0, 2), rng.choice("ab"))
            for _ in range(10)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(policy: str) -> dict[str, list[int]]:
        core = build_engine(EngineConfig(
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
        assert core.scheduler.kv.num_available_pages == core.scheduler.kv.total_pages
        core.close()
        return {rid: tokens(o) for rid, o in outs.items()}

    reference = run("fcfs")
    assert all(len(t) == 12 for t in reference.values())
    for name in POLICY_NAMES:
        assert run(name) == reference, name
