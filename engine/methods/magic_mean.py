"""Query-agnostic MAGIC: the mean MAGIC attribution over a fixed set of test digits, whatever the
query. How much of MAGIC's lead in the comparison it keeps says how much of that lead is
specific to the query (the same training images top most queries' lists)."""

import numpy as np

from engine.methods import register
from engine.methods.base import Method, Scores

N_DIGITS = 16   # test digits averaged (24 in the measurement that motivated it; 16 keeps `compare` on `small` short)
SEED = 12345    # their sample (data.query_indices); LDS queries use seed 0
CHUNK = 8       # digits per replay job


class MagicMean(Method):
    name = "magic_mean"
    description = f"MAGIC averaged over {N_DIGITS} fixed test digits, ignoring the query"
    cost = f"once per run: MAGIC on {N_DIGITS} test digits (replays of {CHUNK}, in parallel); then nothing per query"
    units = "bits/dim"
    order = 2

    def _path(self, run):
        return run.path / "methods" / "magic_mean.npz"

    def prepare(self, run, callback=None) -> dict:
        """MAGIC of the N_DIGITS test digits, kept in RUN/methods/.

        In chunks of CHUNK digits, one replay each, run as parallel jobs (one per core) that
        keep their results and sweep states in RUN/methods/magic_mean.parts. Batches of 8 share
        a step's rebuild (results/bench_pullback.txt: 8 queries cost 4.6x one), but on CPU a
        batch of 16 was slower per query than two of 8, and parallel chunks use every core; on a
        long run each replay is an hour, which an interruption should not lose."""
        from engine import data
        from engine import device as devices
        from engine.attribution import attribute_many
        from engine.executor import LocalExecutor
        from engine.files import load_or_compute
        idx = data.query_indices(N_DIGITS, SEED)

        def compute() -> dict:
            grad_w, bpd = attribute_many(run, data.load_test()[0][idx], self._path(run).with_suffix(".parts"),
                                         LocalExecutor(devices.default_jobs(run.preset)), chunk=CHUNK,
                                         callback=callback)
            return {"grad_w": grad_w, "bpd": bpd}
        return load_or_compute(self._path(run), {"run_digest": run.digest, "test_indices": idx}, compute,
                               what=f"MAGIC of {N_DIGITS} test digits for the query-agnostic mean")

    def score(self, run, x, callback=None) -> Scores:
        from engine import data
        stored = self.prepare(run, callback)
        digits = data.load_test()[0][stored["test_indices"]].numpy().reshape(N_DIGITS, -1)
        rows = []
        for q in x.numpy().reshape(len(x), -1):
            keep = ~(digits == q).all(1)  # a query that is one of the digits is left out of its own mean
            rows.append(stored["grad_w"][keep].mean(0))
        return Scores(np.stack(rows))


register(MagicMean())
