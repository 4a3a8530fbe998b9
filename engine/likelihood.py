"""Exact log-likelihood and bits/dim through the probability-flow ODE (Song et al. 2021, App. D.2).

    dx/dt = -1/2 g(t)^2 score(x, t),        t from eps to 1,
    log p_eps(x) = log N(x(1); 0, s(1)^2 I) + integral_eps^1 div(dx/dt) dt.

The divergence is exact: all D diagonal Jacobian entries, by forward-mode JVPs with basis
tangents. Because the network treats samples independently (GroupNorm, no BatchNorm), the
tangent e_i replicated over a batch of B images gives the i-th diagonal entry of every image
at once, so a chunk of C tangents is one network call on C*B inputs (or, for a model with a
`forward_with_tangents(x, t, v)` method such as `engine.model.ScoreNet`, one primal pass on the
B inputs with the C tangents pushed through it; with a `jacobian_diagonal(x, t, idx)` method,
each tangent is computed at full resolution only where its entry needs it). Each chunk runs inside a
non-reentrant checkpoint: torch.func's forward mode works there (its reverse mode does not),
so memory is one chunk's graph plus the ODE states, and the result stays differentiable
w.r.t. everything `score_fn` closes over (the model's parameters).

The ODE is solved by torchdiffeq in the variable u = log s(t), on a fixed grid evenly spaced
in u (deterministic and smooth in the parameters, which the metagradient needs). In u the
solution is smooth across the ~3.5 decades that s(t) spans, so RK4's stages are spent where
the dynamics are, not only its grid points (measured on Gaussian data: 8 RK4 steps, 0.02
bits/dim error with the stages in t, far less in u), and we backpropagate through the
discretized solve rather than using odeint_adjoint (whose VE-SDE gradients were far off).
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint
from torchdiffeq import odeint

from engine import sde

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# RK4 on 8 steps evenly spaced in log s(t): chosen by measuring against dopri5 at
# rtol=atol=1e-5 on trained models (benchmarks/grid_error.py; numbers in the README).
DEFAULT_STEPS = 8
DEFAULT_METHOD = "rk4"
# Tangent inputs per network call for a network without `jacobian_diagonal` (every tangent a
# whole image through every layer): measured on 2 CPU cores (cpu preset), ~196 inputs per call
# was fastest (0.37 s per evaluation and image; 0.41 s at 98, 0.64 s at 28; 8 images x 98
# tangents at once ran 2x slower per image than one image). So chunk = TANGENT_BATCH // B.
TANGENT_BATCH = 196
# On a GPU the network calls are launch-bound at these sizes: all D tangents of an image in one
# call (784 on MNIST) is 3.5x faster than 196 on an H200 with the `gpu` net, where on 2 CPU cores
# it was then 1.17x slower (benchmarks/bench_tangent_batch.py; results/bench_tangent_batch_h200.txt,
# and bench_tangent_batch_cpu.txt as first written at c2987db, before `jacobian_diagonal`).
GPU_TANGENT_BATCH = 784
# A network with `jacobian_diagonal` (engine.model.ScoreNet) carries each tangent as a small
# window around its pixel, so most of a call is what every tangent shares (the primal pass, the
# maps GroupNorm adds): fewer, larger calls win on the CPU too. 784 against 196 on 2 CPU cores,
# `cpu` net: see results/bench_tangent_batch_cpu.txt (a BPD and a BPD with its gradient).
DIAGONAL_TANGENT_BATCH = 784


def _chunk(x: torch.Tensor, chunk: Optional[int], score_fn: Optional[ScoreFn] = None) -> int:
    """Tangents per network call for inputs x (B, *S): `chunk` if given, else the default batch
    for score_fn's kind of network and x's device, divided by B; at least 1, at most D."""
    b, d = x.shape[0], x[0].numel()
    if not chunk:
        diagonal = score_fn is not None and hasattr(score_fn, "jacobian_diagonal")
        chunk = (GPU_TANGENT_BATCH if x.is_cuda else DIAGONAL_TANGENT_BATCH if diagonal else TANGENT_BATCH) // b
    return max(1, min(chunk, d))


def exact_divergence(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, chunk: Optional[int] = None,
                     use_checkpoint: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and exact divergence of the score.

    Args:
        x: (B, *S) inputs; t: (B,) times.
    Returns:
        score (B, *S) and div_x score (B,) = sum_i d score_i / d x_i.
    """
    b = x.shape[0]
    d = x[0].numel()
    chunk = _chunk(x, chunk, score_fn)
    score = None
    div = x.new_zeros(b)
    for start in range(0, d, chunk):
        c = min(chunk, d - start)
        if use_checkpoint and torch.is_grad_enabled():
            s, dv = checkpoint(_diag_chunk, score_fn, x, t, start, c, use_reentrant=False)
        else:
            s, dv = _diag_chunk(score_fn, x, t, start, c)
        score = s if score is None else score
        div = div + dv
    return score, div


