"""Embedding tables (parquet with identity, face index and box columns): round trip, keys, concatenation, and
what a bad file or table says."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facenet_hf.evaluation import EmbeddingTable, load_embeddings, read_table, save_embeddings, write_table


def test_round_trip_keeps_every_column_and_plain_readers_still_work(tmp_path):
    emb = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    table = EmbeddingTable(
        ["p/a.jpg", "p/a.jpg", "q/b.jpg"],
        emb,
        ["p", "p", None],
        [0, 1, -1],
        [[1, 2, 3, 4], [5, 6, 7, 8], [np.nan] * 4],
    )
    path = write_table(tmp_path / "t.parquet", table)
    back = read_table(path)
    assert back.paths == table.paths and back.identities == ["p", "p", None]
    assert back.face_index.tolist() == [0, 1, -1] and back.keys == ["p/a.jpg#0", "p/a.jpg#1", "q/b.jpg"]
    np.testing.assert_array_equal(back.embeddings, emb)
    np.testing.assert_array_equal(back.boxes[:2], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert np.isnan(back.boxes[2]).all()
    paths, plain = load_embeddings(path)  # the evaluate command's reader sees path + embedding
    assert paths == table.paths and np.array_equal(plain, emb)
    assert read_table(save_embeddings(tmp_path / "e.npz", ["x", "y"], emb[:2])).identities is None


def test_select_and_concat():
    a = EmbeddingTable(["a", "b"], np.eye(2), ["A", "B"])
    b = EmbeddingTable(["c"], np.ones((1, 2)), face_index=[2], boxes=[[0, 0, 1, 1]])
    both = EmbeddingTable.concat([a, b])
    assert both.paths == ["a", "b", "c"] and both.identities == ["A", "B", None]
    assert both.face_index.tolist() == [-1, -1, 2] and np.isnan(both.boxes[0]).all()
    assert both.select(np.array([False, True, True])).paths == ["b", "c"]
    assert both.select([2, 0]).identities == [None, "A"]
    with pytest.raises(ValueError, match="different dimensions"):
        EmbeddingTable.concat([a, EmbeddingTable(["d"], np.ones((1, 3)))])


def test_bad_tables_and_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="2 identities for 3 rows"):
        EmbeddingTable(["a", "b", "c"], np.zeros((3, 2)), ["x", "y"])
    dup = EmbeddingTable(["a", "a"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"rows must be unique .* e\.g\. \['a'\]"):
        write_table(tmp_path / "d.parquet", dup)
    with pytest.raises(ValueError, match="must be a .parquet file"):
        write_table(tmp_path / "d.csv", EmbeddingTable(["a"], np.zeros((1, 2))))
    pq.write_table(pa.table({"path": ["a"], "vector": [[1.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(KeyError, match=r"bad\.parquet: missing column\(s\) \['embedding'\]"):
        read_table(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_table(tmp_path / "nope.parquet")
