"""The token pool: every request's token ids, on the model's device, indexed by (slot, position).

Ownership: the scheduler owns slots (it allocates one when a request is admitted and frees it
when nothing in flight still reads it). Prompt ids are written from the host at admission;
sampled ids are written on the device by the batch that sampled them, and the next batch gathers
its input ids from here on the same stream. So batch N+1 never needs the *values* of batch N's
tokens on the host, only their count.
"""

from __future__ import annotations

import torch

POISON = -1


class TokenPool:
    def __init__(self, num_slots: int, max_len: int, device: torch.device | str, poison: bool = False) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self.poison = poison
        # One spare column so a request at max_len can still be written its final sampled id, and
        # one spare row, the padding slot: padded batch rows (CUDA graphs) read and write only there.
        fill = POISON if poison else 0
        self.ids = torch.full((num_slots + 1, max_len + 1), fill, dtype=torch.int32, device=device)
        self.padding_slot = num_slots
        self.ids[self.padding_slot].zero_()

    def write(self, slot: int, start: int, token_ids: list[int]) -> None:
        """Host -> pool, for prompts and for recompute after preemption."""
        if not token_ids:
            return
        src = torch.tensor(token_ids, dtype=torch.int32)
        self.ids[slot, start : start + len(token_ids)].copy_(src, non_blocking=True)

    def repoison(self, slots: tuple[int, ...]) -> None:
        """Poison mode: slots given back since the last batch read as unwritten again, so their next
        owner fails on the spot if it reads a position it did not write."""
        if self.poison:
            for slot in slots:  # fill_ per row: no index tensor to copy from pageable memory
                self.ids[slot].fill_(POISON)

    def gather(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.ids[slots, positions]
        if self.poison:
            # torch._assert_async checks on the device: no host sync on the launch path.
            torch._assert_async((out >= 0).all(), "token pool: read a position nothing wrote")
        return out

    def scatter(self, slots: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> None:
        self.ids[slots, positions] = token_ids.to(torch.int32)
