"""``conveyor simulate``: compare scheduling policies without a GPU (the overview and usage are
``runtime.tools.simulator.cli``'s docstring, which is also the command's ``--help``).

One job per module; imports point one way (workloads, cost_model <- executor <- engine <- report <- scenarios <- cli):

- ``workloads``: the simulated requests (``SimRequest``), their length distributions and Poisson streams.
- ``cost_model``: the step-time model ``a + b * tokens + c * kv_tokens_read (+ d if it prefills)``
  and its fit to step records.
- ``executor``: ``SimulatedExecutor``, the device stand-in: step times from the cost model on a ``SimClock``,
  EOS at each request's drawn length.
- ``engine``: ``simulate``, which replays a workload through the real ``EngineCore`` on that executor,
  and ``measure_capacity``.
- ``report``: percentiles, per-run summaries and the tables they print as.
- ``scenarios``: the issue's targets, each a workload, a set of policies and checks.
- ``traces``: public traces (Azure code 2023, ShareGPT lengths, Mooncake) as ``SimRequest`` lists, arrivals
  scaled to a rate, Mooncake's hash blocks as shared prompt ids.
- ``capacity``: capacity under a P99-TBT and queueing SLO (binary search) and the per-load report.
- ``trace_bench``: the trace protocol (issue #23) and its target rows; ``scripts/bench_traces.py`` runs it.
- ``cli``: the ``conveyor simulate`` command line.

The names below are re-exported so ``from conveyor.runtime.tools.simulator import ...`` works.
"""

from __future__ import annotations

from conveyor.runtime.tools.simulator.cli import build_parser, main
from conveyor.runtime.tools.simulator.cost_model import CostModel, fit_cost_model, load_step_records
from conveyor.runtime.tools.simulator.engine import (
    DEFAULT_CONFIG,
    RequestStat,
    SimClock,
    SimConfig,
    SimResult,
    measure_capacity,
    simulate,
)
from conveyor.runtime.tools.simulator.report import format_table, pct, summarize, wait_share
from conveyor.runtime.tools.simulator.scenarios import (
    SCENARIOS,
    Check,
    ScenarioContext,
    ScenarioReport,
    plot_counter_gap,
    scenario_adaptive,
    scenario_fair,
    scenario_priority,
    scenario_sjf,
    scenario_static,
)
from conveyor.runtime.tools.simulator.traces import Trace, TraceOptions, load_trace, to_requests
from conveyor.runtime.tools.simulator.workloads import (
    HEAVY_MU,
    HEAVY_SIGMA,
    MAX_NEW_TOKENS,
    NOISE_SIGMA,
    NUM_TASKS,
    TASK_SIGMA,
    TEMPLATE_TOKENS,
    WORKLOADS,
    SimRequest,
    Stream,
    heavy_tail_request,
    make_workload,
    merge_streams,
    mixed_request,
)

__all__ = [
    "DEFAULT_CONFIG",
    "HEAVY_MU",
    "HEAVY_SIGMA",
    "MAX_NEW_TOKENS",
    "NOISE_SIGMA",
    "NUM_TASKS",
    "SCENARIOS",
    "TASK_SIGMA",
    "TEMPLATE_TOKENS",
    "WORKLOADS",
    "Check",
    "CostModel",
    "RequestStat",
    "ScenarioContext",
    "ScenarioReport",
    "SimClock",
    "SimConfig",
    "SimRequest",
    "SimResult",
    "Stream",
    "Trace",
    "TraceOptions",
    "build_parser",
    "fit_cost_model",
    "format_table",
    "heavy_tail_request",
    "load_step_records",
    "load_trace",
    "main",
    "make_workload",
    "measure_capacity",
    "merge_streams",
    "mixed_request",
    "pct",
    "plot_counter_gap",
    "scenario_adaptive",
    "scenario_fair",
    "scenario_priority",
    "scenario_sjf",
    "scenario_static",
    "simulate",
    "summarize",
    "to_requests",
    "wait_share",
]
