"""The embedded async API: ``async for out in engine.generate(...)``.

The engine core runs in its own thread, so the event loop only validates, tokenizes and routes
outputs, and a long forward never blocks the loop. Commands go in through a thread-safe queue;
outputs come back in one loop callback per step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, AsyncIterator

import structlog

from conveyor.runtime.build import build_engine
from conveyor.runtime.engine.client import EngineDeadError
from conveyor.runtime.engine.config import EngineConfig
from conveyor.runtime.engine.core import STALL_POLL_S, EngineFatalError
from conveyor.runtime.engine.executor import KVRegion
from conveyor.runtime.engine.input_processor import Prompt
from conveyor.runtime.engine.outputs import RequestOutput
from conveyor.runtime.engine.step_stats import EngineStats
from conveyor.scheduler import InvalidRequestError, Request, SamplingParams

log = structlog.get_logger("conveyor.engine")

_STOP = object()


class AsyncEngine:
    """The embedded engine; implements ``EngineClient``."""

    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        """Loads the model (blocking); inside a running loop prefer ``await AsyncEngine.create(...)``."""
        self.config = config or EngineConfig(**overrides)
        self.core = build_engine(self.config)
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []  # touched by the engine thread only
        self._busy_since = 0.0  # when the first of the streams now open was submitted

    @classmethod
    async def create(cls, config: EngineConfig | None = None, **overrides: Any) -> "AsyncEngine":
        engine = await asyncio.to_thread(cls, config, **overrides)
        engine.start()
        return engine

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def kv_region(self) -> KVRegion | None:
        return self.core.executor.kv_region

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def tokenizer(self) -> Any | None:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.inputs.vocab_size

    def token_ids(self, prompt: Prompt | None = None, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """The ids a request with this prompt or these messages would prefill (validated)."""
        return self.core.inputs.token_ids(prompt, messages)

    def add_step_observer(self, observe: Callable[[int], None]) -> None:
        """``observe(num_tokens)`` after every processed batch, on the engine thread."""
        self.core.step_observers.append(observe)

    def remove_step_observer(self, observe: Callable[[int], None]) -> None:
        if observe in self.core.step_observers:
            self.core.step_observers.remove(observe)

    @property
    def num_step_failures(self) -> int:
        return self.core.num_step_failures

    def stalled_for(self) -> float:
        """Seconds the engine has made no progress (no batch launched or processed, no command
        taken) while it holds requests or commands wait for it; 0 when it is idle or moving."""
        if not self.core.scheduler.requests and self._commands.empty():
            return 0.0  # (a caller slow to read its last output is not the engine's stall)
        return max(0.0, time.monotonic() - max(self.core.last_progress, self._busy_since))

    def num_waiting(self) -> int:
        """Requests the scheduler has not admitted yet: the backpressure check, once per HTTP request."""
        return self.core.scheduler.num_waiting

    def stats(self) -> EngineStats:
        """A snapshot for metrics and backpressure (read without locking: counters may be one step old)."""
        return self.core.stats()

    async def shutdown(self) -> None:
        """Abort what is still running, stop the engine thread and wait for it."""
        if self._thread is None:
            return
        for rid in list(self._streams):
            self._commands.put(("abort", rid))
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def __aenter__(self) -> "AsyncEngine":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- requests -------------------------------------------------------------------------
    def make_request(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        tenant: str | None = None,
        chat_options: dict[str, Any] | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> Request:
        """Validate and tokenize; raises InvalidRequestError naming the field at fault.

        ``truncate_prompt_tokens``: keep only the prompt's last k tokens (-1: the last max_model_len - 1).
        """
        if request_id is not None and request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        ids = self.core.inputs.token_ids(prompt, messages, chat_options)
        if truncate_prompt_tokens is not None:
            if truncate_prompt_tokens == -1:
                truncate_prompt_tokens = self.core.max_model_len - 1
            if truncate_prompt_tokens < 1:
                raise InvalidRequestError("truncate_prompt_tokens", f"must be -1 or >= 1, got {truncate_prompt_tokens}")
            ids = ids[-truncate_prompt_tokens:]
        return self.core.inputs.make_request(ids, params or SamplingParams(), request_id, priority, tenant)

    async def generate(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        tenant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (text and token deltas); the last one has ``finished=True``.

        Leaving the loop early (break, cancellation, a disconnected client) aborts the request.
        """
        req = self.make_request(prompt, params, messages=messages, request_id=request_id,
                                priority=priority, tenant=tenant)
        async for out in self.submit(req):
            yield out

    async def submit(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Stream an already validated request (see ``make_request``)."""
        if self._thread is None:
            self.start()
        elif not self._thread.is_alive():
            raise EngineDeadError("the engine thread is not running")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        if not self._streams:  # an idle engine waiting for this command has not stalled
            self._busy_since = time.monotonic()
        self._streams[req.request_id] = stream
        self._commands.put(("add", req))
        finished = False
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self._commands.put(("abort", req.request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def wait_idle(self) -> None:
        """Return once every command sent before this call is applied and no request is running or
        in flight (so every finished request's pages are back in the pool)."""
        if not self.is_alive:
            return
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        self._commands.put(("idle", done))
        await done

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_commands()
        except Exception as e:  # a bug in the engine itself: no stream may wait forever
            log.exception("engine thread died")
            dead = EngineDeadError(f"the engine stopped: {e!r}")
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_streams, dead)

    def _fail_streams(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    def _serve_commands(self) -> None:
        core = self.core
        while True:
            if not core.has_work():
                self._release_idle_waiters()
            # A stalled step (the policy holds requests back, e.g. a static batch filling up) waits
            # briefly for a command instead of spinning the engine thread.
            if not self._drain(block=not core.has_work(), timeout=STALL_POLL_S if core.stalled else None):
                return
            if not core.has_work():
                continue
            try:
                outputs = core.step()
            except EngineFatalError:
                raise
            except Exception as e:  # a bug outside the launch path: the core fails what it must, keeps serving
                outputs = core.recover(e)
            if outputs:
                self._emit(outputs)

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands; False once asked to stop."""
        outputs: list[RequestOutput] = []
        try:
            if block or timeout is not None:
                cmd = self._commands.get(timeout=None if block else timeout)
            else:
                cmd = self._commands.get_nowait()
            while True:
                self.core.last_progress = time.monotonic()  # taking commands is progress too
                if cmd is _STOP:
                    for rid in list(self.core.scheduler.requests):
                        if (out := self.core.abort_request(rid)) is not None:
                            outputs.append(out)
                    self._emit(outputs)
                    self.core.close()
                    return False
                op, arg = cmd
                if op == "add":
                    if (out := self.core.add_request(arg)) is not None:
                        outputs.append(out)
                elif op == "idle":
                    self._idle_waiters.append(arg)
                elif (out := self.core.abort_request(arg)) is not None:
                    outputs.append(out)
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass
        if outputs:
            self._emit(outputs)
        return True

    def _release_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))

    def _emit(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except RuntimeError:  # the loop closed under us during shutdown; nobody is listening
            pass

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
