"""Random scores: the floor of the comparison table (its LDS is 0 in expectation)."""

import hashlib

import numpy as np

from engine.methods import register
from engine.methods.base import Method, Scores


class RandomScores(Method):
    name = "random"
    description = "random scores (standard normal, fixed per run and query): the floor"
    cost = "nothing"
    order = 90

    def score(self, run, x, callback=None) -> Scores:
        rows = []
        for q in x.numpy():  # seeded by the run and the query's pixels: reruns give the same scores
            seed = int.from_bytes(hashlib.sha256(run.digest.encode() + q.tobytes()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(run.preset.n_train))
        return Scores(np.stack(rows))


register(RandomScores())