def _diag_chunk(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, start: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal Jacobian entries start..start+c-1 of every sample: x (B, *S) -> score (B, *S), (B,)."""
    b = x.shape[0]
    d = x[0].numel()
    idx = torch.arange(start, start + c, device=x.device)
    diagonal = getattr(score_fn, "jacobian_diagonal", None)
    if diagonal is not None:  # a model that computes only the entries asked for (engine.model.ScoreNet)
        out, entries = diagonal(x, t, idx)
        return out, entries.sum(0)
    tangent = torch.zeros(c, b, d, dtype=x.dtype, device=x.device)
    rows = torch.arange(c, device=x.device)
    tangent[rows, :, idx] = 1.0
    fast = getattr(score_fn, "forward_with_tangents", None)
    if fast is not None:  # a model that propagates many tangents past one primal pass
        out, jv = fast(x, t, tangent.reshape(c, *x.shape))
        return out, jv.reshape(c, b, d)[rows, :, idx].sum(0)
    x_rep = x.repeat(c, *([1] * (x.dim() - 1)))  # (c*B, *S): block j is the whole batch
    t_rep = t.repeat(c)
    out, jv = torch.func.jvp(lambda z: score_fn(z, t_rep), (x_rep,), (tangent.reshape(x_rep.shape),))
    diag = jv.reshape(c, b, d)[rows, :, idx]  # (c, B)
    return out.reshape(c, *x.shape)[0], diag.sum(0)


def hutchinson_divergence(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, n_probes: int,
                          generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and the Skilling-Hutchinson estimate E[v^T J v] with Rademacher v; for comparison only."""
    b = x.shape[0]
    v = torch.randint(0, 2, (n_probes, *x.shape), generator=generator, device=x.device).to(x.dtype) * 2 - 1
    x_rep = x.repeat(n_probes, *([1] * (x.dim() - 1)))
    t_rep = t.repeat(n_probes)
    out, jv = torch.func.jvp(lambda z: score_fn(z, t_rep), (x_rep,), (v.reshape(x_rep.shape),))
    est = (jv.reshape(n_probes, b, -1) * v.reshape(n_probes, b, -1)).sum(-1).mean(0)
    return out.reshape(n_probes, *x.shape)[0], est


def log_likelihood(score_fn: ScoreFn, x: torch.Tensor, *, sigma: float = sde.SIGMA, eps: float = sde.EPS,
                   n_steps: int = DEFAULT_STEPS, method: str = DEFAULT_METHOD, chunk: Optional[int] = None,
                   divergence: str = "exact", n_probes: int = 1, generator: Optional[torch.Generator] = None,
                   rtol: float = 1e-5, atol: float = 1e-5, callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """log p(x) in nats per image through the probability-flow ODE.

    Args:
        score_fn: (B, *S) inputs and (B,) times -> (B, *S) scores.
        x: (B, *S) data points, e.g. (B, 1, 28, 28) images in [0, 1].
        n_steps, method: fixed-grid torchdiffeq solver ("rk4", "midpoint", "euler") on a grid of
            n_steps evenly spaced in log s(t); an adaptive method ("dopri5") uses rtol/atol instead.
        chunk: basis tangents per checkpointed network call in the exact divergence
            (default: see `_chunk`; TANGENT_BATCH // B on the CPU for a network without
            `jacobian_diagonal`).
        divergence: "exact", or "hutchinson" (n_probes Rademacher probes from `generator`).
        callback: called after each function evaluation with {"i", "n", "t"} (n is None for adaptive).
    Returns:
        (B,) log-densities, differentiable w.r.t. x and anything score_fn closes over.
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', not {divergence!r}")
    b = x.shape[0]
    fixed = method in ("rk4", "midpoint", "euler", "explicit_adams", "implicit_adams")
    evals_per_step = {"rk4": 4, "midpoint": 2, "euler": 1}.get(method)
    n_evals = n_steps * evals_per_step if fixed and evals_per_step else None
    counter = [0]
    if divergence == "hutchinson" and generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)

    def drift(u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # In u = log s(t), since d(s^2)/dt = g(t)^2: dx/du = (dx/dt)(dt/du) = -s^2 score(x, t(u)).
        xt = state[0]
        s = torch.exp(u.to(x.dtype))
        tb = sde.time_of_std(s, sigma).expand(b)
        if divergence == "exact":
            score, div = exact_divergence(score_fn, xt, tb, chunk)
        else:
            score, div = hutchinson_divergence(score_fn, xt, tb, n_probes, generator)
        counter[0] += 1
        if callback is not None:
            callback({"i": counter[0], "n": n_evals, "t": float(tb[0])})
        return -s**2 * score, -s**2 * div

    state0 = (x, x.new_zeros(b))
    grid = sde.log_std_grid(n_steps if fixed else 1, eps, sigma).to(device=x.device, dtype=x.dtype)
    if fixed:
        xs, dlogp = odeint(drift, state0, grid, method=method)
    else:
        xs, dlogp = odeint(drift, state0, grid, method=method, rtol=rtol, atol=atol)
    return sde.prior_logp(xs[-1], sigma) + dlogp[-1]


FIXED_METHODS = ("rk4", "midpoint", "euler")


def log_likelihood_and_grad(score_fn: ScoreFn, x: torch.Tensor, params: Sequence[torch.Tensor], *,
                            sigma: float = sde.SIGMA, eps: float = sde.EPS, n_steps: int = DEFAULT_STEPS,
                            method: str = DEFAULT_METHOD, chunk: Optional[int] = None,
                            callback: Optional[Callable[[dict], None]] = None, workers: Optional[int] = None
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """log p(x) with the exact divergence, and d sum(log p) / d params, without checkpoint recomputation.

    Backpropagating through `log_likelihood` recomputes every checkpointed divergence chunk and
    then differentiates it (about 5x the likelihood's time). But on a fixed grid the path x(u)
    needs only the score; the divergence enters the result linearly:

        log p = prior(x_N) + sum_k c_k div(x_k, u_k),

    with constants c_k (the solver's quadrature weights times -s^2) and x_k the solver's stage
    points. So phase 1 integrates x alone with its (small) graph, one primal network pass per
    evaluation, and reads the c_k off by differentiating the log-density state with respect to
    a placeholder per evaluation (so the weights are exactly torchdiffeq's, whatever the fixed
    method). Phase 2 computes each div(x_k) chunk with its graph and differentiates it at once
    (w.r.t. params and x_k): one forward and one backward per chunk, no recomputation. Last, the
    x_k-gradients are pulled back through phase 1's graph with the prior's. Same values as
    `log_likelihood` up to summation order.

    Phase 2's pieces (one chunk of one evaluation) are independent of one another, so `workers`
    threads compute them, as many pieces at once, each on one torch thread: torch's own threads
    barely speed up these small convolutions (a BPD with its gradient on the `cpu` default, 2
    cores: 6.50 s on 2 torch threads against 6.35 s on 1, results/bench_lane_threads.txt at
    25ef6cf; with 2 workers 3.86 s against 6.30 s, the same file at 28144fb; 2.50 s against
    4.35 s with 784 tangents a call, the file as it is).
    Each worker sums its pieces in a fixed order and the sums are added in worker order, so the
    same number of workers gives the same bits; one worker sums exactly as a plain loop.

    Args:
        x: (B, *S) data points; params: the tensors to differentiate (score_fn's parameters).
        method: a fixed-grid method ("rk4", "midpoint", "euler").
        callback: called after each piece of phase 2 (one chunk of one evaluation) with
            {"i": pieces done, "n": pieces}, in the calling thread; an exception it raises stops
            the workers and propagates.
        workers: threads for phase 2 (None: torch.get_num_threads(), the cores torch was given);
            one for a score function without its own tangent code (torch.func.jvp's forward-AD
            levels are global to the process).
    Returns:
        (B,) log-densities (detached) and one gradient per param (zeros where unused).
    """
    if method not in FIXED_METHODS:
        raise ValueError(f"log_likelihood_and_grad needs a fixed-grid method {FIXED_METHODS}, not {method!r}")
    b, d = x.shape[0], x[0].numel()
    chunk = _chunk(x, chunk, score_fn)
    stages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (x_k, t_k, placeholder)
    params = list(params)

    def drift(u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xt = state[0]
        s = torch.exp(u.to(x.dtype))
        tb = sde.time_of_std(s, sigma).expand(b)
        hole = x.new_zeros(b, requires_grad=True)  # stands for div(x_k); its weight is read off below
        stages.append((xt, tb, hole))
        return -s**2 * score_fn(xt, tb), -s**2 * hole

    grid = sde.log_std_grid(n_steps, eps, sigma).to(device=x.device, dtype=x.dtype)
    with torch.enable_grad():
        xs, z = odeint(drift, (x.detach(), x.new_zeros(b)), grid, method=method)
        # c_k (B,) each; None for an evaluation that does not reach the result (then skipped)
        weights = torch.autograd.grad(z[-1].sum(), [h for _, _, h in stages], retain_graph=True, allow_unused=True)
        prior = sde.prior_logp(xs[-1], sigma)
    # every (evaluation, chunk) piece is independent of the others given the path
    pieces = [(k, start) for k, ck in enumerate(weights) if ck is not None for start in range(0, d, chunk)]
    div_sum, grads, gx = _divergence_pieces(score_fn, stages, weights, params, d, chunk, pieces,
                                            _workers(workers, len(pieces), score_fn), callback)
    x_grads = [gx.get(k, torch.zeros_like(xk)) for k, (xk, _, _) in enumerate(stages)]
    with torch.enable_grad():
        # the path's dependence on params: through the prior at x_N and through every x_k
        total = prior.sum() + sum((gx * xk).sum() for gx, (xk, _, _) in zip(x_grads, stages))
        g = torch.autograd.grad(total, params, allow_unused=True)
    grads = [a if gi is None else a + gi for a, gi in zip(grads, g)]
    return prior.detach() + div_sum, grads


def _workers(workers: Optional[int], pieces: int, score_fn: ScoreFn) -> int:
    if not (hasattr(score_fn, "jacobian_diagonal") or hasattr(score_fn, "forward_with_tangents")):
        return 1  # torch.func.jvp's forward-AD levels are global to the process: one thread only
    return max(1, min(pieces, torch.get_num_threads() if workers is None else int(workers)))


class _Stopped(Exception):
    """Tells a phase-2 worker to stop: the calling thread's callback raised."""


def _divergence_pieces(score_fn: ScoreFn, stages: list, weights: Sequence, params: list, d: int, chunk: int,
                       pieces: list[tuple[int, int]], workers: int, callback: Optional[Callable[[dict], None]]
                       ) -> tuple[torch.Tensor, list[torch.Tensor], dict[int, torch.Tensor]]:
    """Phase 2 of `log_likelihood_and_grad`: over `pieces` (k, start), the sum of c_k times the
    divergence terms of x_k's chunk at `start` (B,), its gradient w.r.t. each param, and w.r.t.
    each x_k (a dict by k). Worker w takes pieces w, w + workers, ...; on one torch thread each,
    whatever the calling thread's count (which its callback may change meanwhile, as the app's
    workers do)."""
    b = stages[0][0].shape[0]
    n = len(pieces)

    def work(mine: list[tuple[int, int]], report: Callable[[], None]):
        div, grads, gx = stages[0][0].new_zeros(b), [torch.zeros_like(p) for p in params], {}
        for k, start in mine:
            xk, tk, _ = stages[k]
            leaf = xk.detach().requires_grad_(True)
            with torch.enable_grad():  # (grad mode is per thread)
                _, dv = _diag_chunk(score_fn, leaf, tk, start, min(chunk, d - start))
                term = weights[k] * dv
                g = torch.autograd.grad(term.sum(), [leaf, *params], allow_unused=True)
            div = div + term.detach()
            gx[k] = g[0] if k not in gx else gx[k] + g[0]
            grads = [a if gi is None else a + gi for a, gi in zip(grads, g[1:])]
            report()
        return div, grads, gx

    if workers == 1:
        count = iter(range(1, n + 1))
        return work(pieces, lambda: callback and callback({"i": next(count), "n": n}))

    progress: queue.Queue = queue.Queue()
    stop = threading.Event()
    results: list = [None] * workers
    errors: list[BaseException] = []

    def report() -> None:
        if stop.is_set():
            raise _Stopped
        progress.put(True)

    def run(w: int) -> None:
        try:
            torch.set_num_threads(1)  # this thread's own OpenMP count: `workers` pieces at once, no more
            results[w] = work(pieces[w::workers], report)
        except BaseException as e:  # raised again in the calling thread
            errors.append(e)
            stop.set()
        finally:
            progress.put(False)  # this worker has finished

    pool = [threading.Thread(target=run, args=(w,), daemon=True, name=f"divergence {w}") for w in range(workers)]
    for t in pool:
        t.start()
    try:
        i, running = 0, workers
        while running:
            if progress.get():
                i += 1
                if callback is not None and not stop.is_set():
                    callback({"i": i, "n": n})
            else:
                running -= 1
    except BaseException:
        stop.set()
        raise
    finally:
        for t in pool:
            t.join()
        # the count is per thread (OpenMP), so the caller's is untouched; but the workers' calls
        # also set the default that threads started later take up: back to the caller's count
        torch.set_num_threads(torch.get_num_threads())
    failed = [e for e in errors if not isinstance(e, _Stopped)]
    if failed:
        raise failed[0]
    div, grads, gx = results[0]
    for div_w, grads_w, gx_w in results[1:]:
        div = div + div_w
        grads = [a + c for a, c in zip(grads, grads_w)]
        for k, v in gx_w.items():
            gx[k] = v if k not in gx else gx[k] + v
    return div, grads, gx


def bits_per_dim_and_grad(score_fn: ScoreFn, x: torch.Tensor, params: Sequence[torch.Tensor], **kwargs
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Bits/dim (B,) and d sum(bits/dim) / d params by `log_likelihood_and_grad` (same keywords)."""
    scale = -1.0 / (x[0].numel() * math.log(2))
    logp, grads = log_likelihood_and_grad(score_fn, x, params, **kwargs)
    return logp * scale + 8.0, [g * scale for g in grads]


def bits_per_dim(score_fn: ScoreFn, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bits/dim = -log p(x) / (D ln 2) + 8: (B, *S) -> (B,).

    The +8 turns a density on [0,1]^D into bits per 8-bit pixel (x is taken as pixel/255,
    without dequantization noise). Keyword arguments are those of `log_likelihood`.
    """
    d = x[0].numel()
    return -log_likelihood(score_fn, x, **kwargs) / (d * math.log(2)) + 8.0
