"""What the app computes, as memoized background jobs; plain Python, no streamlit.

Configuration by environment: APP_RUN (run folder, default runs/cpu), APP_PRESET (preset to
train there if it is missing, default cpu), APP_CACHE (memo folder, default runs/cache),
APP_CACHE_GB (memo size limit, default 2), APP_SHIPPED (the shipped representations, default shipped/), APP_GALLERY_QUERIES (curated test queries whose
attributions are precomputed, default 64), APP_WORKERS (worker processes per lane of jobs, default 1:
one for a page's short jobs, one for long ones, see webapp.jobs; 0 runs them in threads of the server), APP_EXECUTOR (where the gallery precompute runs: local,
the default, or ray, with APP_RAY_ADDRESS and APP_CHUNK queries per Ray task). The numbers and
choices among them are read through `setting`, which refuses a mistyped value in one line.

Each job is a module-level function bound with functools.partial to picklable arguments, so
that it can run in a worker process (see webapp.jobs).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cache import Memo, make_key
from engine import data, images
from engine.errors import UserError
from engine.presets import digest
from engine.store import Run
from webapp.jobs import Jobs

Callback = Callable[[dict], None]


# the app's numeric settings: name -> (default, type, least value)
NUMBERS = {"APP_CACHE_GB": (2.0, float, 0.01), "APP_WORKERS": (1, int, 0), "APP_GALLERY_QUERIES": (64, int, 1),
           "APP_CHUNK": (2, int, 1), "APP_PRECOMPUTE_RANK": (64, int, 0)}
CHOICES = {"APP_PRECOMPUTE_METHOD": ("basis", "lowrank"), "APP_EXECUTOR": ("local", "ray")}


def setting(name: str):
    """A setting from the environment (read when asked, so a test or a restart can change it), or
    its default; a value that is not a number of the right kind and size, or not one of the
    choices, raises a one-line UserError naming it, rather than a traceback on the page."""
    raw = os.environ.get(name, "").strip()
    if name in CHOICES:
        if raw and raw not in CHOICES[name]:
            raise UserError(f"the setting {name}={raw!r} must be {' or '.join(CHOICES[name])}")
        return raw or CHOICES[name][0]
    default, kind, least = NUMBERS[name]
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"the setting {name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not least <= value < float("inf"):  # also refuses nan and inf
        raise UserError(f"the setting {name}={raw} must be a finite number, at least {least:g}")
    return value


def settings_problem() -> Optional[str]:
    """The first bad setting of the app's environment, as one line; None when all are fine."""
    try:
        for name in (*NUMBERS, *CHOICES):
            setting(name)
    except UserError as e:
        return str(e)
    return None


def run_dir() -> Path:
    return Path(os.environ.get("APP_RUN", "runs/cpu"))


def preset_name() -> str:
    return os.environ.get("APP_PRESET", "cpu")


@functools.lru_cache(maxsize=1)
def jobs() -> Jobs:
    """One memo and job table per server process (shared by every browser session)."""
    size = int(setting("APP_CACHE_GB") * 2**30)
    return Jobs(Memo(Path(os.environ.get("APP_CACHE", "runs/cache")), size_limit=size), workers=setting("APP_WORKERS"))


def _import_engine() -> None:
    import engine.attribution  # noqa: F401  (torch, the model and the likelihood code)


@functools.lru_cache(maxsize=1)
def warm_workers() -> None:
    """Start the job processes when the server starts, not when the first image arrives."""
    jobs().warm(_import_engine)


def load_run() -> Optional[Run]:
    """The app's run if it is finished, else None (training is then a job: `train_job`)."""
    from engine.store import load_run as _load
    try:
        return _load(run_dir())
    except UserError:
        return None


