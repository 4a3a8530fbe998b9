"""The LDS statistics: per query, the rank correlation of predicted and actual BPD changes."""

from __future__ import annotations

import numpy as np


def predicted_changes(scores: np.ndarray, drops: np.ndarray) -> np.ndarray:
    """(Q, K): -sum of the scores over each drop-set, the predicted BPD change. scores (Q, n)."""
    return -np.stack([scores[:, s].sum(1) for s in drops], axis=1)


def per_query(queries: list[int], labels: np.ndarray, bpd: np.ndarray, predicted: np.ndarray,
              actual: np.ndarray) -> list[dict]:
    """One row per query: its BPD, Spearman and Pearson between predicted and actual (Q, K)."""
    from scipy.stats import pearsonr, spearmanr
    return [{"query": q, "label": int(labels[i]), "bpd": float(bpd[i]),
             "spearman": float(spearmanr(predicted[i], actual[i])[0]),
             "pearson": float(pearsonr(predicted[i], actual[i])[0]),
             "predicted_change": predicted[i].tolist(), "actual_change": actual[i].tolist()}
            for i, q in enumerate(queries)]


def seed_breakdown(predicted: np.ndarray, by_seed: np.ndarray, run_seed: int) -> dict:
    """Protocol B against each retraining seed on its own, and how well the seeds agree.

    The metagradient is the derivative of one training run (the run's seed: its initialization,
    batches and noise); a retrain with another seed is another run. So the Spearman against the
    run's own seed and against the others say different things. The agreement between seeds
    (Spearman of one seed's actual changes against another's, per query) is r: if every seed's
    change is a shared effect of the subset plus the seed's own noise, even an exact prediction
    of the shared effect correlates with any one seed at only about sqrt(r).

    Args: predicted (Q, K); by_seed (S, Q, K) retrained BPDs; run_seed the run's seed (= seed 0).
    Returns: {"spearman_by_seed": [{"seed", "mean", "min"}] (S), "seed_agreement": mean over
    queries and seed pairs, or None with one seed}.
    """
    from scipy.stats import spearmanr
    rows = []
    for s, bpd_s in enumerate(by_seed):
        rho = np.array([spearmanr(predicted[i], bpd_s[i])[0] for i in range(len(predicted))])
        rows.append({"seed": run_seed + s, "mean": float(rho.mean()), "min": float(rho.min())})
    pairs = [(a, b) for a in range(len(by_seed)) for b in range(a + 1, len(by_seed))]
    agree = [spearmanr(by_seed[a][i], by_seed[b][i])[0] for a, b in pairs for i in range(by_seed.shape[1])]
    return {"spearman_by_seed": rows, "seed_agreement": float(np.mean(agree)) if agree else None}
