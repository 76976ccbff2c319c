"""Curvature against closed forms and dense Hessians; a small version of Figure 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax.problems import linear, test_function

Z_MAX = 4.0  # the "within 4 standard errors"


def _two_layer_net(params, inputs, targets):
    hidden = jnp.tanh(inputs @ params["layer1"]["w"] + params["layer1"]["b"])
    outputs = hidden @ params["layer2"]["w"] + params["layer2"]["b"]
    return jnp.mean((outputs - targets) ** 2)


def _net_problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "layer1": {"w": jax.random.normal(k1, (4, 6)), "b": 0.1 * jnp.ones(6)},
        "layer2": {"w": jax.random.normal(k2, (6, 2)) / 3, "b": jnp.zeros(2)},
    }
    inputs = jax.random.normal(k3, (16, 4))
    targets = jax.random.normal(k4, (16, 2))
    return params, inputs, targets


def _dense_hessian(fun, params, *args):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return jax.hessian(lambda x: fun(unravel(x), *args))(flat)


def test_hessian_trace_two_layer_net(x64):
    params, inputs, targets = _net_problem()
    expected = jnp.trace(_dense_hessian(_two_layer_net, params, inputs, targets))
    for chunk_size in (None, 1, 7, 1000):
        got = zojax.hessian_trace(_two_layer_net, params, inputs, targets, chunk_size=chunk_size)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    jitted = jax.jit(functools.partial(zojax.hessian_trace, _two_layer_net))
    np.testing.assert_allclose(jitted(params, inputs, targets), expected, rtol=1e-5)


def test_hessian_trace_keyword_arguments(x64):
    fun = lambda p, x, *, scale: scale * jnp.sum(jnp.sin(p * x))
    p, x = jnp.linspace(0.1, 1.0, 5), jnp.arange(5.0)
    expected = jnp.trace(jax.hessian(lambda q: fun(q, x, scale=2.0))(p))
    np.testing.assert_allclose(zojax.hessian_trace(fun, p, x, scale=2.0), expected, rtol=1e-10)


def test_test_function_closed_form(x64):
    params = test_function.init_params(jax.random.key(1), dim=30)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    np.testing.assert_allclose(zojax.hessian_trace(test_function.loss, params),
                               test_function.hessian_trace(params), rtol=1e-10)


def _linear_problem(dense: bool):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(60, 5))
    labels = np.where(rng.normal(size=60) > 0, 1.0, -1.0)
    features, _ = linear.random_features(jax.random.key(2), inputs, num_features=40,
                                         dtype=jnp.float64)
    if dense:
        features = features.dense()
    w = 0.3 * jax.random.normal(jax.random.key(3), (41,), jnp.float64)
    return w, features, jnp.asarray(labels)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("loss, trace", [
    (linear.svm_loss, linear.svm_hessian_trace),
    (linear.logistic_loss, linear.logistic_hessian_trace),
])
def test_linear_model_closed_forms(loss, trace, dense, x64):
    w, features, labels = _linear_problem(dense)
    np.testing.assert_allclose(zojax.hessian_trace(loss, w, features, labels),
                               trace(w, features, labels), rtol=1e-8)


def test_hessian_trace_at_ten_thousand_and_one_parameters():
    """d = 10,001 (the paper's random-feature map): chunked, never a d x d matrix."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(200, 12)).astype(np.float32)
    labels = jnp.asarray(np.where(rng.normal(size=200) > 0, 1.0, -1.0), jnp.float32)
    features, _ = linear.random_features(jax.random.key(0), inputs, num_features=10_000)
    w = linear.init_params(jax.random.key(1), 10_001)
    got = jax.jit(functools.partial(zojax.hessian_trace, linear.logistic_loss, chunk_size=1024))(
        w, features, labels)
    np.testing.assert_allclose(got, linear.logistic_hessian_trace(w, features, labels), rtol=1e-4)


def _quadratic_problem():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(8, 8))
    a = jnp.asarray(m @ m.T / 8 - 0.5 * np.eye(8))  # indefinite on purpose
    unravel = lambda x: {"u": x[:3], "v": x[3:].reshape(5)}
    fun = lambda p: 0.5 * jnp.concatenate([p["u"], p["v"]]) @ a @ jnp.concatenate(
        [p["u"], p["v"]]) + jnp.sum(jnp.cos(p["u"]))
    return fun, unravel(jnp.linspace(-1.0, 1.0, 8))


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_hutchinson_within_standard_errors(direction, x64):
    params, inputs, targets = _net_problem()
    exact = zojax.hessian_trace(_two_layer_net, params, inputs, targets)
    estimate, stderr = zojax.hutchinson_trace(_two_layer_net, jax.random.key(4), params, inputs,
                                              targets, num_samples=400, chunk_size=64,
                                              direction=direction)
    assert stderr > 0
    assert abs(estimate - exact) < Z_MAX * stderr, (estimate, stderr, exact)


