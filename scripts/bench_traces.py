#!/usr/bin/env python3
"""Scheduling quality on public traces (issue #23); see --help (runtime/tools/simulator/trace_cli.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.logging import configure_logging  # noqa: E402
from conveyor.runtime.tools.simulator.trace_cli import main  # noqa: E402

configure_logging("warning")  # policy switch logs stay off the tables
sys.exit(main())
