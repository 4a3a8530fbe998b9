"""Similarity baselines (engine.baselines.similarity): raw pixels and the network's features."""

from engine.methods import register
from engine.methods.base import Method, Scores


class Pixel(Method):
    name = "pixel"
    description = "cosine similarity of raw pixels"
    cost = "one dot product per training image"
    order = 20

    def score(self, run, x, callback=None) -> Scores:
        from engine import data
        from engine.baselines.similarity import pixel_scores
        return Scores(pixel_scores(data.load_train(run.preset.n_train, run.preset.source)[0], x))


class Feature(Method):
    name = "feature"
    description = "cosine similarity of the score network's bottleneck features"
    cost = "one forward pass per training image"
    order = 21

    def score(self, run, x, callback=None) -> Scores:
        from engine import data
        from engine.baselines.similarity import feature_scores
        return Scores(feature_scores(run, data.load_train(run.preset.n_train, run.preset.source)[0], x))


register(Pixel())
register(Feature())
