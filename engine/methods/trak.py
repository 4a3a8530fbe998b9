"""The TRAK family through `traker` (engine.baselines.trak): TRAK, D-TRAK, likelihood-TRAK."""

from engine.methods import register
from engine.methods.base import Method, Scores


class Trak(Method):
    cost = "per-example gradients of the training set at the final parameters, projected"

    def __init__(self, variant: str, description: str, order: int):
        self.name = self.variant = variant
        self.description, self.order = description, order

    def score(self, run, x, callback=None) -> Scores:
        from engine import data
        from engine.baselines.trak import trak_scores
        images, _ = data.load_train(run.preset.n_train, run.preset.source)
        return Scores(trak_scores(run, images, x, self.variant, callback=callback))


register(Trak("trak", "TRAK, denoising loss averaged over 10 timesteps, projected to 2048 dims", 10))
register(Trak("dtrak", "D-TRAK: squared-norm output function, same timesteps and projection", 11))
register(Trak("ltrak", "likelihood-TRAK: TRAK's kernel with the exact-BPD gradient as the query feature", 12))
