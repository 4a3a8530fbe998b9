"""The galleries shipped beside the default model's representation, so that a fresh start computes none.

    shipped/<preset>/galleries/<representation>.npz

The galleries are the curated test digits' attributions from the run's representation (one BPD
with its gradient per digit, projected: about 2 min for 64 digits on 2 cores). Computed at the
first start, they share the cores with the first visitor's exact replay (webapp.jobs: half each),
which then lands later (in the browser benchmark 421.8 s after the stroke, against 346.2 s with
them shipped, results/bench_app_browser.txt). Shipped, they are in the memo at once: the Galleries
page is whole from the first visit and the replay has the cores to itself.

The file holds grad_w (Q, n) and bpd (Q,) as the app computed them (webapp.service.galleries_computed),
and everything they are a function of: the run (config digest and the final weights' checksum,
engine.precompute.representation.stamp), the representation (its name and a sha256 of its arrays
A and B as loaded here), the test digits (their indices and a sha256 of their pixels) and the
likelihood settings. It is used only when every one of these equals the app's, so that what it
puts in the memo is what the app would compute there (up to the float rounding of the BPD
gradient under another torch thread count); else (another kind of CPU decodes the shipped basis to other bits,
another APP_GALLERY_QUERIES, a damaged file) the galleries are computed in the background as
without it, and `load` says why in one line. Made by `python -m webapp.shipped_galleries`
(`make ship`, after the representation), from the representation as a fresh clone installs it:
where the run holds the precompute's own file (float32) and one of that name is shipped (its query
gradients in float16), the command moves the run's own to <name>.npz.own and installs the shipped
one first; `ship` refuses the precompute's own with one line, since galleries fingerprinted on it
would match no fresh clone's representation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine import atomic
from engine.errors import UserError
from engine.store import Run

FORMAT = 1


def path(run: Run, name: str, root: Optional[Path] = None) -> Path:
    """Where the galleries made from representation `name` of the run's preset are shipped."""
    from engine.precompute import shipped
    return shipped.folder(run.preset.name, root) / "galleries" / f"{name}.npz"


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(run: Run, name: str, queries: list[int]) -> dict[str, str]:
    """Everything the galleries of `queries` from representation `name` of the run are a function of
    (a UserError if the representation is refused)."""
    from engine.precompute import representation as R
    from webapp.service import test_set
    rep = R.load(run, name)
    x = test_set()[0][np.asarray(queries, dtype=np.int64)]
    return {**{k: str(v) for k, v in R.stamp(run).items()}, "format_galleries": str(FORMAT), "rep": name,
            "rep_sha256": _sha256(*([] if rep.a is None else [rep.a]), rep.b),
            "queries": json.dumps([int(q) for q in queries]), "images_sha256": _sha256(x),
            "likelihood": json.dumps(run.preset.likelihood_kwargs, sort_keys=True)}


def ship(run: Run, root: Optional[Path] = None, callback: Optional[Callable[[dict], None]] = None) -> Path:
    """Compute the run's galleries from its representation as the app does and write them, with
    their fingerprint, to `path` (atomically)."""
    from webapp import service
    name, why = service.precomputed(run)
    if name is None:
        raise UserError(why or f"run {run.path} has no precomputed representation to make the galleries from")
    _refuse_unshipped(run, name, root)
    q = service.gallery_queries()
    res = service.galleries_computed(run, q, False, callback or (lambda info: None))
    if res["method"] != f"precomputed:{name}":
        raise UserError(f"the galleries were computed by {res['method']}, not from `{name}`")
    dest = path(run, name, root)
    atomic.save_npz(dest, grad_w=np.asarray(res["grad_w"]), bpd=np.asarray(res["bpd"], dtype=np.float64),
                    **{k: np.array(v) for k, v in fingerprint(run, name, q).items()})
    return dest


