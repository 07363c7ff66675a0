#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers; the same as ``conveyor loadgen`` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.runtime.tools.loadgen import main  # noqa: E402

sys.exit(main())
