"""The lifecycle every attribution method shares (TRAK's featurize/finalize/score, reduced).

A method scores queries x (Q, 1, 28, 28) against the n training images of a finished run as a
(Q, n) array in grad_w's shape and sign convention: removing a set S is predicted to change the
query's BPD by -sum_{i in S} score[i], so a proponent (it makes the query more likely) has a
negative score. Only MAGIC's scores are in bits/dim; the others' are in their own units and
only their ranks mean something.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

Callback = Optional[Callable[[dict], None]]


@dataclass
class Scores:
    """scores (Q, n); bpd (Q,) when the method computed the queries' BPD on its way (else None)."""
    scores: np.ndarray
    bpd: Optional[np.ndarray] = None


class Method:
    """One attribution method. Subclasses set the class attributes and override `score`, and
    `prepare` when they need one-off work per run (kept in the run folder, resumable).

    Attributes:
        name: short identifier (CLI, file names, tables).
        description: one line for tables and the app.
        cost: what scoring costs, in words (the measured seconds come from the LDS reports).
        order: position in tables (MAGIC first).
        units: "bits/dim" when a score is a predicted BPD change (the MAGIC family); otherwise
            the scores are in the method's own units and only their ranks mean something.
    """
    name: str = ""
    description: str = ""
    cost: str = ""
    order: int = 50
    units: str = "score units"

    def prepare(self, run, callback: Callback = None) -> None:
        """One-off work on `run` before scoring; the default has none."""

    def score(self, run, x: torch.Tensor, callback: Callback = None) -> Scores:
        raise NotImplementedError

    def cache_key(self, run) -> dict:
        """What, besides the run and the queries, decides this method's scores (it joins the
        stamp of cached scores, so a change recomputes them); the default: nothing."""
        return {}

    def __repr__(self) -> str:
        return f"<method {self.name}>"