def _unshipped(run: Run, root: Optional[Path]) -> list[Path]:
    """The run's representations that are the precompute's own where one of that name is shipped
    for the run's config: a fresh clone installs the shipped file instead (its query gradients
    rounded to float16), so galleries made from the run's own would match no fresh clone's."""
    from engine.precompute import representation as R, shipped
    out = []
    for name in R.available(run):
        src = shipped.folder(run.preset.name, root) / f"{name}.npz"
        if not src.is_file() or shipped._digest(src) != run.digest:
            continue
        own = R.folder(run) / f"{name}.npz"
        try:
            with np.load(own, allow_pickle=False) as f:
                if shipped.installed_from_shipped({k: None for k in f.files}):
                    continue
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            pass
        out.append(own)
    return out


def _refuse_unshipped(run: Run, name: str, root: Optional[Path]) -> None:
    """A UserError when the run's representation `name` is not what a fresh clone installs (_unshipped)."""
    own = [p for p in _unshipped(run, root) if p.stem == name]
    if own:
        raise UserError(f"{own[0]} is the precompute's own, but a fresh clone installs the shipped file of that "
                        f"name: move {own[0]} away so that the shipped one is installed (as "
                        "`python -m webapp.shipped_galleries` does), and make the galleries again")


def install_as_a_fresh_clone(run: Run, root: Optional[Path] = None) -> list[Path]:
    """Move each representation of the run that a fresh clone would replace by a shipped one
    (_unshipped) to <name>.npz.own, and install the shipped files, so that the galleries are made
    from what a fresh clone loads. Returns the files moved."""
    from engine.precompute import shipped
    moved = []
    for own in _unshipped(run, root):
        keep = own.with_name(own.name + ".own")
        own.replace(keep)
        moved.append(keep)
    shipped.install(run, root)
    return moved


def load(run: Run, name: str, queries: list[int], root: Optional[Path] = None) -> tuple[Optional[dict], Optional[str]]:
    """(the galleries' result as webapp.service.galleries_computed returns it, plus "shipped": the
    file's path; None) when the file shipped for representation `name` matches this run, the
    representation, the queries and the likelihood settings; else (None, a one-line reason), or
    (None, None) when nothing is shipped for it."""
    p = path(run, name, root)
    if not p.is_file():
        return None, None
    try:
        with np.load(p, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
        want = fingerprint(run, name, queries)
        gw, bpd = d["grad_w"], d["bpd"]
        stored = {k: str(d[k]) for k in want}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        return None, f"the shipped galleries {p} are not used: unreadable ({type(e).__name__})"
    except UserError as e:
        return None, f"the shipped galleries {p} are not used: {e}"
    off = [k for k in want if stored[k] != want[k]]
    if off:
        return None, f"the shipped galleries {p} are not used: made for another {', '.join(off)}"
    if gw.shape != (len(queries), run.preset.n_train) or bpd.shape != (len(queries),) or not (
            np.isfinite(gw).all() and np.isfinite(bpd).all()):
        return None, f"the shipped galleries {p} are not used: arrays of the wrong shape or not finite"
    from engine.precompute import shipped
    where = p.relative_to(shipped.ROOT.parent) if p.is_relative_to(shipped.ROOT.parent) else p
    return {"grad_w": gw, "bpd": bpd, "queries": list(queries), "method": f"precomputed:{name}", "shipped": str(where)}, None


def main() -> None:
    ap = argparse.ArgumentParser(description="Ship the galleries of a run made from its representation "
                                             "(shipped/<preset>/galleries/<representation>.npz)")
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--root", help="the shipped folder (default: shipped/)")
    a = ap.parse_args()
    from engine.store import load_run
    from webapp import service
    try:
        run = load_run(a.run)
        root = Path(a.root) if a.root else None
        for keep in install_as_a_fresh_clone(run, root):
            print(f"moved the precompute's own representation to {keep}: the shipped one is installed, "
                  "as on a fresh clone", flush=True)
        service.install_shipped(run)
        dest = ship(run, root,
                    callback=lambda i: print(f"  {i.get('i', 0)}/{i.get('n', '?')} test digits", flush=True))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
