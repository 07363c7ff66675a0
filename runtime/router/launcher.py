"""``conveyor router --launch N | XpYd``: start the workers as child processes, watch them, stop them.

Each child is ``python -m conveyor serve --port <free port> [--role prefill|decode] <engine args>``
in its own session (a terminal's Ctrl-C reaches the router alone, which stops the children in
order) with PR_SET_PDEATHSIG on Linux, so a router killed by SIGKILL still takes its children with
it. A child that exits on its own is logged and its worker reported unhealthy for good; stopping
sends SIGTERM (the workers drain), then SIGKILL after ``stop_timeout``. No orphans.

GPUs: with enough of them, each child gets its own (``tensor_parallel_size`` of them, consecutive)
through ``CUDA_VISIBLE_DEVICES``, as vLLM's and SGLang's one-node PD recipes do (UCX's cuda_ipc
reaches a peer GPU the variable hides); with fewer, the children share what they see.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import structlog

from conveyor.runtime.engine_args import add_engine_args
from conveyor.runtime.router.workers import Role

log = structlog.get_logger("conveyor.router")

_PD = re.compile(r"^(?P<p>\d+)p(?P<d>\d+)d$")


class ChildSpec(NamedTuple):
    role: Role
    port: int
    argv: list[str]
    gpus: str | None = None  # its CUDA_VISIBLE_DEVICES; None: inherit the router's

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


def visible_gpus() -> list[str]:
    """The GPUs children can be given: ``CUDA_VISIBLE_DEVICES``'s entries when it is set, else the
    indices nvidia-smi lists (none on a machine without it)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in (x.strip() for x in env.split(",")) if d]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def tensor_parallel_size(engine_args: Sequence[str]) -> int:
    """The workers' ranks per process, read from these flags by ``conveyor serve``'s own engine parser."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_engine_args(parser)
    try:
        known, _ = parser.parse_known_args(list(engine_args))
    except argparse.ArgumentError as e:
        raise ValueError(f"worker flags: {e}") from None
    return known.tensor_parallel_size


def assign_gpus(children: int, per_child: int, gpus: Sequence[str]) -> list[str | None]:
    """Each child's CUDA_VISIBLE_DEVICES: its own ``per_child`` GPUs when there are enough for all,
    else None for every child (they share what the router sees: one GPU serving 1p1d, say)."""
    if len(gpus) < children * per_child:
        return [None] * children
    return [",".join(gpus[i * per_child:(i + 1) * per_child]) for i in range(children)]


def plan_children(roles: Sequence[Role], engine_args: Sequence[str],
                  gpus: Sequence[str] = ()) -> list[ChildSpec]:
    """``gpus``: the GPU ids to split among the children (``visible_gpus()`` for all of them; empty: share)."""
    specs = []
    shares = assign_gpus(len(roles), tensor_parallel_size(engine_args), gpus)
    for role, share in zip(roles, shares):
        port = free_port()
        # --role only where it is not the default: a `both` worker runs on any serve, with or without roles.
        role_args = ["--role", role] if role != "both" else []
        argv = [sys.executable, "-m", "conveyor", "serve", "--host", "127.0.0.1", "--port", str(port), *role_args,
                *engine_args]
        specs.append(ChildSpec(role, port, argv, share))
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
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if spec.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = spec.gpus
            proc = await asyncio.create_subprocess_exec(*spec.argv, start_new_session=True, preexec_fn=preexec,
                                                        stdin=asyncio.subprocess.DEVNULL, env=env)
            self.procs[spec.port] = proc
            log.info("worker started", role=spec.role, url=spec.url, pid=proc.pid, gpus=spec.gpus or "shared")
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
