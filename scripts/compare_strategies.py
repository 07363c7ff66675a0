#!/usr/bin/env python3
"""FIFO vs static vs continuous batching, overlap off and on; the same as ``conveyor compare`` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.logging import configure_logging  # noqa: E402
from conveyor.runtime.tools.compare import main  # noqa: E402

configure_logging("warning")  # as `conveyor compare` does: the engines' info lines would bury the table
sys.exit(main())
