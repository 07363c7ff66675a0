"""Pinned staging: which spans of the staging buffer a batch copies, and in how many copies."""

from __future__ import annotations

import pytest
import torch

from conveyor.memory.device import PinnedStaging
from conveyor.memory.device.pinned_staging import MERGE_GAP, merge_spans
from conveyor.runtime.worker.model_runner import staging_regions


def test_merge_spans_joins_only_close_spans_and_keeps_overlaps_whole():
    assert merge_spans([(10, 20), (0, 5), (5000, 5001)], gap=100) == [(0, 20), (5000, 5001)]
    assert merge_spans([(0, 10), (4, 30), (130, 131)], gap=100) == [(0, 30), (130, 131)]
    assert merge_spans([(0, 10), (109, 120)], gap=100) == [(0, 120)]
    assert merge_spans([], gap=100) == []


def _spans(staging: PinnedStaging, lengths: dict[str, int]) -> list[tuple[int, int]]:
    return merge_spans([(staging.offsets[k][0], staging.offsets[k][0] + n) for k, n in lengths.items()], MERGE_GAP)


@pytest.mark.parametrize("rows,max_seqs", [(1, 256), (16, 256), (256, 256), (64, 1024)])
def test_a_decode_graph_step_stages_in_one_copy(rows, max_seqs):
    """The regions a decode graph reads sit together: one H2D copy per decode step."""
    staging = PinnedStaging(staging_regions(8192, max_seqs, 513), 1, torch.device("cpu"))
    pages = rows * 40
    decode = {"kv_indptr": rows + 1, "kv_last_page_len": rows, "kv_indices": pages, "logits_indices": rows,
              "sample_slots": rows, "sample_positions": rows, "decode_token_slots": rows, "decode_positions": rows,
              "decode_batch_indices": rows}
    assert len(_spans(staging, decode)) == 1
    # A prefill step's per-token regions are sized for the whole token budget: they take their own copies.
    prefill = {**{k: v for k, v in decode.items() if not k.startswith("decode_")},
               "token_slots": 2048, "positions": 2048, "batch_indices": 2048}
    assert len(_spans(staging, prefill)) == 4


def test_staging_regions_fit_a_full_batch_and_stage_rejects_an_overflow():
    staging = PinnedStaging(staging_regions(64, 4, 8), 1, torch.device("cpu"))
    assert staging.offsets["kv_indices"][1] == 4 * 8 and staging.offsets["kv_indptr"][1] == 5
    out = staging.stage({"positions": torch.arange(64).numpy()})
    assert out["positions"].tolist() == list(range(64))
    with pytest.raises(ValueError, match="'positions' holds 64, batch needs 65"):
        staging.stage({"positions": torch.arange(65).numpy()})
