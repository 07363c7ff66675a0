"""``conveyor router --launch N | XpYd``: start the workers as child processes, watch them, stop them.

Each child is ``python -m conveyor serve --port <free port> [--role prefill|decode] <engine args>``
in its own session (a terminal's Ctrl-C reaches the router alone, which stops the children in
order) with PR_SET_PDEATHSIG on Linux, so a router killed by SIGKILL still takes its children with
it. A child that exits on its own is logged and its worker reported unhealthy for good; stopping
sends SIGTERM (the workers drain), then SIGKILL after ``stop_timeout``. No orphans.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import structlog

from conveyor.runtime.router.workers import Role

log = structlog.get_logger("conveyor.router")

_PD = re.compile(r"^(?P<p>\d+)p(?P<d>\d+)d$")


class ChildSpec(NamedTuple):
    role: Role
    port: int
    argv: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def parse_launch(spec: str) -> list[Role]:
    """``"2"`` -> two ``both`` replicas; ``"1p1d"`` -> one prefill and one decode worker."""
    spec = spec.strip().lower()
    if spec.isdigit() and int(spec) >= 1:
        return ["both"] * int(spec)
    if (m := _PD.match(spec)) and int(m["p"]) >= 1 and int(m["d"]) >= 1:
        return ["prefill"] * int(m["p"]) + ["decode"] * int(m["d"])
    raise ValueError(f"--launch wants N (replicas) or XpYd (e.g. 1p1d), got {spec!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_children(roles: Sequence[Role], engine_args: Sequence[str]) -> list[ChildSpec]:
    specs = []
    for role in roles:
        port = free_port()
        # --role only where it is not the default: a `both` worker runs on any serve, with or without roles.
        role_args = ["--role", role] if role != "both" else []
        argv = [sys.executable, "-m", "conveyor", "serve", "--host", "127.0.0.1", "--port", str(port), *role_args,
                *engine_args]
        specs.append(ChildSpec(role, port, argv))
    return specs


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the router dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Launcher:
    def __init__(self, specs: Sequence[ChildSpec], stop_timeout: float,
                 on_exit: Callable[[ChildSpec, int], None] = lambda spec, rc: None) -> None:
        self.specs = list(specs)
        self.stop_timeout = stop_timeout
        self.on_exit = on_exit
        self.procs: dict[int, asyncio.subprocess.Process] = {}  # port -> process
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        for spec in self.specs:
            proc = await asyncio.create_subprocess_exec(*spec.argv, start_new_session=True, preexec_fn=preexec,
                                                        stdin=asyncio.subprocess.DEVNULL,
                                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.procs[spec.port] = proc
            log.info("worker started", role=spec.role, url=spec.url, pid=proc.pid)
            self._watchers.append(asyncio.create_task(self._watch(spec, proc)))

    async def _watch(self, spec: ChildSpec, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if not self.stopping:
            log.error("worker process exited", role=spec.role, url=spec.url, pid=proc.pid, returncode=rc)
            self.on_exit(spec, rc)

    def exited(self) -> list[tuple[ChildSpec, int]]:
        return [(s, p.returncode) for s in self.specs if (p := self.procs.get(s.port)) and p.returncode is not None]

    async def stop(self) -> None:
        self.stopping = True
        alive = [p for p in self.procs.values() if p.returncode is None]
        for p in alive:
            _signal(p, signal.SIGTERM)
        if alive:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in alive],
                                            timeout=self.stop_timeout)
            for p in alive:
                if p.returncode is None:
                    log.warning("worker did not stop in time; killing it", pid=p.pid, timeout_s=self.stop_timeout)
                    _signal(p, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in alive))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        log.info("workers stopped", count=len(self.procs))


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:  # exited in between
        pass
