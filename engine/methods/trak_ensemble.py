"""TRAK and D-TRAK over an ensemble of independently trained models, as TRAK's authors use it.

The ensemble is the run's own model and ENSEMBLE - 1 more trained on the same images and weights
with other seeds (run.seed + 1, ...): each is featurized and scored by traker, which averages
the scores (engine.baselines.trak). Protocol B's retrains cannot stand in for them: they each
lack a drop-set and the bank keeps their BPDs, not their parameters. Members are kept in
RUN/methods/ensemble/ (final parameters only, one file each, written atomically), so an
interrupted `prepare` resumes with the next member.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.methods import register
from engine.methods.base import Method, Scores

ENSEMBLE = 8  # models, the run's own included


class TrakEnsemble(Method):
    cost = f"training {ENSEMBLE - 1} more models, then TRAK's features and scores on each of the {ENSEMBLE}"

    def __init__(self, variant: str, description: str, order: int):
        self.name, self.variant = f"{variant}_ens", variant
        self.description, self.order = description, order

    def members(self, run, callback=None) -> list[torch.nn.Module]:
        """The ENSEMBLE - 1 other models (trained here once per run, then read back)."""
        from engine import atomic
        from engine.training import make_model, train
        folder = run.path / "methods" / "ensemble"
        out = []
        for k in range(1, ENSEMBLE):
            seed = run.seed + k
            path = folder / f"seed_{seed}.pt"
            stamp = {"run_digest": run.digest, "seed": seed}
            state = None
            if path.is_file():
                try:
                    blob = torch.load(path, map_location="cpu", weights_only=True)
                    state = blob["params"] if blob.get("stamp") == stamp else None
                except (OSError, RuntimeError, KeyError, EOFError):
                    state = None  # unreadable: trained again below
            if state is None:
                final = train(run.preset, seed=seed, weights=run.weights())
                state = {n: t.detach().cpu() for n, t in final.model_params.items()}
                atomic.save_torch({"stamp": stamp, "params": state}, path)
            m = make_model(run.preset, seed)
            m.load_state_dict(state)
            out.append(m)
            if callback is not None:
                callback({"stage": "ensemble", "i": k, "n": ENSEMBLE - 1})
        return out

    def prepare(self, run, callback=None) -> None:
        self.members(run, callback)

    def score(self, run, x, callback=None) -> Scores:
        from engine import data
        from engine.baselines.trak import trak_scores
        images, _ = data.load_train(run.preset.n_train, run.preset.source)
        s = trak_scores(run, images, x, self.variant, ensemble=self.members(run, callback), callback=callback)
        return Scores(np.asarray(s))


register(TrakEnsemble("trak", f"TRAK over an ensemble of {ENSEMBLE} independently trained models", 13))
register(TrakEnsemble("dtrak", f"D-TRAK over an ensemble of {ENSEMBLE} independently trained models", 14))
