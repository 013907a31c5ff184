import math

import numpy as np
import pytest

from retrieval.neighbours import mix, nearest, neighbour_log_probs, vote


def test_vote_is_the_softmax_of_cosines_over_temperature_summed_per_slot():
    got = vote(np.array([[0.9, 0.8, 0.7]]), np.array([[2, 0, 2]]), num_candidates=3, temperature=0.1)
    e = [1.0, math.exp(-1), math.exp(-2)]  # exp((cos - max) / T)
    z = sum(e)
    np.testing.assert_allclose(got, [[e[1] / z, 0.0, (e[0] + e[2]) / z]], rtol=1e-12)


def test_rows_without_a_slot_do_not_vote_and_a_message_without_voters_gets_no_vote():
    got = vote(np.array([[0.9, 0.8], [0.5, 0.4]]), np.array([[-1, 1], [-1, -1]]), num_candidates=2, temperature=0.05)
    np.testing.assert_array_equal(got, [[0.0, 1.0], [0.0, 0.0]])  # the 0.9 row had no slot: 0.8 takes it all
    assert vote(np.zeros((2, 0)), np.zeros((2, 0), np.int64), 3).shape == (2, 3)


def test_mix_interpolates_probabilities_and_leaves_unvoted_rows_alone():
    log_pr = np.log(np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    votes = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    got = np.exp(mix(log_pr, votes, 0.2))
    np.testing.assert_allclose(got[0], [0.4, 0.24, 0.36])  # 0.8 * head + 0.2 * vote
    np.testing.assert_allclose(got[1], [0.5, 0.3, 0.2])
    assert mix(log_pr, votes, 0.0) is log_pr


def test_nearest_is_the_exact_top_k_by_cosine_best_first():
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(50, 8)).astype(np.float32)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    queries = memory[[3, 7]] + 0.01
    cos, idx = nearest(queries, memory, k=5, chunk=1)
    sims = queries @ memory.T
    np.testing.assert_array_equal(idx, np.argsort(-sims, axis=1)[:, :5])
    np.testing.assert_allclose(cos, np.take_along_axis(sims, idx, 1), rtol=1e-6)
    assert idx[0, 0] == 3 and idx[1, 0] == 7
    cos, idx = nearest(queries, memory[:3], k=5)  # fewer rows than k: all of them
    assert idx.shape == (2, 3)


def test_neighbour_log_probs_pull_toward_what_the_nearest_rows_answered():
    memory = np.eye(3, dtype=np.float32)
    slots = np.array([0, 1, 2])
    query = np.array([[0.0, 0.0, 1.0]], np.float32)
    head = np.log(np.array([[0.6, 0.3, 0.1]]))
    got = np.exp(neighbour_log_probs(head, query, memory, slots, weight=0.5, k=1))
    np.testing.assert_allclose(got, [[0.3, 0.15, 0.55]])
    assert neighbour_log_probs(head, query, memory, slots, weight=0.0) is head
    assert neighbour_log_probs(head, query, memory[:0], slots[:0], weight=0.5) is head


@pytest.mark.parametrize("weight", [-0.1, 1.0])
def test_the_weight_is_validated_naming_the_flag(weight):
    from models.config import TrainConfig

    with pytest.raises(ValueError, match="--neighbour_weight"):
        TrainConfig(neighbour_weight=weight)


def test_nearest_among_a_mask_returns_only_those_rows_and_matches_searching_them_alone():
    rng = np.random.default_rng(3)
    memory = rng.normal(size=(50, 8)).astype(np.float32)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    queries = memory[:5] + 0.01
    among = np.arange(50) % 3 != 0  # rows 0, 3, 6, ... excluded, among them query 0's own row
    cos, idx = nearest(queries, memory, k=4, among=among)
    sub_cos, sub_idx = nearest(queries, memory[among], k=4)
    np.testing.assert_array_equal(idx, np.flatnonzero(among)[sub_idx])
    np.testing.assert_allclose(cos, sub_cos, rtol=1e-6)
    assert among[idx].all()
