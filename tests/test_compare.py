"""``conveyor compare`` and ``bench_offline --compare-hf`` on the CPU with a tiny model.

The strategies run real engines, so only orderings and exact counts are asserted, never times:
continuous batching beats static batching on a mixed-length workload, FIFO never overlaps two
requests, padding waste is what a padded static batcher would waste, and every request gets
exactly the tokens it asked for.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import matplotlib.image
import msgspec
import pytest

from conveyor.runtime.engine.step_stats import StepRecord
from conveyor.runtime.tools.compare import CompareResult, StrategyResult, build_workload, run_compare
from tests.conftest import kv_bytes_for_pages

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "tiny-llama"  # the preset: tiny shapes, dummy weights
BATCH = 8
ENGINE = ["--model", MODEL, "--max-num-seqs", str(BATCH), "--kv-cache-memory", str(kv_bytes_for_pages(MODEL, 96)),
          "--warmup", "1", "--static-batch-timeout", "0.05", "--no-progress"]
LONG, SHORT = (16, 96), (8, 2)  # (prompt, output) tokens


def mixed_lengths(path: Path) -> Path:
    """Mixed lengths: every batch of 8 holds one long request among short ones (in file order).

    A static batch then runs 96 steps for one row while seven slots idle; continuous batching
    refills them, so the long requests run side by side.
    """
    rows = [LONG if i == b else SHORT for b in range(6) for i in range(BATCH)]
    path.write_text("prompt_tokens,output_tokens\n" + "".join(f"{p},{o}\n" for p, o in rows))
    return path


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return ENGINE + ["--lengths-file", str(mixed_lengths(tmp_path_factory.mktemp("lengths") / "mixed.csv"))]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, workload: list[str]) -> tuple[CompareResult, Path]:
    out = tmp_path_factory.mktemp("compare")
    res = run_compare(workload + ["--fifo-max-requests", "16", "--result-json", str(out / "compare.json"),
                                  "--plot", str(out / "compare.png")])
    return res, out


def by_name(res: CompareResult) -> dict[str, StrategyResult]:
    return {r.strategy: r for r in res.results}


def test_continuous_batching_beats_static_batching(compared, workload):
    res, _ = compared
    assert [x.strategy for x in res.results] == ["fifo", "static", "cb", "cb-overlap"]
    # Another load on the machine only ever slows a run down, so the best of two runs per strategy
    # estimates its own cost; the ordering must hold between those.
    again = run_compare(workload + ["--strategies", "static,cb,cb-overlap"])
    runs = [by_name(res), by_name(again)]
    throughput = {n: max(r[n].output_throughput for r in runs) for n in ("static", "cb", "cb-overlap")}
    p95 = {n: min(r[n].p95_e2el_ms for r in runs) for n in ("static", "cb", "cb-overlap")}
    for cb in ("cb", "cb-overlap"):
        assert throughput[cb] > throughput["static"], throughput
        assert p95[cb] < p95["static"], p95
    r = by_name(res)
    for cb in (r["cb"], r["cb-overlap"]):
        # The cause, counted rather than timed: the same tokens in far fewer, fuller steps.
        assert cb.steps * 3 < r["static"].steps
        assert cb.output_tokens == r["static"].output_tokens
    assert all(x.preemptions == 0 for x in res.results)  # the KV pool holds every batch: only scheduling differs
    # Every batching strategy shares the cap; static's batch size defaults to it.
    assert res.static_batch_size == res.max_num_seqs == BATCH
    assert r["static"].max_batch_seqs == r["cb"].max_batch_seqs == BATCH
    assert (r["cb"].pipeline_depth, r["cb-overlap"].pipeline_depth, r["static"].pipeline_depth) == (1, 2, 1)
    assert (r["static"].schedule_policy, r["cb"].schedule_policy, r["fifo"].schedule_policy) == ("static", "fcfs", "fifo")


def test_fifo_runs_one_request_at_a_time(compared):
    res, _ = compared
    fifo = by_name(res)["fifo"]
    assert fifo.num_requests == 16 and fifo.max_batch_seqs == 1  # --fifo-max-requests: the first 16
    assert [m.index for m in fifo.requests] == list(range(16))
    order = sorted(fifo.requests, key=lambda m: m.first_token_s)
    for prev, nxt in itertools.pairwise(order):
        assert nxt.first_token_s > prev.finish_s, f"request {nxt.index} started before {prev.index} finished"
    assert fifo.steps >= sum(m.output_tokens for m in fifo.requests)  # one token per step at most


def test_every_request_gets_exactly_its_tokens(compared):
    res, _ = compared
    assert (res.workload.num_prompts, res.workload.input_len, res.workload.output_len) == (48, (8, 16), (2, 96))
    for r in res.results:
        for m in r.requests:
            assert (m.prompt_tokens, m.output_tokens) == (LONG if m.index % (BATCH + 1) == 0 else SHORT)
            assert 0.0 == m.arrival_s < m.first_token_s <= m.finish_s  # offline: everything arrives at t=0
        assert r.output_tokens == sum(m.output_tokens for m in r.requests)
        assert r.num_requests == len(r.requests) and 0.0 < r.device_busy_fraction <= 1.0


def test_padding_waste_is_what_padded_static_batches_would_waste(compared):
    res, _ = compared
    r = by_name(res)
    assert r["fifo"].padding_waste == r["cb"].padding_waste == r["cb-overlap"].padding_waste == 0.0
    # Everything arrives at once, so static batches are requests 0-7, 8-15, ... in arrival order;
    # each pads prompts to the batch's longest and runs every row to the batch's longest output.
    reqs = sorted(r["static"].requests, key=lambda m: m.index)
    padded = useful = 0
    for lo in range(0, len(reqs), BATCH):
        batch = reqs[lo : lo + BATCH]
        useful += sum(m.prompt_tokens + m.output_tokens for m in batch)
        padded += len(batch) * (max(m.prompt_tokens for m in batch) + max(m.output_tokens for m in batch))
    assert r["static"].padding_waste == pytest.approx((padded - useful) / padded)
    assert r["static"].padding_waste > 0.2


def test_json_and_png_are_written(compared):
    res, out = compared
    assert msgspec.json.decode((out / "compare.json").read_bytes(), type=CompareResult) == res
    png = out / "compare.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = matplotlib.image.imread(png).shape
    assert width > height > 100 and channels in (3, 4)
    # --from-json runs nothing and renders the same table and plot
    again = run_compare(["--from-json", str(out / "compare.json"), "--plot", str(out / "again.png")])
    assert again == res and (out / "again.png").read_bytes()[:8] == PNG_MAGIC


def test_table_shows_every_metric_side_by_side(compared, capsys):
    from conveyor.runtime.tools.compare import format_table

    res, _ = compared
    table = format_table(res)
    for title in ("Output throughput (tok/s)", "Request throughput", "Mean E2E", "P95 E2E", "P95 TTFT",
                  "Padding waste", "Device busy", "Steps"):
        assert title in table
    assert "continuous vs static" in table and "fifo ran only the first 16 of 48 requests" in table


def test_poisson_arrivals_count_latency_from_arrival():
    from conveyor.runtime.tools.loadgen.arrivals import arrival_offsets

    res = run_compare(ENGINE + ["--strategies", "cb", "--num-prompts", "6", "--request-rate", "200",
                                "--input-len", "4:16", "--output-len", "2:6", "--warmup", "0"])
    [cb] = res.results
    items = build_workload(res.workload, vocab_size=512)
    assert [(m.prompt_tokens, m.output_tokens) for m in cb.requests] == \
        [(len(it.prompt_ids), it.output_len) for it in items]
    assert all(4 <= m.prompt_tokens <= 16 and 2 <= m.output_tokens <= 6 for m in cb.requests)
    assert res.workload.request_rate == 200.0
    # Arrival times are the Poisson offsets themselves, whenever the loop got to add them.
    assert [m.arrival_s for m in cb.requests] == pytest.approx(arrival_offsets(6, 200.0, seed=0), abs=1e-6)
    assert all(m.arrival_s < m.first_token_s <= m.finish_s for m in cb.requests)


def test_w1_workload_matches_bench_offline():
    from conveyor.runtime.tools.compare import WORKLOADS

    w1 = WORKLOADS["w1"]
    assert (w1.num_prompts, w1.input_len, w1.output_len, w1.seed, w1.request_rate) == (256, (100, 1024), (100, 1024),
                                                                                      0, None)
    spec = msgspec.structs.replace(w1, num_prompts=3)
    items = build_workload(spec, vocab_size=151936)
    # bench_offline draws n_in, n_out, then the prompt's ids, per request, from Random(seed)
    import random

    rng = random.Random(0)
    for item in items:
        n_in, n_out = rng.randint(100, 1024), rng.randint(100, 1024)
        assert item.prompt_ids == [rng.randrange(151936) for _ in range(n_in)] and item.output_len == n_out


def test_cli_forwards_and_rejects_unknown_strategies(capsys):
    from conveyor.runtime.cli import build_parser
    from conveyor.runtime.tools.compare import main

    args = build_parser().parse_args(["compare", "--strategies", "cb", "--help"])
    assert (args.command, args.args) == ("compare", ["--strategies", "cb", "--help"])
    with pytest.raises(SystemExit) as exc:
        main(args.args)
    assert exc.value.code == 0 and "--fifo-max-requests" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--strategies", "cb,continuous"])
    assert exc.value.code == 2 and "unknown strategies ['continuous']" in capsys.readouterr().err


# -- bench_offline: --compare-hf and --step-records -----------------------------------------
def load_bench_offline():
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_offline.py"
    spec = importlib.util.spec_from_file_location("bench_offline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_offline_compare_hf_and_step_records(tmp_path: Path, capsys):
    pytest.importorskip("transformers")
    bench = load_bench_offline()
    result_json, records_json = tmp_path / "bench.json", tmp_path / "steps.json"
    bench.main(["--model", MODEL, "--num-prompts", "10", "--input-len", "8:40", "--output-len", "2:24",
                "--depths", "1,2", "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--warmup", "1",
                "--quiet", "--compare-hf", "--step-records", str(records_json), "--result-json", str(result_json)])
    ours1, ours2, hf = json.loads(result_json.read_text())
    assert (ours1["pipeline_depth"], ours2["pipeline_depth"]) == (1, 2)
    assert hf["engine"].startswith("transformers ") and hf["num_prompts"] == 10
    # transformers ran the same requests to the same lengths (EOS ignored)
    assert hf["output_tokens"] == ours1["output_tokens"] == ours2["output_tokens"]
    for ours in (ours1, ours2):
        assert ours["vs_hf"] == pytest.approx(ours["output_tok_s"] / hf["output_tok_s"], rel=1e-3)
    out = capsys.readouterr().out
    assert "depth 1 / transformers:" in out and "depth 2 / transformers:" in out

    # Step records of the last depth: StepRecord's fields as keys, spans as [start, end]
    steps = json.loads(records_json.read_text())
    assert len(steps) == ours2["steps"]
    assert all(list(s) == list(StepRecord._fields) for s in steps)
    records = [StepRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}) for s in steps]
    assert all(len(r.device) == 2 and r.device[0] <= r.device[1] for r in records)
    # Every prompt token is prefilled once, and every output token but each request's last is fed back.
    assert sum(r.num_prefill_tokens for r in records) == ours2["input_tokens"]
    assert sum(r.num_tokens for r in records) == ours2["input_tokens"] + ours2["output_tokens"] - 10


def test_compare_script_wrapper_runs():
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "compare_strategies.py"
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0 and "cb-overlap" in res.stdout


def test_bench_offline_hf_static_fallback_counts_only_asked_tokens(tmp_path: Path):
    # The path for transformers releases without continuous batching: padded static generate().
    pytest.importorskip("transformers")
    bench = load_bench_offline()
    result_json = tmp_path / "bench.json"
    bench.main(["--model", MODEL, "--num-prompts", "5", "--input-len", "8:40", "--output-len", "2:12", "--depths", "2",
                "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--warmup", "1", "--quiet", "--compare-hf",
                "--hf-static", "--hf-batch-size", "2", "--result-json", str(result_json)])
    ours, hf = json.loads(result_json.read_text())
    assert hf["mode"] == "padded static batches of 2"
    assert hf["output_tokens"] == ours["output_tokens"]  # rows run past their length, but only asked tokens count
