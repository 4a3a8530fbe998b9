"""The exact likelihood against closed forms, brute force and finite differences."""

import math

import pytest
import torch

from engine import likelihood as L
from engine.model import build_model

D = 64  # Gaussian tests run on (B, 1, 8, 8)


def test_gaussian_loglik_matches_closed_form(gaussian):
    x = gaussian.sample(4, torch.Generator().manual_seed(1)).reshape(4, 1, 8, 8)
    got = L.log_likelihood(gaussian.score, x, n_steps=32)
    want = gaussian.ode_log_likelihood(x)
    err_bits = ((got - want) / (D * math.log(2))).abs().max().item()
    assert err_bits < 1e-3, err_bits
    bpd = L.bits_per_dim(gaussian.score, x, n_steps=32)
    assert torch.allclose(bpd, -want / (D * math.log(2)) + 8, atol=1e-3)


def test_gaussian_loglik_adaptive_reference(gaussian):
    x = gaussian.sample(2, torch.Generator().manual_seed(2)).reshape(2, 1, 8, 8)
    got = L.log_likelihood(gaussian.score, x, method="dopri5", rtol=1e-7, atol=1e-7)
    assert ((got - gaussian.ode_log_likelihood(x)) / (D * math.log(2))).abs().max() < 1e-4


def test_gradient_wrt_gaussian_parameters_matches_closed_form(gaussian):
    mu = gaussian.mu.clone().requires_grad_(True)
    log_s = gaussian.log_s.clone().requires_grad_(True)
    g = type(gaussian)(mu, log_s)
    x = gaussian.sample(3, torch.Generator().manual_seed(3)).reshape(3, 1, 8, 8)
    got = torch.autograd.grad(L.bits_per_dim(g.score, x, n_steps=32).sum(), (mu, log_s))
    want = torch.autograd.grad((-g.ode_log_likelihood(x) / (D * math.log(2))).sum(), (mu, log_s))
    for a, b in zip(got, want):
        assert (a - b).norm() / b.norm() < 2e-3, ((a - b).norm() / b.norm()).item()


@pytest.fixture
def net():
    # float64 for clean finite differences; the network is fully convolutional, so these
    # brute-force checks run on 8x8 images (D = 64): CPU convolutions in float64 are slow.
    return build_model((8, 16), 16, 4, seed=0).double()


def _img(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_exact_divergence_equals_trace_of_full_jacobian(net):
    x = _img(3)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    _, fast = L.exact_divergence(net, x, t, chunk=24)
    _, generic = L.exact_divergence(lambda a, b: net(a, b), x, t, chunk=10)  # torch.func.jvp path
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda z: net(z, t[i: i + 1]).reshape(-1), x[i: i + 1]).reshape(64, 64)
        tr = torch.trace(jac)
        assert torch.allclose(fast[i], tr, rtol=1e-10), (fast[i], tr)
        assert torch.allclose(generic[i], tr, rtol=1e-10)


