"""The trace protocol (issue #23) on small committed slices of the public traces, simulator only:
trace loading and scaling, Mooncake's shared prefixes, the capacity search, and the orderings that
must hold between each technique and its baseline mode (never times)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest

from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.runtime.tools.simulator import simulate
from conveyor.runtime.tools.simulator.capacity import SLO, search_capacity, summarize_load, unloaded_decode_step
from conveyor.runtime.tools.simulator.engine import TokenGaps
from conveyor.runtime.tools.simulator.trace_bench import TRACE_CONFIG, Protocol
from conveyor.runtime.tools.simulator.trace_cli import main as bench_main
from conveyor.runtime.tools.simulator.traces import (
    MOONCAKE_BLOCK,
    TraceOptions,
    load_trace,
    prefix_hit_ceiling,
    to_requests,
    unique_pages,
)

DATA = Path(__file__).parent / "data" / "traces"
AZURE = DATA / "azure_code_slice.csv"
SHAREGPT = DATA / "sharegpt_lengths_slice.csv"
MOONCAKE = DATA / "mooncake_conversation_slice.jsonl"
# Small engine limits so each run is a few hundred steps.
CONFIG = msgspec.structs.replace(TRACE_CONFIG, max_num_seqs=16, num_pages=2048)


# -- loading and scaling ---------------------------------------------------------------------
def test_formats_are_told_by_their_header_and_arrivals_start_at_zero():
    azure, share, moon = load_trace(AZURE, 50), load_trace(SHAREGPT, 50), load_trace(MOONCAKE, 50)
    assert (azure.kind, share.kind, moon.kind) == ("azure", "sharegpt", "mooncake")
    assert azure.rows[0].arrival == 0.0 and moon.rows[0].arrival == 0.0
    assert all(a.arrival <= b.arrival for a, b in zip(azure.rows, azure.rows[1:]))
    assert share.native_rate is None and not share.has_arrivals
    assert azure.native_rate > 0 and moon.rows[0].hash_ids
    assert len(load_trace(AZURE, 10, offset=5).rows) == 10


def test_time_is_scaled_to_the_rate_and_lengths_come_from_the_trace():
    trace = load_trace(AZURE, 60)
    native = to_requests(trace, None)
    double = to_requests(trace, 2 * trace.native_rate)
    assert [r.arrival / 2 for r in native] == pytest.approx([r.arrival for r in double])
    assert [len(r.prompt) for r in native] == [min(row.prompt_len, 8192 - row.output_len) for row in trace.rows]
    assert all(r.max_new_tokens == r.output_len for r in native)  # max_tokens = the row's output length
    assert all(r.arrival == 0.0 for r in to_requests(trace, math.inf))
    # ShareGPT has no arrivals: Poisson at the rate, seeded, so every policy sees the same stream
    share = load_trace(SHAREGPT, 60)
    assert to_requests(share, 3.0) == to_requests(share, 3.0)
    with pytest.raises(ValueError, match="no arrivals"):
        to_requests(share, None)


def test_max_tokens_factor_inflates_max_tokens_only_and_the_context_clips_the_prompt():
    trace = load_trace(SHAREGPT, 80)
    plain = to_requests(trace, math.inf, TraceOptions(max_model_len=4096))
    inflated = to_requests(trace, math.inf, TraceOptions(max_model_len=4096, max_tokens_factor=6.0))
    mean = sum(r.output_len for r in plain) / len(plain)
    assert all(len(r.prompt) + r.max_new_tokens <= 4096 for r in plain + inflated)
    assert all(r.max_new_tokens >= min(4095, round(6 * mean)) or len(r.prompt) == 1 for r in inflated)
    assert all(r.output_len <= r.max_new_tokens for r in inflated)


def test_mooncake_prompts_share_ids_exactly_where_their_hashes_match():
    trace = load_trace(MOONCAKE, 120)
    opt = TraceOptions(block_tokens=64)
    work = {r.request_id: r for r in to_requests(trace, math.inf, opt)}
    by_hash: dict[int, tuple[int, ...]] = {}
    for i, row in enumerate(trace.rows):
        prompt = work[str(i)].prompt
        assert len(prompt) == min(round(row.prompt_len * 64 / MOONCAKE_BLOCK), 8192 - row.output_len)
        for k, h in enumerate(row.hash_ids[:-1]):  # full blocks (the last one is partial)
            block = prompt[64 * k:64 * (k + 1)]
            if len(block) == 64:
                assert by_hash.setdefault(h, block) == block
    blocks = list(by_hash.items())
    assert len({b for _, b in blocks}) == len(blocks)  # different hashes, different ids
    with pytest.raises(ValueError, match="multiple of block_size"):
        to_requests(trace, 1.0, TraceOptions(block_tokens=40))


def test_infinite_cache_ceiling_counts_each_prefix_seen_before():
    trace = load_trace(MOONCAKE, 150)
    work = to_requests(trace, math.inf)
    ceiling = prefix_hit_ceiling(work, 16)
    assert 0.0 < ceiling < 1.0
    assert prefix_hit_ceiling(work[:1], 16) == 0.0  # nothing seen before the first request
    assert unique_pages(work, 16) <= sum(len(r.prompt) // 16 for r in work)


def test_token_gaps_count_each_new_token_once():
    clock = iter([1.0, 1.5, 3.0]).__next__
    gaps = TokenGaps(clock, {"a": 2})

    def out(n: int) -> RequestOutput:
        return RequestOutput(request_id="a", text="", token_ids=[0], finished=False, num_prompt_tokens=4,
                             num_output_tokens=n, arrival_time=0.0)

    gaps([out(1)])
    gaps([out(2)])
    gaps([out(3)])  # past the drawn length: the real engine's extra token is not a gap
    assert gaps.gaps == [0.5]


# -- the protocol's orderings ----------------------------------------------------------------
def slo_for(work, config=CONFIG) -> SLO:
    return SLO(5 * unloaded_decode_step(work, config))


def test_chunked_prefill_capacity_exceeds_prefill_first():
    trace = load_trace(AZURE, 120)
    make = lambda rate: to_requests(trace, rate)  # noqa: E731
    slo = slo_for(make(math.inf))
    chunked = search_capacity(make, CONFIG, slo, iters=5)
    prefill_first = msgspec.structs.replace(CONFIG, enable_chunked_prefill=False,
                                            max_num_batched_tokens=CONFIG.max_model_len)
    whole = search_capacity(make, prefill_first, slo, iters=5)
    assert chunked.rate > whole.rate
    # the search brackets: every probe above the answer failed, the answer itself (if probed) passed
    assert all(not p.ok for p in chunked.probes if p.rate > chunked.rate)


def test_dynamic_reservation_serves_at_least_what_conservative_does():
    trace = load_trace(SHAREGPT, 100)
    inflated = to_requests(trace, math.inf, TraceOptions(max_tokens_factor=6.0))
    slo = slo_for(inflated)
    runs = {mode: summarize_load(simulate("fcfs", inflated, msgspec.structs.replace(CONFIG, reservation=mode)), slo)
            for mode in ("dynamic", "conservative")}
    assert runs["dynamic"]["output_tok_per_s"] >= runs["conservative"]["output_tok_per_s"]
    assert runs["dynamic"]["retractions"] <= 0.05 * len(inflated)


def test_lpm_hits_the_prefix_cache_at_least_as_often_as_fcfs_on_mooncake():
    trace = load_trace(MOONCAKE, 150)
    work = to_requests(trace, 2.0 * trace.native_rate)
    pool = max(int(0.25 * unique_pages(work, 16)), 2 * max(-(-(len(r.prompt) + r.max_new_tokens) // 16)
                                                          for r in work))
    cfg = msgspec.structs.replace(CONFIG, num_pages=pool)
    slo = slo_for(work, cfg)
    hits = {p: summarize_load(simulate(p, work, cfg), slo)["prefix_hit_rate"] for p in ("fcfs", "lpm")}
    assert hits["lpm"] >= hits["fcfs"] > 0.0
    assert hits["lpm"] <= prefix_hit_ceiling(work, 16) + 1e-9  # no cache beats the infinite one


def test_the_lpm_row_runs_at_the_loads_asked_for_on_its_own_pool():
    trace = load_trace(MOONCAKE, 60)
    proto = Protocol(trace, CONFIG, policies=(), loads=(0.95,), iters=2)
    row = proto.run_all(("lpm",)).rows["lpm"]
    assert set(k for k in row if k.endswith("x")) == {"0.95x"}
    assert row["pool_pages"] < row["unique_pages"]  # a pool that cannot keep every prefix
    hits = {p: row["0.95x"][p]["prefix_hit_rate"] for p in ("fcfs", "lpm")}
    assert 0.0 < hits["fcfs"] <= hits["lpm"] <= row["infinite_cache_hit_ceiling"] + 1e-9


def test_with_no_rate_under_the_slo_the_loads_multiply_the_saturated_rate_and_a_note_says_so():
    proto = Protocol(load_trace(SHAREGPT, 40), CONFIG, policies=("fcfs",), loads=(0.5,), iters=1,
                     tbt_slo_factor=0.5)  # half the unloaded step: no load can meet it
    out = proto.run_all(()).to_builtins()
    cap = out["capacity"]["fcfs"]
    assert cap["rate"] == 0 and cap["probes"] and not any(p["ok"] for p in cap["probes"])
    assert out["per_load"]["0.5x"]["fcfs"]["rate_rps"] == pytest.approx(0.5 * cap["saturated"])
    assert sum(n.startswith("capacity[fcfs]: the SLO held at no probed rate") for n in out["notes"]) == 1


def test_sjf_mean_e2e_is_no_worse_than_fcfs_at_overload():
    # 8 req/s, twice this engine's ~4: a queue builds, and arrivals are spread enough for the online
    # predictor to have learned from finished requests before the queue is long (at 20 req/s almost
    # everything is queued before anything finishes, and the learned order is no better than fcfs's).
    trace = load_trace(SHAREGPT, 200)
    work = to_requests(trace, 8.0)
    mean = lambda r: sum(x.e2e for x in r.requests) / len(r.requests)  # noqa: E731
    fcfs, sjf = mean(simulate("fcfs", work, CONFIG)), mean(simulate("sjf", work, CONFIG))
    oracle = mean(simulate("sjf", work, CONFIG, true_lengths=True))
    assert oracle <= sjf <= fcfs


def test_protocol_writes_every_row_it_was_asked_for(tmp_path):
    proto = Protocol(load_trace(SHAREGPT, 40), CONFIG, policies=("fcfs", "sjf", "adaptive"), loads=(0.5, 1.1),
                     iters=3)
    bench = proto.run_all(("sjf", "adaptive", "overlap"))
    out = bench.to_builtins()
    assert set(out["per_load"]) == {"0.5x", "1.1x"}
    assert set(out["per_load"]["1.1x"]) == {"fcfs", "sjf", "adaptive", "sjf(true)"}
    assert {"sjf", "adaptive"} <= set(out["rows"])
    assert "overlap" not in out["rows"] and any("depth 1" in n for n in out["notes"])  # sim: real engine only
    assert out["checks"] and all(c["name"] for c in out["checks"])
    json.dumps(out)


@pytest.mark.parametrize("path", [SHAREGPT, AZURE])
def test_the_priority_rows_background_lasts_as_long_as_the_urgent_stream(path):
    """At 1x and 2x capacity the background runs the urgent stream's whole span, twice as dense at 2x (the
    trace's other rows alone would stop at 90% and 45% of it; on Azure, whose rows keep their arrival
    times, a contiguous split of the rows put them in different stretches of time)."""
    trace = load_trace(path, 60)
    proto = Protocol(trace, CONFIG, policies=("fcfs", "priority"), loads=(1.0,), iters=2)
    bench = proto.run_all(("priority",))
    row, n = bench.rows["priority"], len(trace.rows)
    for policy in ("fcfs", "priority"):
        one, two = row[f"{policy} low 1x"], row[f"{policy} low 2x"]
        assert one["background_span"] >= 0.9 and two["background_span"] >= 0.9
        assert 1.5 <= two["background"] / one["background"] <= 2.5 and one["background"] > n / 2
        assert two["urgent_ttft_p50"] <= two["urgent_ttft_p95"]


def test_a_run_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    def broken(self, cap):
        raise KeyboardInterrupt  # as a timeout's signal would, after the chunked row
    monkeypatch.setattr(Protocol, "row_fair", broken)
    with pytest.raises(KeyboardInterrupt):
        bench_main(["--trace", str(AZURE), "--limit", "30", "--policy", "fcfs", "--rows", "chunked", "fair",
                    "--loads", "1.1", "--iters", "2", "--max-num-seqs", "16", "--no-plot", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "azure_code_slice_sim.json").read_text())
    assert "chunked" in out["rows"] and "fair" not in out["rows"] and out["per_load"]["1.1x"]["fcfs"]


def test_a_resumed_run_keeps_the_earlier_slo_capacity_and_rows(tmp_path, monkeypatch):
    """--resume: a device run split into calls keeps one SLO and capacity (no search again) and the
    policies and rows not asked for; a row measured again replaces its checks."""
    from conveyor.runtime.tools.simulator import trace_bench

    args = ["--trace", str(AZURE), "--limit", "30", "--loads", "1.1", "--iters", "2", "--max-num-seqs", "16",
            "--no-plot"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert bench_main([*args, "--policy", "fcfs", "--rows", "chunked", "--out", str(first)]) == 0
    before = json.loads((first / "azure_code_slice_sim.json").read_text())

    def no_search(*a, **kw):
        raise AssertionError("a resumed run searched the capacity again")
    monkeypatch.setattr(trace_bench, "search_capacity", no_search)
    resumed = ["--resume", str(first / "azure_code_slice_sim.json")]
    assert bench_main([*args, *resumed, "--policy", "sjf", "--rows", "fair", "--out", str(second)]) == 0
    after = json.loads((second / "azure_code_slice_sim.json").read_text())
    assert after["slo"] == before["slo"] and after["capacity"] == before["capacity"]
    assert after["per_load"]["1.1x"]["fcfs"] == before["per_load"]["1.1x"]["fcfs"] and after["per_load"]["1.1x"]["sjf"]
    assert set(after["rows"]) == {"chunked", "fair"}
    rows = [c["row"] for c in after["checks"]]
    assert rows.count("chunked") == [c["row"] for c in before["checks"]].count("chunked") == 1 and "fair" in rows

    monkeypatch.undo()  # the chunked row searches prefill-first's capacity
    again = tmp_path / "again"
    assert bench_main([*args, "--resume", str(second / "azure_code_slice_sim.json"), "--policy", "--rows", "chunked",
                       "--out", str(again)]) == 0  # no policies: the rows only
    last = json.loads((again / "azure_code_slice_sim.json").read_text())
    assert last["per_load"] == after["per_load"]
    assert [c["row"] for c in last["checks"]].count("chunked") == 1 and any(c["row"] == "fair" for c in last["checks"])
    with pytest.raises(ValueError, match="max_num_seqs"):
        bench_main([*args[:-3], "--max-num-seqs", "8", "--no-plot", *resumed, "--policy", "fcfs", "--rows", "fair",
                    "--out", str(again)])


def test_step_records_round_trip_gzipped(tmp_path):
    from conveyor.runtime.engine.step_stats import StepRecord
    from conveyor.runtime.tools.simulator.cost_model import load_step_records, save_step_records

    span = (1.0, 2.0)
    records = [StepRecord(i, 4, 4 + i, i, 100 * i, span, span, span, span, span, (1.0, 1.5 + i), 0.0) for i in range(3)]
    for name in ("steps.json", "steps.json.gz"):
        save_step_records(records, tmp_path / name)
        assert load_step_records(tmp_path / name) == records
    assert (tmp_path / "steps.json.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip's magic


def test_the_script_writes_json_and_plots(tmp_path):
    assert bench_main(["--trace", str(AZURE), "--limit", "30", "--policy", "fcfs", "sjf", "--rows", "chunked",
                     "--loads", "0.5", "1.1", "--iters", "2", "--max-num-seqs", "16", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "azure_code_slice_sim.json").read_text())
    assert out["rows"]["chunked"]["chunked_capacity"] >= out["rows"]["chunked"]["prefill_first_capacity"]
    assert (tmp_path / "azure_code_slice_sim_latency_vs_load.png").exists()
    assert (tmp_path / "azure_code_slice_sim_capacity.png").exists()
    assert "| target | value | met |" in (tmp_path / "azure_code_slice_sim.md").read_text()


def test_engine_real_runs_the_protocol_on_the_cpu_engine(tiny_llama_dir, tmp_path):
    """--engine real: the same protocol through RealRunner on a tiny CPU model (wall clock, so only the
    structure is asserted), with the simulator replaying its fcfs runs on the fitted cost model."""
    out = tmp_path / "real"
    assert bench_main(["--engine", "real", "--model", str(tiny_llama_dir), "--device", "cpu", "--load-format", "auto",
                       "--trace", str(SHAREGPT), "--limit", "8", "--length-scale", "0.02", "--max-model-len", "1024",
                       "--max-num-seqs", "4", "--policy", "fcfs", "--rows", "overlap", "--loads", "0.5",
                       "--iters", "1", "--no-plot", "--out", str(out)]) == 0
    data = json.loads((out / "sharegpt_lengths_slice_real.json").read_text())
    assert data["engine"] == "real" and data["per_load"]["0.5x"]["fcfs"]["e2e_mean"] > 0
    assert set(data["rows"]["overlap"]) == {"depth 1", "depth 2", "throughput_gain"}  # the row the sim cannot run
    assert data["sim_vs_real"]["0.5x"]["sim_over_real"] > 0 and "fitted_cost" in data["sim_vs_real"]
