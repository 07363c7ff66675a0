"""``conveyor serve`` (or ``conveyor router``) as a child process, for tests and benchmarks: a free port on
127.0.0.1, a bounded wait for ``/health``, its log kept in a file (a full pipe would block the worker's
logging), stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import conveyor
from conveyor.runtime.router.launcher import free_port

__all__ = ["ServeProcess", "free_port", "start_all"]

# The checkout this module belongs to: `python -m conveyor` there imports this very tree, installed or not.
ROOT = Path(conveyor.__file__).resolve().parent.parent


class ServeProcess:
    def __init__(self, args: Sequence[str], log: Path | None = None, command: str = "serve") -> None:
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or Path(tempfile.mkstemp(prefix=f"conveyor-{command}-", suffix=".log")[1])
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "conveyor", command, "--port", str(self.port), *args], cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self, deadline: float) -> None:
        """Until ``/health`` answers 200; raises if the process exits or ``deadline`` (monotonic) passes."""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"conveyor {self.command} exited with code {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"conveyor {self.command} on {self.url} not healthy in time:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, kill: bool = False, timeout_s: float = 30.0) -> None:
        """SIGTERM (the server drains) and wait, SIGKILL past ``timeout_s``; ``kill``: SIGKILL at once."""
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)


def start_all(procs: Sequence[ServeProcess], timeout_s: float = 180.0) -> None:
    """Wait for every one to be healthy within one deadline; on failure stop them all and raise."""
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait_healthy(deadline)
    except BaseException:
        for p in procs:
            p.stop(kill=True)
        raise
