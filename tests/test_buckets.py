import numpy as np
import pytest

from retrieval.buckets import assign_buckets, group_keys, spherical_kmeans


def _vecs(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_few_groups_get_one_bucket_each_in_sorted_order():
    labels = ["b", "a", "b", None]
    responses = ["rb", "ra", "rb", "free text"]
    v = _vecs(4)
    buckets, mapping = assign_buckets(group_keys(labels, responses), v, v, num_buckets=10)
    assert mapping == {"label:a": 0, "label:b": 1, "response:free text": 2}
    assert buckets.tolist() == [1, 0, 1, 2]


def test_unlabelled_row_inherits_the_label_of_its_response():
    assert group_keys(["x", None, None], ["Same reply", "same  REPLY", "other"]) == ["label:x", "label:x", "response:other"]


def test_all_rows_of_a_group_share_a_bucket_when_clustering():
    rng = np.random.default_rng(1)
    labels = [f"intent{i % 30}" for i in range(300)]
    centers = _vecs(30, d=16, seed=2)
    v = centers[[i % 30 for i in range(300)]] + 0.05 * rng.normal(size=(300, 16))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    keys = group_keys(labels, ["r"] * 300)
    buckets, mapping = assign_buckets(keys, v, v, num_buckets=10, seed=0)
    assert set(buckets.tolist()) <= set(range(10))
    for i, lab in enumerate(labels):
        assert buckets[i] == mapping[f"label:{lab}"]
    again, _ = assign_buckets(keys, v, v, num_buckets=10, seed=0)
    assert np.array_equal(buckets, again)


@pytest.mark.parametrize("plus_plus", [True, False])  # bucket groups; the search index's cells
def test_kmeans_separates_obvious_clusters(plus_plus):
    pts = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], dtype=np.float32)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    centroids, ids = spherical_kmeans(pts, 2, np.ones(4), rng=0, plus_plus=plus_plus)
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(np.argmax(pts @ centroids.T, axis=1), ids)


def test_num_buckets_must_be_at_least_two():
    with pytest.raises(ValueError, match="--num_buckets must be at least 2"):
        assign_buckets(["label:a"], _vecs(1), _vecs(1), num_buckets=1)