def test_forward_with_tangents_matches_torch_func_jvp(net):
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    v = torch.randn(3, 2, 1, 28, 28, dtype=torch.float64)  # full size: odd sizes (7 -> 14) matter here
    out, jv = net.forward_with_tangents(x, t, v)
    params = list(net.parameters())
    for j in range(3):
        o, want = torch.func.jvp(lambda z: net(z, t), (x,), (v[j],))
        assert torch.allclose(out, o, atol=1e-12)
        assert torch.allclose(jv[j], want, atol=1e-10)
        # and its gradient w.r.t. the parameters (hand-written backwards inside) against autograd's
        g1 = torch.autograd.grad((jv[j] * x).sum(), params, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad((want * x).sum(), params, allow_unused=True)
        for a, b, p in zip(g1, g2, params):  # None: the parameter does not reach J v (the output bias)
            a, b = (torch.zeros_like(p) if u is None else u for u in (a, b))
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_jacobian_diagonal_parameter_gradient_is_bit_identical_from_run_to_run():
    # the app's shipped representation and the precompute's resumable chunks rely on bit-identical
    # reruns; scatters with atomic adds (an advanced index's backward on CPU, once it is large and
    # runs on several threads) made the last bits wander. The `cpu` default's widths, a full chunk.
    net = build_model((16, 32, 64), 64, 4, seed=0)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    params = list(net.parameters())

    def grad():
        _, diag = net.jacobian_diagonal(x, torch.tensor([0.3]), torch.arange(100, 296))
        return torch.cat([g.flatten() for g in torch.autograd.grad(diag.sum(), params, allow_unused=True) if g is not None])
    first = grad()
    for _ in range(4):
        assert torch.equal(grad(), first)


def test_hand_written_backwards_match_numerical_gradients():
    from engine.model import _NormTangent, _SumsAndWindow
    g = torch.Generator().manual_seed(3)
    dg, xhat, factor = (torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
                        for s in ((3, 2, 4, 5), (2, 4, 5), (2, 4, 5)))
    assert torch.autograd.gradcheck(_NormTangent.apply, (dg, xhat, factor))
    with pytest.raises(RuntimeError):  # first derivatives only, and it says so
        gx = torch.autograd.grad(_NormTangent.apply(dg, xhat, factor).sum(), xhat, create_graph=True)[0]
        torch.autograd.grad(gx.sum(), dg)
    dh = torch.randn(3, 2, 2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    adj = torch.randn(2, 6, 40, dtype=torch.float64, generator=g, requires_grad=True)
    # windows over the edges (clamped rows repeat a position) and inside
    wr, wq = torch.tensor([[-1, 0, 1], [1, 2, 3], [2, 3, 4]]), torch.tensor([[-1, 0, 1], [3, 4, 5], [0, 1, 2]])
    fn = lambda dh, adj: _SumsAndWindow.apply(dh, adj, wr, wq)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dh, adj))
    assert torch.autograd.gradgradcheck(fn, (dh, adj))
    sums, win = fn(dh, adj)
    assert win[0, :, 0].abs().sum() == 0 and win[1, :, :, 2].abs().sum() == 0  # off the grid: zero
    assert torch.equal(win[2, :, 1, 2], dh[2, :, :, 3, 2])


@pytest.mark.parametrize("channels, size", [((8, 16), 28), ((8, 16, 16), 28), ((8, 16), 13), ((8, 8, 16), 13),
                                           ((8, 8, 16, 16), 28)])
