"""D's HTTP side channel to its prefill workers: /kv/ready, /kv/abort and a liveness check, on a
thread of its own (aiohttp in a private event loop), so the engine thread never waits on a socket.

A POST that P answered is a clear result (accepted, refused); one that could not connect is a
refusal too (P cannot have it); one that timed out or broke mid-way is "unsure" (P may have it,
so D quarantines until the lease says otherwise). Each attempt sends the lease that is left, so P's
deadline never outlasts D's. A watched P whose port refuses connections twice in a row is dead (a
gone process writes nothing); one whose /health times out twice is unreachable: its rooms fail,
but their pages stay quarantined until the lease, since a stalled P may still write.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import aiohttp
import msgspec
import structlog

from conveyor.runtime.disagg.decode import ChannelEvent
from conveyor.runtime.disagg.wire import KVAbort, KVReady, PeerInfo

log = structlog.get_logger("conveyor.disagg")

LIVENESS_INTERVAL_S = 0.25
LIVENESS_FAILURES = 2  # consecutive failed checks before P counts as dead (refused) or unreachable


class HttpPrefillChannel:
    def __init__(self, post_timeout_s: float = 5.0) -> None:
        self.post_timeout_s = post_timeout_s
        self.peer: PeerInfo | None = None  # this worker's, resent when a P answers 428 peer_unknown
        self._events: deque[ChannelEvent] = deque()
        self._watched: set[str] = set()
        # Rooms whose /kv/ready is on the way: their /kv/abort waits for it, or it could overtake it,
        # get a 404, and free pages P is about to be told to write into.
        self._posting: dict[str, asyncio.Event] = {}
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=self._run, name="conveyor-pd-channel", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the prefill side channel's thread did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._session = aiohttp.ClientSession(loop=self._loop)
        self._loop.create_task(self._liveness())
        self._ready.set()
        self._loop.run_forever()

    # -- the engine thread's side ------------------------------------------------------------
    def post_ready(self, url: str, ready: KVReady) -> None:
        lease_ends = time.monotonic() + ready.lease_s
        self._spawn(self._ready_post_once(url, ready, lease_ends), ready.room, url)

    def post_abort(self, url: str, room: str) -> None:
        self._spawn(self._abort_post(url, room), room, url)

    def _spawn(self, coro: Coroutine[Any, Any, None], room: str, url: str) -> None:
        """Run on the channel's loop; a bug in it must not leave the room waiting out its lease unheard."""
        def done(f: "asyncio.Future[None]") -> None:
            if not f.cancelled() and (e := f.exception()) is not None:
                log.error("side channel task failed", room=room, url=url, error=repr(e))
                self._events.append(ChannelEvent("unsure", room, url, f"side channel: {e!r}"))

        asyncio.run_coroutine_threadsafe(coro, self._loop).add_done_callback(done)

    def watch(self, urls: set[str]) -> None:
        self._watched = set(urls)

    def events(self) -> list[ChannelEvent]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def close(self) -> None:
        async def stop() -> None:
            if self._session is not None:
                await self._session.close()
            self._loop.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop)
            self._thread.join(5)

    # -- the channel thread ------------------------------------------------------------------
    async def _post(self, url: str, path: str, body: bytes) -> tuple[int, bytes]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.post_timeout_s)
        async with self._session.post(url.rstrip("/") + path, data=body, timeout=timeout,
                                      headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.read()

    async def _ready_post_once(self, url: str, ready: KVReady, lease_ends: float) -> None:
        done = self._posting[ready.room] = asyncio.Event()
        try:
            await self._ready_post(url, ready, lease_ends)
        finally:
            done.set()
            self._posting.pop(ready.room, None)

    async def _ready_post(self, url: str, ready: KVReady, lease_ends: float) -> None:
        async def attempt(ready: KVReady) -> tuple[int, bytes] | None:
            left = lease_ends - time.monotonic()  # what P gets: never past D's own deadline
            if left <= 0:
                return None
            return await self._post(url, "/kv/ready", msgspec.json.encode(msgspec.structs.replace(ready, lease_s=left)))

        try:
            answer = await attempt(ready)
            if answer is not None and answer[0] == 428 and ready.peer is None and self.peer is not None:
                answer = await attempt(msgspec.structs.replace(ready, peer=self.peer))  # P restarted: lost our metadata
        except aiohttp.ClientConnectorError as e:  # never connected: P cannot have it
            self._events.append(ChannelEvent("refused", ready.room, url, f"cannot reach the prefill worker "
                                             f"{url}: {e}"))
            return
        except (TimeoutError, aiohttp.ClientError) as e:
            self._events.append(ChannelEvent("unsure", ready.room, url, f"/kv/ready to {url}: {e!r}"))
            return
        if answer is None:  # the lease ran out before it could be sent: P never had it
            self._events.append(ChannelEvent("refused", ready.room, url, "the lease ran out before /kv/ready was sent"))
            return
        status, body = answer
        if status == 200:
            self._events.append(ChannelEvent("accepted", ready.room, url))
        elif 400 <= status < 500:
            self._events.append(ChannelEvent("refused", ready.room, url, _message(status, body)))
        else:
            self._events.append(ChannelEvent("unsure", ready.room, url, _message(status, body)))

    async def _abort_post(self, url: str, room: str) -> None:
        if (posting := self._posting.get(room)) is not None:
            await posting.wait()
        try:
            status, _ = await self._post(url, "/kv/abort", msgspec.json.encode(KVAbort(room=room)))
        except (TimeoutError, aiohttp.ClientError) as e:
            log.info("/kv/abort not delivered", url=url, room=room, error=repr(e))
            return  # the liveness check or the lease settles it
        if status == 404:
            self._events.append(ChannelEvent("abort_unknown", room, url))

    async def _liveness(self) -> None:
        assert self._session is not None
        failures: dict[str, tuple[str, int]] = {}  # url -> (last verdict, how many in a row)
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            for url in list(self._watched):
                verdict = "alive"
                try:
                    async with self._session.get(url.rstrip("/") + "/health",
                                                 timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                        if not (resp.status < 500 or resp.status == 503):
                            verdict = "peer_unreachable"
                except aiohttp.ClientConnectorError:  # its port refuses: the process is gone
                    verdict = "peer_dead"
                except (TimeoutError, aiohttp.ClientError):
                    verdict = "peer_unreachable"
                last, n = failures.get(url, ("alive", 0))
                failures[url] = (verdict, n + 1 if verdict == last else 1)
                if verdict != "alive" and failures[url][1] == LIVENESS_FAILURES:
                    log.warning("prefill worker dead: freeing its rooms" if verdict == "peer_dead" else
                                "prefill worker unreachable: failing its rooms, pages quarantined", url=url)
                    self._events.append(ChannelEvent(verdict, "", url))


def _message(status: int, body: bytes) -> str:
    try:
        err = msgspec.json.decode(body).get("error", {})
        text = err.get("message") if isinstance(err, dict) else None
    except (msgspec.DecodeError, AttributeError):
        text = None
    return f"the prefill worker answered {status}: {text or body[:200].decode(errors='replace')}"
