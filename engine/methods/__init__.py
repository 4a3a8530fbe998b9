"""Attribution methods: one lifecycle for all, one registry.

Every method is an `engine.methods.base.Method` registered by a module of this package:

    from engine import methods
    m = methods.get("trak")
    m.prepare(run)                      # one-off work per run, kept in the run folder (often none)
    s = m.score(run, x)                 # s.scores (Q, n) in grad_w's shape and sign; s.bpd (Q,) or None

LDS, the comparison, Figure 4, the CLI and the app iterate `methods.all()`; none of them names a
method. Adding one is one small module here that calls `register` (see random_scores.py):
modules are found by `pkgutil`, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from engine.errors import UserError
from engine.methods.base import Method, Scores

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (called at import by the module that defines it)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"two attribution methods are named {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def all() -> list[Method]:  # noqa: A001 (the registry's whole content, in table order)
    """Every registered method, MAGIC first, then by their `order`."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def names() -> list[str]:
    return [m.name for m in all()]


def get(name: str) -> Method:
    """The method called `name`; an unknown name is a one-line UserError listing the choices."""
    _discover()
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


__all__ = ["Method", "Scores", "all", "get", "names", "register"]