def test_jacobian_diagonal_matches_forward_with_tangents_with_its_parameter_gradient(channels, size):
    # border pixels (zero padding; both parities of row and column, which read different kernel
    # taps of the first stride-2 conv and of the last transposed conv) and interior ones; two, three
    # (the bottleneck in local form) and four levels (whole maps from the third), and odd sizes
    # (13 -> 7 -> 4 -> 7 -> 13: no output padding)
    net = build_model(channels, 16, 4, seed=0).double()
    x = torch.rand(2, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    d = size * size
    idx = torch.tensor([0, size - 1, size, size + 1, d // 2, d // 2 + 1, d - size - 2, d - 1, 3 * size + 4])
    out, diag = net.jacobian_diagonal(x, t, idx)
    v = torch.zeros(len(idx), 2, d, dtype=torch.float64)
    v[torch.arange(len(idx)), :, idx] = 1.0
    out2, jv = net.forward_with_tangents(x, t, v.reshape(len(idx), 2, 1, size, size))
    want = jv.reshape(len(idx), 2, d)[torch.arange(len(idx)), :, idx]
    assert torch.allclose(out, out2, atol=1e-12)
    assert torch.allclose(diag, want, rtol=1e-10, atol=1e-12), (diag - want).abs().max()
    params = list(net.parameters())
    g1 = torch.autograd.grad((diag * torch.arange(1.0, 3.0, dtype=torch.float64)).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad((want * torch.arange(1.0, 3.0, dtype=torch.float64)).sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("channels,start", [((8, 16), 0), ((8, 16, 16), 0), ((8, 8, 16, 16), 0),
                                            ((8, 16, 16), 1), ((8, 8, 16, 16), 3)])
def test_positional_maps_keep_every_tangent_formula_exact(channels, start):
    # the maps are constants in x added where the time embedding is: jacobian_diagonal's local
    # forms and forward_with_tangents must still match torch.func.jvp of the plain forward, and
    # the maps' own gradients (the metagradient needs them) must match autograd's; with
    # positional_from, only the levels from `start` on have a map, of their own size
    net = build_model(channels, 16, 4, seed=0, positional=3.0, positional_from=start).double()
    sizes = [28]
    for _ in channels[1:]:
        sizes.append((sizes[-1] + 1) // 2)
    assert [tuple(p.shape) for p in net.pos] == [(c, n, n) for c, n in list(zip(channels, sizes))[start:]]
    with torch.no_grad():
        for p in net.pos:
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    idx = torch.tensor([0, 27, 28, 29, 392, 393, 754, 783, 88])
    out, diag = net.jacobian_diagonal(x, t, idx)
    v = torch.zeros(len(idx), 2, 784, dtype=torch.float64)
    v[torch.arange(len(idx)), :, idx] = 1.0
    out2, jv = net.forward_with_tangents(x, t, v.reshape(len(idx), 2, 1, 28, 28))
    want = jv.reshape(len(idx), 2, 784)[torch.arange(len(idx)), :, idx]
    for j in (0, 4):
        o, ref = torch.func.jvp(lambda z: net(z, t), (x,), (v[j].reshape(2, 1, 28, 28),))
        assert torch.allclose(o, out, atol=1e-12) and torch.allclose(ref, jv[j], atol=1e-10)
    assert torch.allclose(out, out2, atol=1e-12)
    assert torch.allclose(diag, want, rtol=1e-10, atol=1e-12), (diag - want).abs().max()
    maps = list(net.pos)
    g1 = torch.autograd.grad(diag.sum(), maps)
    g2 = torch.autograd.grad(want.sum(), maps)
    for a, b in zip(g1, g2):
        assert a.abs().max() > 0 and torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # the maps change the score where they are (a net without them gives another function)
    plain = build_model(channels, 16, 4, seed=0).double()
    assert not torch.allclose(plain(x, t), out)
    with torch.no_grad():
        for p in net.pos:
            p.zero_()
    assert torch.allclose(plain(x, t), net(x, t), atol=1e-12)  # zero maps: the same net


def test_bpd_gradient_wrt_network_parameters_matches_finite_differences(net):
    x = _img(2)
    params = [p for p in net.parameters()]
    bpd = L.bits_per_dim(net, x, n_steps=3).sum()
    grads = torch.autograd.grad(bpd, params, allow_unused=True)
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, dirs) if gr is not None)
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, dirs):
            p.add_(h * d)
        up = L.bits_per_dim(net, x, n_steps=3).sum()
        for p, d in zip(params, dirs):
            p.sub_(2 * h * d)
        down = L.bits_per_dim(net, x, n_steps=3).sum()
        for p, d in zip(params, dirs):
            p.add_(h * d)
    fd = (up - down) / (2 * h)
    assert abs(fd - analytic) / abs(fd) < 1e-5, (fd, analytic)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("method", ["rk4", "midpoint"])
def test_two_phase_bpd_gradient_equals_backprop_through_the_solver(net, method, workers):
    # engine.likelihood.bits_per_dim_and_grad (the path engine.bpd takes) against plain autograd
    # through the checkpointed solve, on the network (its fast tangent path) and per image of a
    # batch; its divergence pieces in one thread and split among three (not a divisor of their number)
    x = _img(2)
    params = list(net.parameters())
    want_b = L.bits_per_dim(net, x, n_steps=3, method=method)
    want = torch.autograd.grad(want_b.sum(), params, allow_unused=True)
    got_b, got = L.bits_per_dim_and_grad(net, x, params, n_steps=3, method=method, workers=workers)
    assert torch.allclose(got_b, want_b.detach(), rtol=1e-12)
    for g, w, p in zip(got, want, params):
        w = torch.zeros_like(p) if w is None else w
        assert (g - w).norm() <= 1e-10 * (1 + w.norm()), ((g - w).norm(), w.norm())


class _Stop(Exception):
    pass


def test_divergence_workers_give_the_same_bits_every_time_report_progress_and_stop_when_told(net):
    import threading
    x, params = _img(1), list(net.parameters())
    seen = []
    a = L.bits_per_dim_and_grad(net, x, params, n_steps=3, workers=2, callback=lambda i: seen.append((i["i"], i["n"])))
    b = L.bits_per_dim_and_grad(net, x, params, n_steps=3, workers=2)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))
    n = seen[0][1]
    assert n >= 12 and seen == [(i, n) for i in range(1, n + 1)]  # every piece once, counted in the caller's thread
    threads = torch.get_num_threads()
    calls = []

    def stop(info):  # a cancelled job's callback raises; the workers stop at their next piece
        calls.append(info["i"])
        if info["i"] == 2:
            raise _Stop
    with pytest.raises(_Stop):
        L.bits_per_dim_and_grad(net, x, params, n_steps=3, workers=2, callback=stop)
    assert calls == [1, 2] and torch.get_num_threads() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("divergence")]
    # the workers ran on one torch thread each; a thread started afterwards has the caller's count again
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [threads]