@functools.lru_cache(maxsize=1)
def retire_outdated() -> Optional[str]:
    """Once per server process, before the run is opened: when run_dir() holds the app's preset as
    an earlier version of this repository defined it (the same preset name, seed 0, every weight 1,
    other settings), move it to <run_dir>.<its digest> (as `make app` does, `engine train
    --replace-other`), so the current one is trained in its place and the shipped representation
    fits it. Returns what happened, in words, or None. A run of another preset, seed or weights (a
    user's own) is left where it is."""
    import dataclasses
    import json
    from engine.presets import get_preset, preset_from_dict
    from engine.store import run_config, set_aside_other
    out = run_dir()
    try:
        stored = json.loads((out / "config.json").read_text())
        preset = get_preset(preset_name())
        old = preset_from_dict(stored["preset"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None  # no run, or one this version cannot read (open_for_training says so)
    ones = np.ones(preset.n_train, dtype=np.float32)
    if (old.name != preset.name or stored.get("seed") != 0
            or stored.get("weights_sha256") != run_config(preset, 0, ones)["weights_sha256"]):
        return None
    aside = set_aside_other(out, preset, 0, ones)
    if aside is None:
        return None
    said = "; ".join(f"{f.name} {getattr(old, f.name)}, now {getattr(preset, f.name)}"
                     for f in dataclasses.fields(preset) if getattr(old, f.name) != getattr(preset, f.name))
    return (f"{out} held the `{preset.name}` model of an earlier version ({said or 'another file format'}): "
            f"it was moved to {aside}, and the current one is trained in its place.")


def _train(preset_name: str, out: Path, cb: Callback) -> dict:
    from engine import training as train
    from engine.presets import get_preset
    state = train.train(get_preset(preset_name), seed=0, out=out,
                        callback=lambda i: cb({"stage": "training", "i": i["step"], "n": i["total"]}))
    return {"steps": int(state.step)}


def train_job():
    """Train the app's preset into run_dir() (resumes an interrupted run)."""
    from engine.presets import get_preset
    preset = get_preset(preset_name())
    return jobs().submit(make_key("train", digest(preset.to_dict()), None, {"out": str(run_dir().resolve())}),
                         functools.partial(_train, preset.name, run_dir()), label=f"training the {preset.name} model")


# ---------------------------------------------------------------- images

@functools.lru_cache(maxsize=1)
def test_set() -> tuple[np.ndarray, np.ndarray]:
    x, y = data.load_test()
    return x.numpy(), y.numpy()


@functools.lru_cache(maxsize=2)
def train_set(n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = data.load_train(n, source)
    return x.numpy(), y.numpy()


def from_canvas(rgba: np.ndarray) -> Optional[torch.Tensor]:
    """A drawing canvas's (H, W, 4) uint8 RGBA -> (1, 28, 28), or None if nothing is drawn yet."""
    from PIL import Image
    a = np.asarray(rgba)
    if a.ndim != 3 or a.shape[2] != 4:
        raise UserError(f"canvas: expected an RGBA image, got shape {a.shape}")
    if a[..., 3].max() == 0 or a[..., :3].max() == 0:  # untouched: transparent, or the black background
        return None
    return images.preprocess_array(images.to_gray(Image.fromarray(a.astype(np.uint8), "RGBA")), "drawing")


def from_upload(name: str, blob: bytes) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """An uploaded file -> (model input (1, 28, 28), grayscale preview (H, W) or None for .npy).
    The image is decoded once for both."""
    if name.lower().endswith(".npy"):
        return images.load_npy(blob, name), None
    gray = images.to_gray(images.open_image(blob, name))
    return images.preprocess_array(gray, name), np.clip(gray, 0, 1)


def _sample(run: Run, seed: int, cb: Callback) -> dict:
    from engine.sampling import sample
    x = sample(run.model(), (1, 1, 28, 28), method="ode", seed=seed, sigma=run.preset.sigma, eps=run.preset.t_eps,
               callback=lambda i: cb({"stage": "sampling", "i": i.get("i", 0), "n": i.get("n")}))[0]
    return {"x": data.quantize(x.clamp(0, 1)).numpy()}


def sample_job(run: Run, seed: int, owner: Optional[str] = None):
    """One generated digit (1, 28, 28) from the run's model, fixed by `seed` (probability-flow
    ODE), in a worker process: the server never runs the network itself. `owner` as for `bpd_job`."""
    return jobs().submit(make_key("sample", run.digest, None, {"seed": seed}), functools.partial(_sample, run, seed),
                         label="generating a sample", lane="interactive", owner=owner)


# ---------------------------------------------------------------- computations

def _bpd(run: Run, x: torch.Tensor, cb: Callback) -> dict:
    from engine.bpd import run_bpd
    b, _ = run_bpd(run, x[None], callback=lambda i: cb({"stage": "likelihood", "i": i["i"], "n": i["n"]}))
    return {"bpd": float(b[0])}


def bpd_job(run: Run, x: torch.Tensor, owner: Optional[str] = None):
    """Exact BPD of one image (1, 28, 28) under the run's model. `owner`: the session asking
    (the job stops when its owners release it, webapp.jobs.Jobs.release); None: run to the end."""
    return jobs().submit(make_key("bpd", run.digest, x.numpy(), run.preset.likelihood_kwargs),
                         functools.partial(_bpd, run, x), label="bits/dim", lane="interactive", owner=owner)


def install_shipped(run: Run) -> list[str]:
    """Copy the representations shipped in the repository for this run's config into its folder
    (engine.precompute.shipped), once per server process; their weights are checked at load."""
    return _install(str(run.path), run.digest)


@functools.lru_cache(maxsize=4)
def _install(run_path: str, run_digest: str) -> list[str]:
    from engine.precompute import shipped
    from engine.store import load_run as _load
    root = os.environ.get("APP_SHIPPED")  # the folder of shipped representations (default: shipped/)
    return shipped.install(_load(run_path), Path(root) if root else None)


def _mtime(run: Run, name: str) -> int:
    """The representation file's version (what its per-file memos are keyed by)."""
    from engine.precompute import representation
    return (representation.folder(run) / f"{name}.npz").stat().st_mtime_ns


def precomputed(run: Run) -> tuple[Optional[str], Optional[str]]:
    """(the run's precomputed representation that passed its checks, or None; a one-line reason
    when one exists but is refused, else None). Checked once per file version."""
    from engine.precompute import representation
    name = representation.default(run)
    if name is None:
        return None, None
    return _checked(str(run.path), name, _mtime(run, name))[:2]


def precomputed_verified(run: Run) -> Optional[str]:
    """How the run's precomputed representation was verified against its weights (the checksum,
    or, for a file made on another kind of CPU, its recomputed query gradient), None without one."""
    from engine.precompute import representation
    name = representation.default(run)
    return None if name is None else _checked(str(run.path), name, _mtime(run, name))[2]


@functools.lru_cache(maxsize=8)
def _checked(run_path: str, name: str, mtime_ns: int) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(name or None, why it is refused or None, how it was verified or None). The first check of a
    file made on another kind of CPU recomputes one query gradient (about 20 s on `cpu`); its
    outcome is kept beside the file (engine.precompute.representation)."""
    from engine.precompute import representation
    from engine.store import load_run as _load
    try:
        rep = representation.load(_load(run_path), name)
        return name, None, rep.info.get("verified")
    except UserError as e:  # never used: the replay takes over, and the page says why
        return None, f"the precomputed replay is not used: {e}", None


def _attribution_key(run: Run, x: torch.Tensor, method: str) -> str:
    return make_key("attribution", run.digest, x.numpy(), {**run.preset.likelihood_kwargs, "method": method})


def attribution_key(run: Run, x: torch.Tensor) -> str:
    name, _ = precomputed(run)
    return _attribution_key(run, x, f"precomputed:{name}" if name else "replay")


# how often an exact replay reports its partial sum to the page (engine.attribution.progressive)
PARTIAL_REPORTS = 20


def _attribution(run: Run, x: torch.Tensor, replay: bool, cb: Callback) -> dict:
    from engine.attribution import attribute_auto
    t0 = time.perf_counter()
    last = {}

    def report(info: dict) -> None:
        # the latest partial sum goes with every later report: a report overwrites the one before
        # it between two polls, so a partial sent once could be missed (webapp.jobs.Job.update)
        if "grad_w" in info:
            last["partial"] = {"grad_w": np.asarray(info["grad_w"])[0], "i": info["i"], "n": info["n"]}
        cb({**{k: v for k, v in info.items() if k != "grad_w"}, **last})
    gw, bpd, method = attribute_auto(run, x[None], callback=report, replay=replay,
                                     partial_every=max(1, run.preset.steps // PARTIAL_REPORTS) if replay else None)
    # the computation's own time, in the worker: the page shows it beside the wait a visitor sees
    return {"grad_w": gw[0], "bpd": float(bpd[0]), "method": method, "seconds": time.perf_counter() - t0}


def attribution_job(run: Run, x: torch.Tensor, owner: Optional[str] = None):
    """MAGIC scores grad_w (n,), the BPD of one image (1, 28, 28) and how they were made: from
    the run's precomputed replay when it has a valid one, else by a replay of training. `owner`
    as for `bpd_job`."""
    name, _ = precomputed(run)
    # from a representation it is one BPD with its gradient (seconds): the interactive lane, never
    # queued behind the galleries or a replay; a replay (minutes) is the visitor's own, never queued
    # behind the galleries either
    return jobs().submit(attribution_key(run, x), functools.partial(_attribution, run, x, name is None),
                         label="attribution" if name is None else "bits/dim and influences (precomputed replay)",
                         lane="requested" if name is None else "interactive", owner=owner)


def known_attribution(run: Run, x: torch.Tensor):
    """The job that attributes x (1, 28, 28), or None when nothing was asked; starts nothing.
    A finished one first (the exact replay's before a representation's preview), then a running
    one, then a failed one (so that its error shows)."""
    found = [j for j in (jobs().peek(replay_key(run, x)), jobs().peek(attribution_key(run, x))) if j is not None]
    found.sort(key=lambda j: 2 if j.error else 0 if j.done else 1)  # stable: the exact one first within a rank
    return found[0] if found else None


def replay_key(run: Run, x: torch.Tensor) -> str:
    return _attribution_key(run, x, "replay")


def replay_job(run: Run, x: torch.Tensor, owner: Optional[str] = None):
    """Exact MAGIC of one image by a replay of training, whatever representation the run has: what
    replaces an approximate representation's preview when it lands. `owner` as for `bpd_job`."""
    return jobs().submit(replay_key(run, x), functools.partial(_attribution, run, x, True),
                         label="exact replay (it will replace the preview)", lane="requested", owner=owner)


def gallery_queries() -> list[int]:
    """The curated test queries whose attributions are precomputed (APP_GALLERY_QUERIES, read
    when asked, so that a test or a restart can change it)."""
    return data.query_indices(setting("APP_GALLERY_QUERIES"), seed=0)


def _galleries(run: Run, q: list[int], replay: bool, cb: Callback) -> dict:
    res = galleries_computed(run, q, replay, cb)
    _remember_digits(run, res)
    return res


def galleries_computed(run: Run, q: list[int], replay: bool, cb: Callback) -> dict:
    """The galleries' result {grad_w (Q, n), bpd (Q,), queries, method} for test digits `q`: from the
    run's representation unless `replay` (then one batched sweep, or chunks on APP_EXECUTOR)."""
    from engine.attribution import attribute, attribute_many
    x = torch.from_numpy(test_set()[0][q])
    if not replay and precomputed(run)[0] is not None:  # from the representation: no replay at all
        from engine.attribution import attribute_auto
        # progress in digits done (each is one BPD with its gradient), not ODE steps of the current one
        gw, bpd, method = attribute_auto(run, x, callback=lambda i: cb({"stage": "test digits done",
                                                                        "i": i.get("query", 0), "n": len(q)}))
    elif setting("APP_EXECUTOR") == "local":
        gw, bpd = attribute(run, x, callback=cb)  # one batched sweep in this worker
        method = "replay"
    else:  # chunks of queries as jobs on a cluster; finished chunks survive a restart
        from engine.executor import make_executor
        ex = make_executor(setting("APP_EXECUTOR"), address=os.environ.get("APP_RAY_ADDRESS"))
        parts = Path(os.environ.get("APP_CACHE", "runs/cache")) / "parts" / run.digest[:16]
        gw, bpd = attribute_many(run, x, parts, ex, chunk=setting("APP_CHUNK"), callback=cb)
        method = "replay"
    return {"grad_w": gw, "bpd": bpd, "queries": q, "method": method}


def _remember_digits(run: Run, res: dict) -> None:
    """Each gallery digit's attribution, ready on every page under the key of what made it."""
    x = torch.from_numpy(test_set()[0][res["queries"]])
    for i in range(len(x)):
        jobs().memo.set(_attribution_key(run, x[i], res["method"]),
                        {"grad_w": res["grad_w"][i], "bpd": float(res["bpd"][i]), "method": res["method"]})


def _galleries_key(run: Run, method: str) -> str:
    return make_key("galleries", run.digest, np.array(gallery_queries()), {**run.preset.likelihood_kwargs,
                                                                            "method": method})


def galleries_key(run: Run) -> str:
    """The galleries job's key: the run, the curated queries, the likelihood settings and what
    computes them now (the run's representation, else the replay)."""
    name, _ = precomputed(run)
    return _galleries_key(run, f"precomputed:{name}" if name else "replay")


def _galleries_found(run: Run):
    """The galleries job to show: the replay's (exact) when one was made or is under way, since a
    representation that came later does not improve on it; else the current method's; or None."""
    exact = jobs().peek(_galleries_key(run, "replay"))
    if exact is not None and not exact.error:
        return exact
    return jobs().peek(galleries_key(run))


def galleries_job(run: Run):
    """grad_w (Q, n) and BPD (Q,) of the curated test queries (from the representation, else in
    one batched sweep of the replay), and the method that made them."""
    found = _galleries_found(run)
    if found is not None:
        return found
    name = precomputed(run)[0]
    if name is not None:  # shipped beside the representation: into the memo, where the job finds them
        _take_shipped_galleries(run, name)
    replay = name is None
    return jobs().submit(galleries_key(run), functools.partial(_galleries, run, gallery_queries(), replay),
                         label="precomputing the galleries")


def _take_shipped_galleries(run: Run, name: str) -> None:
    """Put the galleries shipped for representation `name` (webapp.shipped_galleries) in the memo
    under the galleries job's key, if they match this run; else log why they are not used."""
    import logging
    from webapp import shipped_galleries
    root = os.environ.get("APP_SHIPPED")
    res, why = shipped_galleries.load(run, name, gallery_queries(), Path(root) if root else None)
    if why:
        logging.getLogger("webapp").warning(why)
    if res is not None:
        _remember_digits(run, res)
        jobs().memo.set(galleries_key(run), res)


def gallery_mean(run: Run) -> Optional[tuple[np.ndarray, int]]:
    """(mean grad_w over many test digits (n,), their count): the gallery's digits once they are
    computed, before that the plain test digits of the run's query basis (their columns of A are
    their exact attributions, so they come with the representation); else None. Starts nothing."""
    job = _galleries_found(run)
    if job is not None and job.done and not job.error:
        gw = np.asarray(job.result["grad_w"])
        return gw.mean(0), len(gw)
    digits = basis_digits(run)
    return None if digits is None else (digits[0].mean(0), len(digits[1]))


def basis_digits(run: Run) -> Optional[tuple[np.ndarray, list[int]]]:
    """(grad_w (m, n), their test indices): the plain test digits of the run's query basis, whose
    columns of A are their exact attributions, so they come with the representation (what the
    Galleries page shows until its own digits are computed); None without a basis."""
    name, _ = precomputed(run)
    if name is None or not name.startswith("basis"):
        return None
    return _basis_digits(str(run.path), name, _mtime(run, name))


@functools.lru_cache(maxsize=4)
def _basis_digits(run_path: str, name: str, mtime_ns: int) -> Optional[tuple[np.ndarray, list[int]]]:
    from engine.precompute import basis, representation
    from engine.store import load_run as _load
    rep = representation.load(_load(run_path), name)
    cols = basis.digit_columns(rep)
    if not cols:
        return None
    return np.ascontiguousarray(rep.a[:, cols].T), [int(str(rep.info["images"][j]).split(":")[1]) for j in cols]