def test_zo_trace_within_standard_errors(x64):
    params, inputs, targets = _net_problem()
    exact = zojax.hessian_trace(_two_layer_net, params, inputs, targets)
    estimate, stderr = zojax.zo_trace(_two_layer_net, jax.random.key(5), params, inputs, targets,
                                      delta=1e-4, num_samples=400)
    assert stderr > 0
    assert abs(estimate - exact) < Z_MAX * stderr, (estimate, stderr, exact)


def test_zo_trace_exact_on_quadratic(x64):
    """On a quadratic every antithetic sample is zᵀHz: the mean is unbiased for any delta."""
    a = jnp.diag(jnp.arange(1.0, 6.0))
    fun = lambda p: 0.5 * p @ a @ p + jnp.sum(p)
    estimate, stderr = zojax.zo_trace(fun, jax.random.key(0), jnp.ones(5), delta=0.5,
                                      num_samples=2000)
    assert abs(estimate - 15.0) < Z_MAX * stderr


def test_top_eigenvalue_matches_eigvalsh(x64):
    fun, params = _quadratic_problem()
    expected = np.max(np.linalg.eigvalsh(_dense_hessian(fun, params)))
    got = zojax.hessian_top_eigenvalue(fun, jax.random.key(0), params, num_iters=100)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    params_net, inputs, targets = _net_problem()
    dense = _dense_hessian(_two_layer_net, params_net, inputs, targets)
    got = zojax.hessian_top_eigenvalue(_two_layer_net, jax.random.key(1), params_net, inputs,
                                       targets, num_iters=30)
    np.testing.assert_allclose(got, np.max(np.linalg.eigvalsh(dense)), rtol=1e-6)


def test_top_eigenvalue_of_negative_definite_and_low_rank(x64):
    """Largest *algebraic* eigenvalue; an exhausted Krylov space must not add spurious zeros."""
    fun = lambda p: -0.5 * jnp.sum(jnp.arange(1.0, 7.0) * p**2)
    got = zojax.hessian_top_eigenvalue(fun, jax.random.key(0), jnp.ones(6), num_iters=50)
    np.testing.assert_allclose(got, -1.0, rtol=1e-8)
    rank_one = lambda p: 0.5 * (jnp.sum(p) - 1.0) ** 2  # eigenvalues 50, 0, ..., 0
    got = zojax.hessian_top_eigenvalue(rank_one, jax.random.key(0), jnp.zeros(50), num_iters=10)
    np.testing.assert_allclose(got, 50.0, rtol=1e-8)


def _run(opt, params, steps, *, gradient=False):
    def body(carry, _):
        params, state = carry
        grads = jax.grad(test_function.loss)(params) if gradient else None
        updates, state = opt.update(grads, state, params, value_fn=test_function.loss)
        return (optax.apply_updates(params, updates), state), None

    init = opt.init(params)
    return jax.jit(lambda p: jax.lax.scan(body, (p, init), length=steps)[0][0])(params)


def test_zo_finds_flatter_minima_than_gd():
    """A small Figure 1: with a larger λ, ZO's trace falls within 3000 steps, GD's does not."""
    params = test_function.init_params(jax.random.key(0), dim=20, scale=0.88)
    start = test_function.hessian_trace(params)
    gd = _run(optax.sgd(0.01), params, 3000, gradient=True)
    zo = _run(zojax.zo_sgd(0.005, smoothing=0.3, seed=1), params, 3000)
    assert test_function.loss(gd) < 1e-6
    assert test_function.hessian_trace(gd) > 0.9 * start
    assert test_function.hessian_trace(zo) < 0.3 * start
    assert test_function.loss(zo) < 0.1


