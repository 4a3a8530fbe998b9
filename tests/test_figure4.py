"""Figure 4's measurements on constructed scores whose answers are known by hand."""

import numpy as np

from engine.experiments.figure4 import analyse


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    train_y = np.arange(n) % 10
    train_x = rng.random((n, 784))
    test_y = np.arange(20) % 10
    test_x = rng.random((20, 784))
    return train_x, train_y, test_x, test_y


def test_ones_that_oppose_every_query_are_found_and_recur():
    train_x, train_y, test_x, test_y = _data()
    q = [3, 4, 7]
    g = np.random.default_rng(1).normal(0, 0.01, (3, 200))
    g[:, train_y == 1] += 1.0           # every 1 opposes every query
    g[:, train_y == 5] -= 1.0           # every 5 supports every query
    rep = analyse(g, q, train_x, train_y, test_x, test_y, k=16)
    f = rep["findings"]
    assert f["digit1"]["ones_share_opponents"] == 1.0
    assert f["digit1"]["ones_base_rate"] == 0.1
    assert f["digit1"]["queries_where_1_has_the_highest_mean_score"] == 3
    assert f["digit1"]["queries_where_1_is_the_commonest_opponent_class"] == 3
    assert all(r["proponents_classes"][5] == 16 for r in rep["queries"])
    # 20 ones and 20 fives: the 3 x 16 slots are filled from 20 images, far fewer than random draws
    for kind in ("proponents", "opponents"):
        r = f["recurrence"][kind]
        assert r["distinct"] <= 20 < r["expected_distinct_if_random"]
    # query 4 is a 4 and 7 a 7: no gallery image shares their label
    assert rep["queries"][1]["proponents_same_label"] == 0.0
    # the sign convention: proponents are the most negative scores
    assert all(e["grad_w"] < -0.9 for e in rep["queries"][0]["proponents"])


def test_independent_random_scores_show_no_recurrence_and_base_rates():
    train_x, train_y, test_x, test_y = _data(n=2000)
    g = np.random.default_rng(2).normal(size=(10, 2000))
    rep = analyse(g, list(range(10)), train_x, train_y, test_x, test_y, k=16)
    r = rep["findings"]["recurrence"]["opponents"]
    assert abs(r["distinct"] - r["expected_distinct_if_random"]) < 8
    assert r["in_half_or_more_queries"] == 0
    # a query's own pixels: a copy of it among the training images is the most similar one
    train_x[0] = test_x[5]
    g2 = np.zeros((1, 2000))
    g2[0, 0] = -1.0
    rep2 = analyse(g2, [5], train_x, train_y, test_x, test_y, k=1)
    assert abs(rep2["queries"][0]["proponents_mean_cosine"] - 1.0) < 1e-12
