"""Startup and the command line, in subprocesses: structured logs from every logger, and flags
parsed (``--help``, bad flags) without importing torch, so they answer at once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_logging_routes_stdlib_and_warnings_through_structlog() -> None:
    code = ("import logging, warnings; from runtime.logging import configure_logging; configure_logging('info');"
            "logging.getLogger('aiohttp.server').error('boom %s', 1); logging.getLogger('x').debug('hidden');"
            "warnings.warn('careful'); import structlog; structlog.get_logger().debug('hidden too')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    records = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]
    assert [(r["event"], r["level"]) for r in records][0] == ("boom 1", "error")
    assert records[0]["logger"] == "aiohttp.server"
    assert len(records) == 2 and "careful" in records[1]["event"]


@pytest.mark.parametrize("argv,status", [(["--help"], 0), (["serve", "--help"], 0), (["generate", "--help"], 0),
                                         (["serve", "--bogus"], 2), (["serve", "--port", "x"], 2)])
def test_cli_parses_flags_without_torch(argv: list[str], status: int) -> None:
    code = ("import atexit, sys; atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'));"
            f"from runtime.cli import main; main({argv!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == status, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout[-200:]