# ---------------------------------------------------------------------------------------------
# The flatness toolkit (issue 11): diagonals, tr H², the spectrum.


def _unravel_like(params):
    return jax.flatten_util.ravel_pytree(params)[1]


@functools.cache
def _net_dense_hessian():
    """The net problem's dense float64 Hessian (numpy, so it outlives the x64 fixture)."""
    params, inputs, targets = jax.tree.map(lambda x: x.astype(jnp.float64), _net_problem())
    return np.asarray(_dense_hessian(_two_layer_net, params, inputs, targets))


def _assert_like(tree, params):
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        assert got.shape == want.shape and got.dtype == want.dtype, (got, want)


def test_hessian_diagonal_two_layer_net(x64):
    params, inputs, targets = _net_problem()
    expected = _unravel_like(params)(jnp.diag(_net_dense_hessian()))
    for chunk_size in (None, 1, 7, 1000):
        diagonal = functools.partial(zojax.hessian_diagonal, _two_layer_net,
                                     chunk_size=chunk_size)
        if chunk_size == 7:
            diagonal = jax.jit(diagonal)
        diag = diagonal(params, inputs, targets)
        _assert_like(diag, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                     diag, expected)
    # Per-layer traces, and hessian_trace is the sum of the diagonal.
    layer_traces = jax.tree.map(jnp.sum, diag)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, jnp.sum(b), rtol=1e-10),
                 layer_traces, expected)
    np.testing.assert_allclose(sum(jax.tree.leaves(layer_traces)),
                               zojax.hessian_trace(_two_layer_net, params, inputs, targets),
                               rtol=1e-12)


def test_hutchinson_diagonal_within_standard_errors(x64):
    params, inputs, targets = _net_problem()
    exact = zojax.hessian_diagonal(_two_layer_net, params, inputs, targets)
    key = jax.random.key(6)
    estimate, stderr = jax.jit(functools.partial(
        zojax.hutchinson_diagonal, _two_layer_net, num_samples=400))(key, params, inputs, targets)
    _assert_like(estimate, params)
    _assert_like(stderr, params)
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
    z = np.abs(flat(estimate) - flat(exact)) / flat(stderr)
    assert np.all(flat(stderr) > 0)
    assert np.all(z < Z_MAX), z.max()
    # Probe k from fold_in(key, k) as in hutchinson_trace: the diagonal sums to its trace.
    trace, _ = zojax.hutchinson_trace(_two_layer_net, key, params, inputs, targets,
                                      num_samples=400)
    np.testing.assert_allclose(jnp.sum(flat(estimate)), trace, rtol=1e-10)


def test_hessian_square_trace(x64):
    params, inputs, targets = _net_problem()
    frobenius = float(np.sum(_net_dense_hessian()**2))
    exact, zero = jax.jit(functools.partial(
        zojax.hessian_square_trace, _two_layer_net, num_samples=1, exact=True, chunk_size=7))(
        None, params, inputs, targets)
    np.testing.assert_allclose(exact, frobenius, rtol=1e-10)
    assert float(zero) == 0.0
    estimate, stderr = zojax.hessian_square_trace(_two_layer_net, jax.random.key(7), params,
                                                  inputs, targets, num_samples=400)
    assert stderr > 0
    assert abs(estimate - frobenius) < Z_MAX * stderr, (estimate, stderr, frobenius)


def _nonzero_nodes(nodes, weights, threshold=1e-10):
    return [np.sort(n[w > threshold]) for n, w in zip(np.asarray(nodes), np.asarray(weights))]


