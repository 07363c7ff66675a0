"""The side channel's wire types: D -> P over HTTP (JSON), P -> D as NIXL notifications (msgpack).

D -> P ``POST /kv/ready`` (``KVReady``): 200 ``{"room": ...}`` accepted; 400 a bad or incompatible
request (the body says which field); 409 the room is already in use; 428 ``peer_unknown``: P does
not know D's agent (it restarted): resend with ``peer``. D -> P ``POST /kv/abort`` (``KVAbort``):
200 (P will end the room with an ``abort`` notice once nothing of it is in flight), 404 unknown room.

P -> D: exactly one ``RoomNotice`` per accepted room, and nothing for it after: ``done`` rides on
the room's last WRITE (so it arrives after every page landed) with the first token; ``abort`` says
P stopped (error, lease, D's abort) and will write no more.
"""

from __future__ import annotations

import msgspec


class PeerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """D's transport metadata and pool geometry, sent until P has accepted one of D's rooms."""

    metadata: bytes  # the transport's own (NIXL agent metadata)
    addr: int
    layer_stride: int
    page_stride: int
    device_id: int
    mem: str
    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    layout: str


class KVReady(msgspec.Struct, frozen=True, kw_only=True):
    room: str
    agent: str  # D's transport agent name
    token_ids: list[int]
    params: dict  # msgspec.to_builtins(SamplingParams): what the first token is sampled with
    first_page: int  # index in the prompt's page list of D's first uncached page
    pages: list[int]  # D's page ids for prompt pages first_page, first_page + 1, ...
    lease_s: float  # P posts nothing for this room after lease_s from receipt
    peer: PeerInfo | None = None


class KVAbort(msgspec.Struct, frozen=True, kw_only=True):
    room: str


class RoomAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """P's 200 to /kv/ready and /kv/abort."""

    room: str


class RoomNotice(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    room: str
    kind: str  # "done" | "abort"
    token: int = -1
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    error: str | None = None
    # P's own durations (no shared clock needed): arrival -> admission, admission -> first token.
    queue_s: float | None = None
    compute_s: float | None = None


def encode_notice(notice: RoomNotice) -> bytes:
    return msgspec.msgpack.encode(notice)


def decode_notice(raw: bytes) -> RoomNotice:
    return msgspec.msgpack.decode(raw, type=RoomNotice)
