"""MAGIC by replay: the exact metagradient of the exact BPD, one backward sweep through
training per batch of queries (engine.attribution)."""

from engine.methods import register
from engine.methods.base import Method, Scores


class Magic(Method):
    name = "magic"
    description = "MAGIC: exact metagradient of the exact BPD through all of training"
    cost = "the queries' BPD gradients, then one backward replay of training for all of them"
    units = "bits/dim"
    order = 0

    def score(self, run, x, callback=None) -> Scores:
        from engine.attribution import attribute
        grad_w, bpd = attribute(run, x, callback=callback)
        return Scores(grad_w, bpd)


register(Magic())
