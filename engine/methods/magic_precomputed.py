"""MAGIC from the run's precomputed replay (engine.precompute): the query's exact BPD gradient g,
then grad_w ~ A (B g) from the representation instead of a replay of training."""

from engine.methods import register
from engine.methods.base import Method, Scores


class MagicPrecomputed(Method):
    name = "magic_precomputed"
    description = "MAGIC through the run's precomputed replay (exact J, a query basis of K replayed images, or a rank-K range finder)"
    cost = "once per run: the precompute; per query: its BPD gradient and two small products"
    units = "bits/dim"
    order = 1

    def prepare(self, run, callback=None) -> None:
        """Installs the repository's shipped representation of the run's config (the default's), as
        the app does, then builds the default one (a query basis of 64 images) if the run still has none."""
        from engine.precompute import build, representation, shipped
        shipped.install(run)  # else `compare` on a fresh runs/cpu would replay hours for what ships
        if representation.default(run) is None:
            build.precompute(run, callback=callback)

    def cache_key(self, run) -> dict:
        """The representation that scores would come from (its name and file checksum), so that
        cached scores of another representation are never reused."""
        import hashlib
        from engine.precompute import representation
        name = representation.default(run)
        if name is None:
            return {"representation": ""}
        h = hashlib.sha256((representation.folder(run) / f"{name}.npz").read_bytes()).hexdigest()
        return {"representation": name, "representation_sha256": h}

    def score(self, run, x, callback=None) -> Scores:
        from engine.attribution import attribute_precomputed
        from engine.precompute import representation
        grad_w, bpd = attribute_precomputed(run, representation.load(run, representation.default(run)), x, callback)
        return Scores(grad_w, bpd)


register(MagicPrecomputed())
