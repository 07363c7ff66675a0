#!/usr/bin/env python3
"""Compare scheduling policies with simulated time; the same as ``conveyor simulate`` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.logging import configure_logging  # noqa: E402
from conveyor.runtime.tools.simulator import main  # noqa: E402

configure_logging("warning")  # as `conveyor simulate` does: policy switch logs stay off the tables
sys.exit(main())
