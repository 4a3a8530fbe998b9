"""Exact-likelihood data attribution for a VE-SDE diffusion model on MNIST.

The public face (the engine never imports streamlit):

    from engine import bits_per_dim, log_likelihood   # exact likelihood of any score function
    from engine import train                           # deterministic weighted training of a preset
    from engine import metagradient                    # d Phi(theta_T) / d w through every Adam step
    from engine import attribute                       # MAGIC scores of images under a stored run
    from engine import methods                         # the registry of attribution methods

Names load on first use, so `import engine` stays cheap (no torch until one is touched).
"""

import importlib

__version__ = "0.2.0"

_PUBLIC = {
    "bits_per_dim": ("engine.likelihood", "bits_per_dim"),
    "log_likelihood": ("engine.likelihood", "log_likelihood"),
    "train": ("engine.training", "train"),
    "metagradient": ("engine.metagrad", "metagradient"),
    "attribute": ("engine.attribution", "attribute_auto"),
    "methods": ("engine.methods", None),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
