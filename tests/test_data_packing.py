"""Property tests of the first-fit lane packer (pure Python, no tokenizer)."""

from __future__ import annotations

import collections

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax.data.packing import Lane, build_rows


def run_lane(lengths, lens_per_step, *, split, pack=True, buffer=3):
    stats = collections.Counter()
    lane = Lane(buffer=buffer, pack=pack, split=split, stats=stats)
    docs = iter(enumerate(lengths))

    def pull():
        try:
            j, n = next(docs)
        except StopIteration:
            return False
        lane.pending.append((j, 0, n))
        return True

    rows = []
    for seq_len in lens_per_step:
        row = lane.next_row(seq_len, pull)
        if row is None:
            break
        assert sum(b - a for _, a, b in row) <= seq_len
        rows.append((seq_len, row))
    while (row := lane.next_row(lens_per_step[-1], pull)) is not None:
        rows.append((lens_per_step[-1], row))
    return rows, stats


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=40),
       st.lists(st.sampled_from([8, 16, 32]), min_size=1, max_size=30), st.booleans(), st.booleans())
def test_lane_never_loses_or_duplicates_tokens(lengths, lens, split, pack):
    rows, stats = run_lane(lengths, lens, split=split, pack=pack)
    covered = collections.defaultdict(list)
    for _, row in rows:
        for j, a, b in row:
            covered[j].append((a, b))
    assert set(covered) == set(range(len(lengths)))  # every document appears
    for j, spans in covered.items():
        spans.sort()
        if split:  # the pieces tile the document exactly
            assert spans[0][0] == 0 and spans[-1][1] == lengths[j]
            assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
        else:  # one piece: the head
            assert len(spans) == 1 and spans[0][0] == 0 and spans[0][1] <= lengths[j]
    if not split:
        dropped = sum(lengths[j] - s[0][1] for j, s in covered.items())
        assert dropped == stats["truncated_tokens"]


def test_build_rows_shifts_labels_within_segments():
    docs = {0: {"ids": np.array([5, 6, 7], np.int32), "mask": np.array([0, 1, 1], np.uint8)},
            1: {"ids": np.array([8, 9], np.int32), "mask": np.array([1, 1], np.uint8)}}
    b = build_rows([[(0, 0, 3), (1, 0, 2)], None], 6, docs)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 8, 9, 0], [0] * 6])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 0], [0] * 6])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0], [0] * 6])
    np.testing.assert_array_equal(b["targets"], [[6, 7, 0, 9, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 0, 0], [0] * 6])
