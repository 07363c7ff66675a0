"""What the server does differently for ``--role prefill`` and ``--role decode``.

Decode: a generate request must name its room and prefill worker (``X-Conveyor-Room``,
``X-Conveyor-Prefill``, set by ``conveyor router``); its requests await their KV from that worker.
Prefill: no generate endpoints for clients; the side channel instead (wire types in
``runtime/disagg/wire.py``): ``POST /kv/ready`` accepts a room and runs it, ``POST /kv/abort``
stops one. Rooms are remembered (bounded) so a repeated one is a 409, never a second request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from contextlib import aclosing

import msgspec
import structlog
from aiohttp import web

from conveyor.runtime.disagg.decode import RemotePrefill
from conveyor.runtime.disagg.prefill import IncompatiblePeer, check_compat, push_request, ready_params
from conveyor.runtime.disagg.wire import KVAbort, KVReady, RoomAccepted
from conveyor.runtime.engine.client import EngineClient
from conveyor.runtime.server.errors import ApiError, bad_request, from_invalid_request, from_validation_error
from conveyor.scheduler import InvalidRequestError, Request

log = structlog.get_logger("conveyor.server")

ROOM_HEADER = "X-Conveyor-Room"
PREFILL_HEADER = "X-Conveyor-Prefill"
REMEMBERED_ROOMS = 100_000  # a room id seen this recently is a duplicate
_ROOM = re.compile(r"[0-9A-Za-z_.:-]{1,128}")


class Rooms:
    """Room ids this worker has taken (bounded, oldest forgotten first) and the ones still live."""

    def __init__(self) -> None:
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.live: dict[str, asyncio.Task[None] | None] = {}
        self.peers: set[str] = set()  # P: decode agents whose metadata the engine has (as far as we know)

    def take(self, room: str) -> None:
        if room in self.seen or room in self.live:
            raise ApiError(409, f"room {room!r} is already in use", param="room", code="duplicate_room")
        self.seen[room] = None
        while len(self.seen) > REMEMBERED_ROOMS:
            self.seen.popitem(last=False)


# -- decode -----------------------------------------------------------------------------------
def bind_rooms(request: web.Request, requests: list[Request], rooms: Rooms) -> list[str]:
    """Give a decode worker's requests their room and prefill worker from the router's headers."""
    room = request.headers.get(ROOM_HEADER)
    prefill = request.headers.get(PREFILL_HEADER)
    for name, value in ((ROOM_HEADER, room), (PREFILL_HEADER, prefill)):
        if not value:
            raise ApiError(400, f"a --role decode worker needs the {name} header (send requests through "
                           "conveyor router)", param=name, code="missing_header")
    assert room is not None and prefill is not None
    if not _ROOM.fullmatch(room):
        raise ApiError(400, f"{ROOM_HEADER}: not a room id: {room[:64]!r}", param=ROOM_HEADER)
    if not prefill.startswith(("http://", "https://")):
        raise ApiError(400, f"{PREFILL_HEADER}: not an http(s) URL: {prefill[:64]!r}", param=PREFILL_HEADER)
    names = [room if i == 0 else f"{room}.{i}" for i in range(len(requests))]  # n > 1: one room per choice
    for name in names:
        if name in rooms.live:
            raise ApiError(409, f"room {name!r} is already in use", param=ROOM_HEADER, code="duplicate_room")
    if any(req.params.prompt_logprobs is not None for req in requests):  # refused before any room is bound
        raise bad_request("prompt_logprobs", "prompt_logprobs and echo are not served disaggregated: "
                          "the prefill worker computes the prompt")
    for name, req in zip(names, requests):
        req.remote_prefill = RemotePrefill(name, prefill.rstrip("/"))
        rooms.live[name] = None
    return names


def unbind_rooms(rooms: Rooms, names: list[str]) -> None:
    for name in names:
        rooms.live.pop(name, None)


# -- prefill ----------------------------------------------------------------------------------
def add_prefill_routes(app: web.Application) -> None:
    app.router.add_post("/kv/ready", _kv_ready)
    app.router.add_post("/kv/abort", _kv_abort)


def _state(request: web.Request):
    from conveyor.runtime.server.app import STATE

    return request.app[STATE]


async def _decode(request: web.Request, kind: type) -> object:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.ValidationError as e:
        raise from_validation_error(e) from None
    except msgspec.DecodeError as e:
        raise bad_request(None, f"The body is not valid JSON: {e}") from None


def _prefill_only(state) -> None:
    if state.engine.config.role != "prefill":
        raise ApiError(404, f"/kv/* is the side channel of --role prefill workers; this one runs "
                       f"--role {state.engine.config.role}", code="wrong_role")


async def _kv_ready(request: web.Request) -> web.Response:
    state = _state(request)
    _prefill_only(state)
    engine: EngineClient = state.engine
    rooms: Rooms = state.rooms
    ready: KVReady = await _decode(request, KVReady)  # type: ignore[assignment]
    if state.draining or not engine.is_alive:
        raise ApiError(503, "The prefill worker is not taking rooms.", code="shutting_down",
                       headers={"Retry-After": str(state.settings.retry_after_s)})
    if not _ROOM.fullmatch(ready.room):
        raise bad_request("room", f"room: not a room id: {ready.room[:64]!r}")
    if ready.peer is None and ready.agent not in rooms.peers:
        raise ApiError(428, f"agent {ready.agent!r} is unknown here: send its transport metadata in peer",
                       param="peer", code="peer_unknown")
    if ready.peer is not None:
        region = engine.kv_region
        assert region is not None
        try:
            check_compat(region, ready.peer)
        except IncompatiblePeer as e:
            log.error("incompatible decode worker", agent=ready.agent, error=str(e))
            raise bad_request(str(e).split(":")[0], str(e)) from None
    if not ready.lease_s > 0:
        raise bad_request("lease_s", f"lease_s must be > 0, got {ready.lease_s}")
    if engine.num_waiting() >= state.settings.max_waiting_requests:
        raise ApiError(429, "Too many rooms waiting; retry later.", code="queue_full",
                       headers={"Retry-After": str(state.settings.retry_after_s)})
    try:
        params = ready_params(ready)
        req = engine.make_request(ready.token_ids, params, request_id=ready.room)
    except msgspec.ValidationError as e:
        raise bad_request("params", f"params: {e}") from None
    except InvalidRequestError as e:
        if e.field == "request_id":
            raise ApiError(409, f"room {ready.room!r} is already in use", param="room", code="duplicate_room") from None
        raise from_invalid_request(e) from None
    pages_needed = -(-len(ready.token_ids) // engine.config.block_size) - ready.first_page
    if ready.first_page < 0 or len(ready.pages) != pages_needed:
        raise bad_request("pages", f"pages: {len(ready.pages)} page ids for {pages_needed} prompt pages "
                          f"from first_page {ready.first_page}")
    rooms.take(ready.room)
    push_request(req, ready, time.monotonic())
    if ready.peer is not None:
        rooms.peers.add(ready.agent)
    rooms.live[ready.room] = asyncio.create_task(_run_room(engine, req, rooms, ready.agent))
    return _json(RoomAccepted(room=ready.room))


async def _run_room(engine: EngineClient, req: Request, rooms: Rooms, agent: str) -> None:
    """Drain a room's one output (the engine pushes its KV meanwhile); the output goes nowhere.

    A room that ended in an error may have failed on its decode agent (metadata the engine could not
    take): the agent is forgotten here too, so its next room is answered 428 and brings the metadata
    again, instead of failing in the engine where D would only hear of it from its lease."""
    try:
        async with aclosing(engine.submit(req)) as outs:
            async for out in outs:
                if out.finish_reason == "error":
                    rooms.peers.discard(agent)
    except Exception as e:  # the engine died: its rooms' decode workers see the liveness check fail
        log.warning("room ended with an engine error", room=req.request_id, error=repr(e))
    finally:
        rooms.live.pop(req.request_id, None)


async def _kv_abort(request: web.Request) -> web.Response:
    state = _state(request)
    _prefill_only(state)
    body: KVAbort = await _decode(request, KVAbort)  # type: ignore[assignment]
    rooms: Rooms = state.rooms
    if body.room not in rooms.seen:
        raise ApiError(404, f"room {body.room!r} is unknown here", param="room", code="unknown_room")
    await state.engine.abort(body.room)  # a no-op once it is sending: it ends with its done notice
    return _json(RoomAccepted(room=body.room))


def _json(body: msgspec.Struct) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def refuse_generate(role: str) -> ApiError:
    return ApiError(400, f"this worker runs --role {role}: it computes prompts for decode workers and serves "
                    "no generate requests; send them to conveyor router (or a decode worker)", code="wrong_role")
