"""A table version's rows as training reads them: vectors in a scratch map, text columns as lists
whose repeated values are one object each."""

from __future__ import annotations

import numpy as np

from conversations.records import load_records
from retrieval.build import build_table
from retrieval.locations import BUILD_DIR
from retrieval.store import open_table
from retrieval.table_rows import table_rows


def test_rows_come_back_in_table_order_and_repeated_values_share_one_string(tmp_path, tiny_jsonl):
    res = build_table(load_records(tiny_jsonl)[0], tmp_path / "db", "conversations")
    rows = table_rows(str(tmp_path / "db"), "conversations", res.version)
    data = open_table(tmp_path / "db", "conversations", res.version).to_arrow()
    assert rows["ids"] == data["id"].to_pylist() and rows["users"] == data["user"].to_pylist()
    assert rows["responses"] == data["assistant"].to_pylist() and rows["groups"] == data["group"].to_pylist()
    np.testing.assert_array_equal(rows["vectors"], np.stack(data["vector"].to_numpy(zero_copy_only=False)))
    assert isinstance(rows["vectors"], np.memmap)
    for key in ("responses", "groups"):
        first: dict[str, int] = {}
        for i, value in enumerate(rows[key]):
            assert rows[key][first.setdefault(value, i)] is value, key
        assert len(first) < len(rows[key])  # the fixture repeats them
    assert not list((tmp_path / "db" / BUILD_DIR).iterdir())  # the vectors' file is unlinked
