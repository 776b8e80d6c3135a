"""Largest-piece clean-up of predicted labels (hybridmim/components.py) and its flag in the labels file."""

from __future__ import annotations

import numpy as np
import pytest

from hybridmim.components import keep_largest_components
from hybridmim.errors import UserError
from hybridmim.labels import parse_labels


def test_only_the_flagged_labels_lose_their_smaller_pieces():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels: kept
    labels[4, 4, 4] = 1  # an island of label 1: dropped
    labels[2, 2, 2] = 1  # touches the big piece at a corner only: 6-connectivity makes it an island
    labels[5, 0, 0] = labels[5, 5, 5] = 2  # label 2 is not flagged: both pieces stay
    expected = labels.copy()
    expected[4, 4, 4] = expected[2, 2, 2] = 0
    assert keep_largest_components(labels, [1]) is labels
    np.testing.assert_array_equal(labels, expected)


def test_nothing_flagged_or_nothing_found_changes_nothing():
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = labels[2, 2, 2] = 1
    keep_largest_components(labels, [])
    keep_largest_components(labels, [7])
    assert labels.sum() == 2


def test_the_flag_is_read_written_and_checked():
    entry = {"value": 1, "name": "tumour", "color": [1, 2, 3]}
    flagged = parse_labels([{**entry, "largest_component": True}])[0]
    assert flagged.largest_component and flagged.to_dict()["largest_component"] is True
    plain = parse_labels([entry])[0]
    assert not plain.largest_component and "largest_component" not in plain.to_dict()
    with pytest.raises(UserError, match="'largest_component' must be true or false"):
        parse_labels([{**entry, "largest_component": "yes"}])
