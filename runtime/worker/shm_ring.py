"""A one-writer, many-reader ring of messages in shared memory (vLLM's ``MessageQueue`` pattern).

Rank 0 writes each step's batch once; every worker rank reads it. Slot ``k % num_slots`` carries
message chunk ``k`` (k = 1, 2, ...): the writer fills the payload, then publishes ``k`` in the
slot's sequence word; reader ``r`` copies the payload out and acknowledges ``k`` in its own word.
The writer reuses a slot only once every reader has acknowledged the chunk that was in it, so a
slow reader holds the writer back instead of losing messages. A message longer than a slot goes
in consecutive chunks. Waits poll with a short spin, then sleeps up to ``MAX_SLEEP_S``; each wait
calls ``alive()`` now and then and gives up when it says no, so a dead peer never hangs anyone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory

import numpy as np

HEADER = 64  # bytes before each slot's payload: int64 sequence, int64 length, int64 "more chunks follow"
SPIN = 200  # polls before the first sleep
MAX_SLEEP_S = 2e-4
ALIVE_EVERY_S = 0.05

_fence_lock = threading.Lock()
_created_here: set[str] = set()  # segments this process's writers own (and its resource tracker tracks)


def _fence() -> None:
    """A full memory barrier (a lock round trip), so payload bytes are visible before the sequence word
    on weakly ordered CPUs (aarch64 Grace hosts), as vLLM's shm_broadcast does."""
    _fence_lock.acquire()
    _fence_lock.release()


class PeerGone(RuntimeError):
    """The other side is gone (``alive()`` said so) while waiting on it."""


def poll_until(ready: Callable[[], bool], alive: Callable[[], bool], what: str, max_sleep_s: float = MAX_SLEEP_S) -> None:
    if ready():
        return
    for _ in range(SPIN):
        if ready():
            return
    sleep, checked = 1e-5, time.monotonic()
    while not ready():
        time.sleep(sleep)
        sleep = min(sleep * 2, max_sleep_s)
        now = time.monotonic()
        if now - checked > ALIVE_EVERY_S:
            checked = now
            if not alive():
                raise PeerGone(f"gave up waiting for {what}: the other side is gone")


class _Layout:
    def __init__(self, buf: memoryview, num_readers: int, num_slots: int, slot_bytes: int) -> None:
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self.acks = np.ndarray((num_readers,), dtype=np.int64, buffer=buf, offset=0)  # one 8-byte word each
        base = 8 * num_readers
        stride = HEADER + slot_bytes
        self.headers = [np.ndarray((3,), dtype=np.int64, buffer=buf, offset=base + i * stride)
                        for i in range(num_slots)]
        self.payloads = [buf[base + i * stride + HEADER: base + (i + 1) * stride] for i in range(num_slots)]

    @staticmethod
    def size(num_readers: int, num_slots: int, slot_bytes: int) -> int:
        return 8 * num_readers + num_slots * (HEADER + slot_bytes)


class RingWriter:
    def __init__(self, num_readers: int, num_slots: int = 8, slot_bytes: int = 1 << 20) -> None:
        self.num_readers, self.num_slots, self.slot_bytes = num_readers, num_slots, slot_bytes
        self._shm = shared_memory.SharedMemory(create=True, size=_Layout.size(num_readers, num_slots, slot_bytes))
        self._shm.buf[:] = b"\0" * self._shm.size
        self._layout = _Layout(self._shm.buf, num_readers, num_slots, slot_bytes)
        self._next = 1
        _created_here.add(self._shm.name)

    @property
    def name(self) -> str:
        return self._shm.name

    def write(self, data: bytes, alive: Callable[[], bool]) -> None:
        lay = self._layout
        view = memoryview(data)
        offset = 0
        while True:
            k = self._next
            slot = k % lay.num_slots
            poll_until(lambda k=k: int(lay.acks.min()) >= k - lay.num_slots, alive, "a reader to free a slot")
            chunk = view[offset: offset + lay.slot_bytes]
            offset += len(chunk)
            more = offset < len(view)
            lay.payloads[slot][: len(chunk)] = chunk
            header = lay.headers[slot]
            header[1], header[2] = len(chunk), int(more)
            _fence()
            header[0] = k
            self._next = k + 1
            if not more:
                return

    def close(self) -> None:
        self._layout = None  # type: ignore[assignment]  # drop the numpy views before the buffer
        self._shm.close()
        self._shm.unlink()
        _created_here.discard(self._shm.name)


class RingReader:
    def __init__(self, name: str, reader: int, num_readers: int, num_slots: int, slot_bytes: int) -> None:
        self._shm = shared_memory.SharedMemory(name=name)
        if name not in _created_here:  # the writer owns it: this process's tracker must not unlink it at exit
            resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
        self._layout = _Layout(self._shm.buf, num_readers, num_slots, slot_bytes)
        self.reader = reader
        self._next = 1

    def read(self, alive: Callable[[], bool]) -> bytes:
        lay = self._layout
        parts = []
        while True:
            k = self._next
            slot = k % lay.num_slots
            header = lay.headers[slot]
            poll_until(lambda h=header, k=k: int(h[0]) == k, alive, "the writer's next message")
            _fence()
            n, more = int(header[1]), bool(header[2])
            parts.append(bytes(lay.payloads[slot][:n]))
            _fence()
            lay.acks[self.reader] = k
            self._next = k + 1
            if not more:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._layout = None  # type: ignore[assignment]
        self._shm.close()
