"""A free list of small integers: KV pages and token-pool slots are both handed out this way."""

from __future__ import annotations


class OutOfIndices(RuntimeError):
    pass


class IndexAllocator:
    """Hands out indices in ``[first, first + count)``; lowest index first, so runs stay reproducible."""

    def __init__(self, count: int, first: int = 0) -> None:
        if count < 0:
            raise ValueError("count must be >= 0")
        self.first = first
        self.total = count
        # A stack popped from the end: reversed so index `first` comes out first.
        self._free = list(range(first + count - 1, first - 1, -1))
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return len(self._in_use)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfIndices(f"asked for {n}, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(n)]
        self._in_use.update(taken)
        return taken

    def free(self, indices: list[int]) -> None:
        for i in indices:
            if i not in self._in_use:
                raise ValueError(f"double free of index {i}")
            self._in_use.remove(i)
            self._free.append(i)

    def check(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("an index sits twice in the free list")
        if free & self._in_use:
            raise AssertionError("an index is both free and in use")
        if len(free) + len(self._in_use) != self.total:
            raise AssertionError(f"free {len(free)} + in use {len(self._in_use)} != total {self.total}")
