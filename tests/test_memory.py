"""Scratch arrays and appenders: the same values in memory or in an unlinked file, nothing left behind."""

from __future__ import annotations

import numpy as np

from models.memory import Appender, scratch_array


def test_a_scratch_array_is_zeroed_writable_and_leaves_no_file(tmp_path):
    a = scratch_array(tmp_path, (3, 2), np.float32)
    assert isinstance(a, np.memmap) and a.shape == (3, 2) and a.dtype == np.float32
    assert a.tolist() == [[0, 0], [0, 0], [0, 0]]
    a[1] = [1.5, 2.5]
    assert a[1].tolist() == [1.5, 2.5]
    assert list(tmp_path.iterdir()) == []  # unlinked as made


def test_a_scratch_array_without_a_folder_or_rows_is_plain_memory(tmp_path):
    assert type(scratch_array(None, (2,), np.int32)) is np.ndarray
    empty = scratch_array(tmp_path, (0, 4), np.float32)  # a file cannot map zero bytes
    assert type(empty) is np.ndarray and empty.shape == (0, 4)


def test_an_appender_joins_its_pieces_in_order_either_way(tmp_path):
    pieces = [np.array([3, 1], np.int64), np.array([], np.int64), np.array([4, 1, 5])]
    for folder in (None, tmp_path):
        out = Appender(folder, np.int32)
        for p in pieces:
            out.append(p)
        joined = out.array()
        assert joined.dtype == np.int32 and joined.tolist() == [3, 1, 4, 1, 5]
        assert isinstance(joined, np.memmap) == (folder is not None)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_appender_gives_an_empty_array(tmp_path):
    for folder in (None, tmp_path):
        empty = Appender(folder, np.float32).array()
        assert empty.dtype == np.float32 and empty.shape == (0,)
