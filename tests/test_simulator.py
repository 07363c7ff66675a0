"""The policy simulator (runtime/tools/simulator, ``conveyor simulate``): workloads, the fitted step-time
model, agreement with the real CPU engine, and the scenarios' plumbing (run small)."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from conveyor.runtime.engine.step_stats import StepRecord
from conveyor.runtime.tools.simulator import (
    CostModel,
    ScenarioContext,
    SimConfig,
    SimRequest,
    Stream,
    fit_cost_model,
    load_step_records,
    main,
    make_workload,
    measure_capacity,
    merge_streams,
    pct,
    scenario_fair,
    scenario_priority,
    scenario_static,
    simulate,
    summarize,
)
from conveyor.scheduler import SamplingParams
from conveyor.scheduler.policies import POLICY_NAMES


# -- workloads ------------------------------------------------------------------------------
def test_heavy_tail_lengths_have_the_issues_shape_and_the_policy_cannot_see_them():
    work = make_workload("heavy-tail", 20000, math.inf, seed=3)
    lengths = [w.output_len for w in work]
    assert 220 <= statistics.fmean(lengths) <= 270
    assert 1700 <= pct(lengths, 99) <= 2048
    # Every request may run to the same max_tokens: the drawn length is known to the simulator only.
    assert {w.max_new_tokens for w in work} == {2048}


def test_streams_are_independent_and_poisson_at_their_rate():
    a = merge_streams([Stream(5.0, 2000)], seed=1)
    both = merge_streams([Stream(5.0, 2000), Stream(1.0, 50, tenant="B")], seed=1)
    assert [r for r in both if r.tenant is None] == a  # adding a stream leaves the other unchanged
    gaps = [y.arrival - x.arrival for x, y in itertools.pairwise(a)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 5.0, rel=0.08)
    assert all(r.arrival == 0.0 for r in merge_streams([Stream(math.inf, 10)]))


# -- the step-time model --------------------------------------------------------------------
def record(i: int, tokens: int, kv: int, seconds: float, prefill: int = 0) -> StepRecord:
    span = (float(i), float(i))
    return StepRecord(i, 1, tokens, prefill, kv, span, span, span, span, span, (10.0 * i, 10.0 * i + seconds), 0.0)


def test_fit_recovers_the_coefficients_and_reports_r_squared():
    rng = random.Random(0)
    truth = CostModel(0.004, 3e-5, 5e-8, 0.003)
    rows = [(rng.randint(1, 2048), rng.randint(0, 200_000), rng.choice([0, 0, 0, 100])) for _ in range(200)]
    exact = [record(i, t, k, truth.step_s(t, k, p > 0), p) for i, (t, k, p) in enumerate(rows)]
    fit = fit_cost_model(exact)
    assert fit.base_s == pytest.approx(truth.base_s, rel=1e-6)
    assert fit.per_token_s == pytest.approx(truth.per_token_s, rel=1e-6)
    assert fit.per_kv_token_s == pytest.approx(truth.per_kv_token_s, rel=1e-6)
    assert fit.per_prefill_step_s == pytest.approx(truth.per_prefill_step_s, rel=1e-6)
    assert fit.r_squared(exact) == pytest.approx(1.0)
    noisy = [record(i, t, k, truth.step_s(t, k, p > 0) * rng.uniform(0.8, 1.2), p) for i, (t, k, p) in enumerate(rows)]
    assert 0.5 < fit_cost_model(noisy).r_squared(noisy) < 0.999


def test_fit_counts_the_idle_before_a_step_that_the_engine_caused():
    # The device waited 2 ms for the host before each prefill step, with work queued: the simulated step
    # is the timeline's, so the fit charges it to the prefill term (an arrival gap is recorded as 0 idle).
    truth = CostModel(0.001, 1e-6, 0.0, 0.003)
    recs = [record(i, t, 0, truth.step_s(t, 0, p > 0), p) for i, (t, p) in
            enumerate([(1, 0), (64, 0), (512, 448), (300, 236), (16, 0), (200, 136)])]
    recs = [r._replace(device_idle_before=0.002 if r.num_prefill_tokens else 0.0) for r in recs]
    fit = fit_cost_model(recs)
    assert fit.base_s == pytest.approx(0.001) and fit.per_prefill_step_s == pytest.approx(0.005)


def test_fit_never_returns_a_negative_coefficient():
    # Durations that fall with KV reads: plain least squares would give c < 0 (negative step times).
    recs = [record(i, t, k, 0.01 + 1e-5 * t - 1e-8 * k) for i, (t, k) in
            enumerate([(1, 0), (100, 0), (1, 500_000), (100, 500_000), (50, 100_000)])]
    fit = fit_cost_model(recs)
    assert min(fit.base_s, fit.per_token_s, fit.per_kv_token_s) >= 0 and fit.per_kv_token_s == 0.0
    assert fit.step_s(1, 10**7) > 0


def test_step_records_file_round_trip_and_cli_prints_the_fit(tmp_path: Path, capsys: pytest.CaptureFixture):
    truth = CostModel(0.002, 1e-5, 1e-8)
    recs = [record(i, t, k, truth.step_s(t, k)) for i, (t, k) in enumerate([(1, 10), (64, 5000), (512, 90_000),
                                                                           (16, 40_000), (300, 2000)])]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([r._asdict() for r in recs]))  # tuples become 2-element arrays, as bench writes
    assert load_step_records(path) == recs
    out = tmp_path / "sim.json"
    assert main(["--fit-records", str(path), "--rate", "20", "--num-requests", "30", "--policies", "fcfs", "sjf",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("fitted cost model from 5 steps: a = 2 ms, b = 10 us/token, c = 10 ns/kv-token, d = 0 ms/prefill step, "
            "R^2 = 1.0000") in text
    report = json.loads(out.read_text())
    assert report["config"]["cost"] == pytest.approx({"base_s": 0.002, "per_token_s": 1e-5, "per_kv_token_s": 1e-8,
                                                      "per_prefill_step_s": 0.0})
    assert set(report["policies"]) == {"fcfs", "sjf"}
    path.write_text(json.dumps([{"num_tokens": 1}]))
    with pytest.raises(ValueError, match="lacks"):
        load_step_records(path)


def test_cost_flag_parses_three_or_four_numbers():
    assert CostModel.parse("0.01,2e-5,0") == CostModel(0.01, 2e-5, 0.0)
    assert CostModel.parse("0.01,2e-5,0,0.004") == CostModel(0.01, 2e-5, 0.0, 0.004)
    for bad in ("0.01,2e-5", "1,2,3,4,5", "a,b,c"):
        with pytest.raises(Exception, match=r"a,b,c\[,d\]"):
            CostModel.parse(bad)


# -- simulation -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["heavy-tail", "priority", "tenants", "mixed"])
def test_simulator_runs_every_policy_to_completion(kind):
    work = make_workload(kind, 40, rate=20.0, seed=1)
    config = SimConfig(max_num_seqs=8, max_num_batched_tokens=512, num_pages=600, static_batch_timeout=0.05)
    for name in POLICY_NAMES:
        res = simulate(name, work, config)  # the scheduler's integrity check runs at the end
        summary = summarize(res, slo_ttft=1.0, slo_tpot=0.05)
        assert len(res.requests) == 40 and summary["e2e_p50"] > 0, name
        assert sorted(r.output_len for r in res.requests) == sorted(w.output_len for w in work), name


def test_simulated_time_follows_the_cost_model():
    # One request alone: a 10-token prompt in one step, then one decode step per further token.
    work = [SimRequest("r", 0.0, tuple(range(10)), 5, 5)]
    cost = CostModel(0.01, 0.001, 0.0001, 0.005)
    res = simulate("fcfs", work, SimConfig(cost=cost))
    kv = [10] + [11, 12, 13, 14]  # KV lengths read by the prefill and the four decodes
    expected = cost.step_s(10, kv[0], prefill=True) + sum(cost.step_s(1, k) for k in kv[1:])
    assert res.steps == 5 and res.sim_time_s == pytest.approx(expected)
    assert res.requests[0].ttft == pytest.approx(0.01 + 0.001 * 10 + 0.0001 * 10 + 0.005)


def test_capacity_counts_only_while_the_queue_is_full():
    config = SimConfig(max_num_seqs=4)
    work = [SimRequest(str(i), 0.0, (1, 2, 3), 10, 10) for i in range(40)]
    # Four at a time, 10 tokens each (one prefill step then 9 decodes): 4 requests per 10 steps.
    step = config.cost.step_s(4, 4 * 8)  # about one decode step of four sequences
    assert measure_capacity(work, config) == pytest.approx(4 / (10 * step), rel=0.05)


def test_simulated_and_real_step_counts_agree_on_the_cpu_engine(tiny_llama_dir):
    from conveyor.runtime import EngineConfig
    from conveyor.runtime.build import build_engine
    from conveyor.runtime.tools.driver import run_until_idle
    from tests.conftest import kv_bytes_for_pages

    rng = random.Random(5)
    work = [SimRequest(str(i), 0.0, tuple(rng.randrange(3, 500) for _ in range(rng.choice([30, 50, 70]))), n, n)
            for i, n in enumerate(rng.choice([20, 40, 50]) for _ in range(8))]
    config = EngineConfig(model=str(tiny_llama_dir), pipeline_depth=1, max_model_len=128, max_num_batched_tokens=32,
                          max_num_seqs=4, kv_cache_memory=kv_bytes_for_pages(str(tiny_llama_dir), 8))  # tight: preempts
    core = build_engine(config)
    core.step_records = []
    run_until_idle(core, [core.inputs.make_request(list(w.prompt), SamplingParams(
        temperature=0, max_tokens=w.max_new_tokens, ignore_eos=True), request_id=w.request_id) for w in work])
    core.close()
    sim = SimConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                    max_model_len=128, num_pages=8, block_size=config.block_size, reservation=config.reservation,
                    reservation_beta=config.reservation_beta, reservation_adapt=config.reservation_adapt,
                    enable_prefix_caching=config.enable_prefix_caching)
    res = simulate("fcfs", work, sim)
    assert core.scheduler.num_preemptions > 0  # the workload exercises recompute, not just batching
    assert res.steps == len(core.step_records) and res.preemptions == core.scheduler.num_preemptions
    # Not only as many steps: the same batches, step by step, in what the cost model charges for.
    assert res.shapes == [(r.num_tokens, r.kv_tokens_read) for r in core.step_records]


# -- scenarios (small) -----------------------------------------------------------------------
def small(tmp_path: Path | None = None, scale: float = 0.05) -> ScenarioContext:
    return ScenarioContext(SimConfig(), seed=0, scale=scale, plot_dir=tmp_path)


def test_static_scenario_prints_padding_waste_and_the_throughput_gap():
    rep = scenario_static(small())
    table = rep.tables["mixed lengths"]
    assert 0.1 < table["static"]["static_padding_waste"] < 0.9
    assert table["fcfs"]["output_tok_per_s"] > table["static"]["output_tok_per_s"] > table["fifo"]["output_tok_per_s"]
    assert all(c.ok for c in rep.checks)
    assert "padding waste" in rep.render()


def test_priority_scenario_protects_urgent_ttft_under_background_overload():
    rep = scenario_priority(small(scale=0.25), low_loads=(1.5,), duration_s=60.0)  # 15 s of arrivals
    row = rep.tables["policy priority"]["low 150%"]
    assert row["urgent_ttft_p95_vs_unloaded"] <= 1.5
    assert rep.tables["policy fcfs"]["low 150%"]["urgent_ttft_p95_vs_unloaded"] > 10


def test_fair_scenario_writes_the_counter_gap_plot(tmp_path: Path):
    rep = scenario_fair(small(tmp_path, scale=0.25), duration_s=60.0)
    png = tmp_path / "fair_counter_gap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = rep.tables["tenants"]
    assert table["fair"]["b_e2e_p95_vs_alone"] < table["fcfs"]["b_e2e_p95_vs_alone"]


def test_cli_scenario_json(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "static.json"
    assert main(["--scenario", "static", "--scale", "0.05", "--json", str(out)]) == 0
    assert "=== scenario static ===" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {c["name"] for c in data["static"]["checks"]} >= {"continuous / static output throughput"}


def test_real_engine_mode_replays_a_scenario_through_the_cpu_engine(tiny_llama_dir):
    """--engine real: the sjf scenario's workload on EngineCore (wall clock), summarised and checked."""
    from conveyor.runtime import EngineConfig
    from conveyor.runtime.tools.simulator.real import RealRunner
    from conveyor.runtime.tools.simulator.scenarios import scenario_sjf

    runner = RealRunner(EngineConfig(model=str(tiny_llama_dir), device="cpu", pipeline_depth=2), output_scale=0.01)
    work = merge_streams([Stream(50.0, 12)], seed=3)
    res = runner("srtf", work, SimConfig(max_num_seqs=2))
    want = {w.request_id: max(1, round(w.output_len * 0.01)) for w in work}
    assert len(res.requests) == len(work) and res.steps > 0
    # Every request got exactly its drawn length (stopped by the driver, not by max_tokens).
    assert sorted(r.output_len for r in res.requests) == sorted(want.values())
    assert all(r.e2e >= r.ttft >= 0 for r in res.requests)
    # STOP finishes reach the predictor (the untimed warm-up requests too, which finish by length)
    assert res.metrics["length_predictor_samples"] == len(work) + runner.warmup
    ctx = ScenarioContext(SimConfig(max_num_seqs=4), seed=0, scale=0.005, queue_bound_seqs=(), real=runner)
    rep = scenario_sjf(ctx, loads=(0.9,))
    (title, table), = rep.tables.items()
    assert set(table) == {"fcfs", "sjf", "srtf"} and "of capacity" in title
    assert all(row["e2e_mean"] > 0 for row in table.values())
    assert len(rep.checks) == 6 and all(math.isfinite(c.value) for c in rep.checks)
    assert runner.step_records  # what --fit-records can fit a cost model to