def test_hessian_spectrum_reproduces_eigvalsh(x64):
    fun, params = _quadratic_problem()
    eigenvalues = np.linalg.eigvalsh(_dense_hessian(fun, params))  # 8 distinct
    for num_iters in (8, 12):  # = d, and > d (padded with zero weights)
        nodes, weights = zojax.hessian_spectrum(fun, jax.random.key(0), params,
                                                num_iters=num_iters, num_samples=3)
        assert nodes.shape == weights.shape == (3, num_iters)
        assert np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
        assert np.all(np.diff(nodes, axis=1) >= 0)  # each row ascending
        np.testing.assert_array_equal(weights[:, 8:], 0.0)
        for row in _nonzero_nodes(nodes, weights):
            np.testing.assert_allclose(row, eigenvalues, rtol=1e-8, atol=1e-10)


def test_hessian_spectrum_moments_within_standard_errors(x64):
    """d Σ_j w_j θ_j^p = d qᵀHᵖq for p <= 2 num_iters - 1: unbiased for tr Hᵖ, q on the sphere."""
    params, inputs, targets = _net_problem()
    dense = _net_dense_hessian()
    dim = dense.shape[0]
    nodes, weights = jax.jit(functools.partial(
        zojax.hessian_spectrum, _two_layer_net, num_iters=10, num_samples=64))(
        jax.random.key(8), params, inputs, targets)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    for power, exact in ((1, np.trace(dense)), (2, np.sum(dense**2))):
        samples = dim * jnp.sum(weights * nodes**power, axis=1)
        estimate, stderr = jnp.mean(samples), jnp.std(samples, ddof=1) / np.sqrt(64)
        assert abs(estimate - exact) < Z_MAX * stderr, (power, estimate, stderr, exact)


def _quadratic_form(p, hessian):
    return 0.5 * p @ hessian @ p