def test_two_phase_gradient_on_a_generic_score_function(gaussian):
    # a score function without forward_with_tangents takes torch.func.jvp; closed-form parameters
    mu = gaussian.mu.clone().requires_grad_(True)
    log_s = gaussian.log_s.clone().requires_grad_(True)
    g = type(gaussian)(mu, log_s)
    x = gaussian.sample(3, torch.Generator().manual_seed(3)).reshape(3, 1, 8, 8)
    want = torch.autograd.grad(L.bits_per_dim(g.score, x, n_steps=6).sum(), (mu, log_s))
    b, got = L.bits_per_dim_and_grad(g.score, x, (mu, log_s), n_steps=6)
    assert torch.allclose(b, L.bits_per_dim(g.score, x, n_steps=6).detach(), rtol=1e-12)
    for a, w in zip(got, want):
        assert (a - w).norm() <= 1e-10 * w.norm()
    with pytest.raises(ValueError, match="fixed-grid"):
        L.bits_per_dim_and_grad(g.score, x, (mu, log_s), method="dopri5")


def test_checkpointed_and_plain_divergence_give_identical_gradients(net):
    x = _img(2)
    t = torch.tensor([0.1, 0.5], dtype=torch.float64)
    params = list(net.parameters())[:-1]  # the output bias does not enter the divergence
    g1 = torch.autograd.grad(L.exact_divergence(net, x, t, chunk=16, use_checkpoint=True)[1].sum(), params)
    g2 = torch.autograd.grad(L.exact_divergence(net, x, t, chunk=16, use_checkpoint=False)[1].sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_hutchinson_is_unbiased_for_the_exact_divergence(net):
    x = _img(1)
    t = torch.tensor([0.3], dtype=torch.float64)
    _, exact = L.exact_divergence(net, x, t)
    _, est = L.hutchinson_divergence(net, x, t, n_probes=2000, generator=torch.Generator().manual_seed(0))
    # Rademacher variance is 2 * sum_{i != j} J_ij^2; compare within 4 standard errors.
    jac = torch.autograd.functional.jacobian(lambda z: net(z, t).reshape(-1), x).reshape(64, 64)
    se = math.sqrt(2 * ((jac**2).sum() - (jac.diagonal() ** 2).sum()).item() / 2000)
    assert abs(est.item() - exact.item()) < 4 * se
