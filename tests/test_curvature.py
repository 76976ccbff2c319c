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