def _outlier_hessian(dim, seed=0):
    """A dense symmetric Hessian with three outlying eigenvalues (10, 30, 100) over a bulk."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigenvalues = np.sort(np.concatenate([rng.normal(size=dim - 3), [10.0, 30.0, 100.0]]))
    return (q * eigenvalues) @ q.T, eigenvalues


@pytest.mark.parametrize("reorthogonalize", [False, True])
def test_hessian_spectrum_quadrature_is_exact_for_low_degrees(x64, reorthogonalize):
    """Σ_j w_j θ_j^p = qᵀHᵖq for p <= 2 num_iters - 1, probe by probe, with or without the
    bases (the three-term recurrence loses orthogonality but not its moments)."""
    hessian, _ = _outlier_hessian(40)
    key, num_iters = jax.random.key(3), 12
    nodes, weights = zojax.hessian_spectrum(_quadratic_form, key, jnp.zeros(40),
                                            jnp.asarray(hessian), num_iters=num_iters,
                                            num_samples=3, reorthogonalize=reorthogonalize)
    for k in range(3):  # the probe's start vector, as the docstring defines it
        q = np.asarray(jax.random.normal(jax.random.fold_in(key, k), (40,), jnp.float64))
        q = q / np.linalg.norm(q)
        for power in range(2 * num_iters):
            exact = q @ np.linalg.matrix_power(hessian, power) @ q
            got = np.sum(np.asarray(weights[k]) * np.asarray(nodes[k]) ** power)
            np.testing.assert_allclose(got, exact, rtol=1e-9, err_msg=f"{k=}, {power=}")


def test_hessian_spectrum_reorthogonalization(x64):
    """num_iters >= d keeps the bases by default (nodes = eigenvalues, even with outliers);
    below d the recurrence alone repeats converged nodes, reorthogonalize=True does not."""
    hessian, eigenvalues = _outlier_hessian(20)
    spectrum = functools.partial(zojax.hessian_spectrum, _quadratic_form, jax.random.key(0),
                                 jnp.zeros(20), jnp.asarray(hessian), num_samples=2)
    nodes, weights = spectrum(num_iters=20)
    for row in _nonzero_nodes(nodes, weights):
        np.testing.assert_allclose(row, eigenvalues, rtol=1e-9, atol=1e-9)
    hessian, eigenvalues = _outlier_hessian(200)
    spectrum = functools.partial(zojax.hessian_spectrum, _quadratic_form, jax.random.key(0),
                                 jnp.zeros(200), jnp.asarray(hessian), num_samples=1,
                                 num_iters=60)
    copies = {}
    for reorthogonalize in (False, True):
        nodes, _ = spectrum(reorthogonalize=reorthogonalize)
        copies[reorthogonalize] = int(np.sum(np.abs(np.asarray(nodes[0]) - 100.0) < 1e-6))
    assert copies == {False: copies[False], True: 1} and copies[False] > 1, copies


def test_top_eigenvalue_without_reorthogonalization(x64):
    hessian, eigenvalues = _outlier_hessian(200)
    got = zojax.hessian_top_eigenvalue(_quadratic_form, jax.random.key(0), jnp.zeros(200),
                                       jnp.asarray(hessian), num_iters=40,
                                       reorthogonalize=False)
    np.testing.assert_allclose(got, eigenvalues[-1], rtol=1e-10)


def test_hessian_spectrum_exhausted_krylov_space(x64):
    """Fewer distinct eigenvalues than num_iters, or num_iters > d: finite, every node with
    weight an eigenvalue, the rest of the spectrum (restarted blocks, padding) weightless."""
    u = np.random.default_rng(2).normal(size=(6, 2))
    hessians = {"repeated": np.diag([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]),  # 3 distinct eigenvalues
                "rank one": np.ones((6, 6)), "rank two": u @ u.T, "zero": np.zeros((6, 6))}
    for num_iters in (5, 9):  # < d = 6, and > d
        spectrum = jax.jit(functools.partial(zojax.hessian_spectrum, _quadratic_form,
                                             num_iters=num_iters, num_samples=4))
        for name, hessian in hessians.items():
            eigenvalues = np.linalg.eigvalsh(hessian)
            nodes, weights = spectrum(jax.random.key(1), jnp.zeros(6), jnp.asarray(hessian))
            assert nodes.shape == (4, num_iters)
            assert np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights)), name
            np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
            assert np.all(weights >= 0)
            scale = max(1.0, np.max(np.abs(eigenvalues)))
            for row in _nonzero_nodes(nodes, weights):
                gaps = np.min(np.abs(row[:, None] - eigenvalues[None]), axis=1)
                assert np.all(gaps < 1e-8 * scale), (name, num_iters, row)
            # Nodes stay inside the spectrum (Ritz values of restarted blocks included).
            assert np.all(nodes >= eigenvalues[0] - 1e-8 * scale), name
            assert np.all(nodes <= eigenvalues[-1] + 1e-8 * scale), name


def test_hessian_spectrum_exhausted_krylov_space_float32():
    fun = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]) * p**2)
    nodes, weights = zojax.hessian_spectrum(fun, jax.random.key(1), jnp.zeros(6), num_iters=5,
                                            num_samples=8)
    assert nodes.dtype == jnp.float32 and np.all(np.isfinite(nodes))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    for row in _nonzero_nodes(nodes, weights, threshold=1e-6):
        assert np.all(np.min(np.abs(row[:, None] - np.array([1.0, 2.0, 3.0])), axis=1) < 1e-4)


def test_spectral_density(x64):
    fun = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 5.0, 5.0, 9.0]) * p**2)
    nodes, weights = zojax.hessian_spectrum(fun, jax.random.key(2), jnp.zeros(4), num_iters=4,
                                            num_samples=16)
    width = 0.3
    grid = jnp.linspace(-5.0, 15.0, 4001)
    density = zojax.spectral_density(nodes, weights, grid, width=width)
    assert density.shape == grid.shape
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, rtol=1e-6)
    for eigenvalue in (1.0, 5.0, 9.0):  # a peak at each eigenvalue
        window = np.abs(np.asarray(grid) - eigenvalue) < 2 * width
        peak = np.asarray(grid)[window][np.argmax(np.asarray(density)[window])]
        assert abs(peak - eigenvalue) < 0.02, (eigenvalue, peak)
    # The mass near 5 (two of four eigenvalues) is about a half: 16 probes, E = 1/2.
    mass = np.asarray(jnp.sum(jnp.where(jnp.abs(nodes - 5.0) < 1e-6, weights, 0.0), axis=1))
    assert abs(mass.mean() - 0.5) < Z_MAX * mass.std(ddof=1) / 4
    jitted = jax.jit(zojax.spectral_density)(nodes, weights, grid, width=width)
    np.testing.assert_allclose(jitted, density, rtol=1e-12)
