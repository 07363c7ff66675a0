"""The load generator: streaming requests against an OpenAI-compatible server, vLLM-style metrics.

``arrivals`` (when), ``workloads`` (what), ``client`` (one request), ``runner`` (all of them),
``report`` (summary, JSON, table), ``plots`` (PNGs), ``main`` (the command line).
"""

from conveyor.runtime.tools.loadgen.main import amain, main

__all__ = ["amain", "main"]
