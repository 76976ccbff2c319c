"""Closed-form losses and Hessian traces of zojax.problems against autodiff and numpy.

The ``x64`` fixture (float64 for one test, previous setting restored) lives in conftest.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.problems import (
    LOG_LOSS_EPS,
    LOSSES,
    AffineFeatures,
    accuracy,
    clipped_logistic_loss,
    linear,
    logistic_hessian_trace,
    logistic_loss,
    random_features,
    squared_row_norms,
    svm_hessian_trace,
    svm_loss,
    test_function,
)

LOSSES_AND_TRACES = pytest.mark.parametrize(
    "loss, trace",
    [(svm_loss, svm_hessian_trace), (logistic_loss, logistic_hessian_trace)],
    ids=["svm", "logistic"],
)


def exact_trace(fn, w, *args):
    return jnp.trace(jax.jit(jax.hessian(fn))(w, *args))


def dense_problem(seed=0, n=40, dim=6):
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.normal(size=(n, dim)))
    labels = jnp.asarray(np.where(rng.random(n) < 0.4, 1.0, -1.0))
    return features, labels, jnp.asarray(rng.normal(size=dim))


@functools.cache  # built once (jit compile); only called from tests that enable x64
def affine_problem(seed=0, n=50, d=5, m=40):
    """float64 AffineFeatures (N=50, d=5, m=40) with raw inputs that are not standardized."""
    rng = np.random.default_rng(seed)
    raw_train = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + rng.normal(size=d)
    raw_test = rng.normal(size=(n // 2, d))
    train, test = random_features(
        jax.random.key(seed), raw_train, raw_test, num_features=m, dtype=jnp.float64
    )
    labels = jnp.asarray(np.where(rng.random(n) < 0.4, 1.0, -1.0))
    return train, test, labels, jnp.asarray(0.3 * rng.normal(size=m + 1))


def assert_margins_away_from_kink(features, labels, w):
    margins = labels * (features @ w)
    assert 0 < int(jnp.sum(margins < 1)) < len(labels)  # both sides of the hinge are exercised
    assert float(jnp.min(jnp.abs(margins - 1.0))) > 1e-3


# --- test function (Example 2.1) -----------------------------------------------------------------


def test_test_function_trace_matches_autodiff(x64):
    rng = np.random.default_rng(0)
    y, z = rng.normal(size=7), rng.normal(size=7)
    params = {"y": jnp.asarray(y), "z": jnp.asarray(z)}
    flat_loss = lambda flat: test_function.loss({"y": flat[:7], "z": flat[7:]})
    hessian = jax.jit(jax.hessian(flat_loss))(jnp.concatenate([params["y"], params["z"]]))
    np.testing.assert_allclose(test_function.hessian_trace(params), jnp.trace(hessian), rtol=1e-5)
    np.testing.assert_allclose(test_function.loss(params), 0.5 * (y @ z - 1.0) ** 2, rtol=1e-12)


def test_test_function_flattest_minimizer():
    y = jnp.zeros(100).at[0].set(1.0)
    params = {"y": y, "z": y}
    assert float(test_function.loss(params)) == 0.0
    assert float(test_function.hessian_trace(params)) == 2.0


def test_test_function_init_params():
    params = test_function.init_params(jax.random.key(0))
    assert set(params) == {"y", "z"}
    assert params["y"].shape == params["z"].shape == (100,)
    assert params["y"].dtype == params["z"].dtype == jnp.float32
    assert not np.allclose(params["y"], params["z"])  # key split, not reused
    assert 120 < float(test_function.hessian_trace(params)) < 190  # E = 2·100·0.88² ≈ 155 ± 22
    unit = test_function.init_params(jax.random.key(0), dim=3, scale=1.0)
    doubled = test_function.init_params(jax.random.key(0), dim=3, scale=2.0)
    np.testing.assert_allclose(doubled["y"], 2.0 * unit["y"])


# --- losses against numpy ------------------------------------------------------------------------


def test_losses_match_numpy(x64):
    features, labels, w = dense_problem()
    x, b, v = (np.asarray(a) for a in (features, labels, w))
    margins = b * (x @ v)
    svm = np.mean(np.maximum(0.0, 1.0 - margins) ** 2)
    np.testing.assert_allclose(svm_loss(w, features, labels), svm, rtol=1e-12)
    logistic = np.mean(np.log1p(np.exp(-margins)))
    np.testing.assert_allclose(logistic_loss(w, features, labels), logistic, rtol=1e-12)
    p, y = 1.0 / (1.0 + np.exp(-(x @ v))), (b + 1.0) / 2.0
    cross_entropy = -np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    np.testing.assert_allclose(logistic_loss(w, features, labels), cross_entropy, rtol=1e-10)
    np.testing.assert_allclose(accuracy(w, features, labels), np.mean(np.sign(x @ v) == b))


@pytest.mark.parametrize("kind", ["dense", "affine"])
@pytest.mark.parametrize("loss", [svm_loss, logistic_loss, clipped_logistic_loss],
                         ids=["svm", "logistic", "clipped_logistic"])
def test_line_form_evaluates_the_loss_along_a_line(x64, loss, kind):
    """loss.along(w, u, steps, X, b)[k] = loss(w + t_k u, X, b), also batched over directions,
    over points sharing a direction and over both, and under jacfwd and grad."""
    if kind == "dense":
        features, labels, w = dense_problem()
    else:
        features, _, labels, w = affine_problem()
    steps = jnp.array([0.3, -0.3, 0.0, 2.0])
    u = jax.random.normal(jax.random.key(1), w.shape, w.dtype)

    def line(w, u):
        return loss.along(w, u, steps, features, labels)

    def each(w, u):
        return jnp.stack([loss(w + t * u, features, labels) for t in steps])

    np.testing.assert_allclose(line(w, u), each(w, u), rtol=1e-12)
    ws, us = w * jnp.array([[1.0], [0.5], [-2.0]]), u * jnp.array([[1.0], [-1.0], [3.0]])
    for axes in ((None, 0), (0, None), (0, 0)):
        args = (w if axes[0] is None else ws, u if axes[1] is None else us)
        np.testing.assert_allclose(jax.vmap(line, axes)(*args), jax.vmap(each, axes)(*args),
                                   rtol=1e-12)
    np.testing.assert_allclose(jax.jacfwd(line)(w, u), jax.jacfwd(each)(w, u), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(lambda w: line(w, u)[0])(w),
                               jax.grad(lambda w: each(w, u)[0])(w), rtol=1e-10)


def test_clipped_logistic_loss_equals_sklearn_log_loss(x64):
    """sklearn.metrics.log_loss(y, sigmoid(s)) on the same float64 scores, clipped ones included,
    and the exact loss where nothing is clipped."""
    from scipy.special import expit
    from sklearn.metrics import log_loss

    assert LOG_LOSS_EPS == np.finfo(np.float64).eps
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(400) < 0.5, 1.0, -1.0)
    y = (labels + 1.0) / 2.0
    # Scores up to ±100 (|s| > 36.04 is clipped); |s| in (15, 37) is left out of the one-column
    # form: there sklearn's 1 − p loses digits (float64 cancellation), the two-column form not.
    scores = rng.choice([-1.0, 1.0], 400) * np.concatenate([rng.uniform(0, 15, 200),
                                                              rng.uniform(37, 100, 200)])
    scores[:4] = [0.0, -36.0, 36.5, -1e4]
    ours = clipped_logistic_loss(jnp.ones(1), jnp.asarray(scores[:, None]), jnp.asarray(labels))
    np.testing.assert_allclose(ours, log_loss(y, expit(scores)), rtol=1e-12)
    assert float(ours) < float(logistic_loss(jnp.ones(1), jnp.asarray(scores[:, None]),
                                             jnp.asarray(labels)))
    wide = rng.normal(0.0, 30.0, 400)
    np.testing.assert_allclose(
        clipped_logistic_loss(jnp.ones(1), jnp.asarray(wide[:, None]), jnp.asarray(labels)),
        log_loss(y, np.stack([expit(-wide), expit(wide)], axis=1)), rtol=1e-12)
    # Per sample: at most −log ε ≈ 36.04 nats; unclipped scores give the exact loss.
    one = lambda s, b: float(clipped_logistic_loss(jnp.ones(1), jnp.array([[s]]), jnp.array([b])))
    assert one(-1e4, 1.0) == pytest.approx(-np.log(LOG_LOSS_EPS), rel=1e-15)
    assert one(-1e4, 1.0) == pytest.approx(36.04365338911715, rel=1e-15)
    exact = float(logistic_loss(jnp.ones(1), jnp.array([[3.0]]), jnp.array([-1.0])))
    assert one(3.0, -1.0) == exact



@pytest.mark.parametrize("kind", ["dense", "affine"])
def test_clipped_logistic_loss_has_the_exact_derivatives(x64, kind):
    """Only the values are clipped: gradient, jvp and Hessian trace are the exact loss's (the
    paper's GD uses the exact gradient), also where every sample is clipped."""
    if kind == "dense":
        features, labels, w = dense_problem()
    else:
        features, _, labels, w = affine_problem()
    for scale in (1.0, 1e3):  # at w·1e3 most margins are far beyond the cap of 36
        v = scale * w
        np.testing.assert_allclose(jax.grad(clipped_logistic_loss)(v, features, labels),
                                   jax.grad(logistic_loss)(v, features, labels), rtol=1e-12)
        np.testing.assert_allclose(exact_trace(clipped_logistic_loss, v, features, labels),
                                   exact_trace(logistic_loss, v, features, labels), rtol=1e-12)
    np.testing.assert_allclose(exact_trace(clipped_logistic_loss, w, features, labels),
                               logistic_hessian_trace(w, features, labels), rtol=1e-9)
    assert float(clipped_logistic_loss(1e3 * w, features, labels)) < float(
        logistic_loss(1e3 * w, features, labels))


def test_clipped_logistic_loss_float32():
    """float32 weights keep float32 and the same cap (ε is float64's, as in the paper's code)."""
    x, b = jnp.ones((2, 1), jnp.float32), jnp.array([1.0, -1.0], jnp.float32)
    value = clipped_logistic_loss(jnp.array([200.0], jnp.float32), x, b)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 36.04365338911715 / 2, rtol=1e-6)


def test_losses_registry():
    assert set(LOSSES) == {"svm", "logistic", "clipped_logistic"}
    assert LOSSES["logistic"].loss is logistic_loss and LOSSES["svm"].loss is svm_loss
    assert LOSSES["clipped_logistic"].hessian_trace is logistic_hessian_trace
    assert all(callable(entry.loss.along) and entry.title for entry in LOSSES.values())


def test_logistic_loss_is_stable_for_large_margins():
    features, labels, w = jnp.ones((2, 1)), jnp.array([1.0, -1.0]), jnp.array([200.0])
    np.testing.assert_allclose(logistic_loss(w, features, labels), 100.0, rtol=1e-6)  # (0+200)/2
    assert np.isfinite(jax.grad(logistic_loss)(w, features, labels)).all()


def test_accuracy_predicts_plus_one_at_zero():
    value = accuracy(jnp.zeros(2), jnp.ones((3, 2)), jnp.array([1.0, 1.0, -1.0]))
    assert float(value) == pytest.approx(2 / 3)


EXTREME_SCORES = np.array([0.0, -0.0, 1e-30, -1e-30, 0.5, -3.0, 40.0, -88.0, 89.0, -100.0, 1e4,
                           -np.inf, np.inf], np.float32)


def test_logistic_trace_at_extreme_scores():
    # Identity features: the scores are w. p(1 − p) = e^−|s| / (1 + e^−|s|)² in float64 (no
    # cancellation); the float32 values agree to 1e-6, down to the smallest normal number.
    e = np.exp(-np.abs(EXTREME_SCORES.astype(np.float64)))
    for s, expected in zip(EXTREME_SCORES, e / (1.0 + e) ** 2):
        value = logistic_hessian_trace(jnp.array([s]), jnp.eye(1), jnp.ones(1))
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=np.finfo(np.float32).tiny,
                                   err_msg=f"score {s}")


@pytest.mark.parametrize("label", [1.0, -1.0])
def test_accuracy_at_extreme_scores(label):
    for s in EXTREME_SCORES:
        correct = (1.0 if s >= 0 else -1.0) == label  # -0.0 >= 0: a zero predicts +1
        assert float(accuracy(jnp.array([s]), jnp.eye(1), jnp.array([label]))) == correct, s
    assert np.isnan(accuracy(jnp.array([np.nan]), jnp.eye(1), jnp.ones(1)))


# --- closed-form traces against jax.hessian ------------------------------------------------------


@LOSSES_AND_TRACES
def test_dense_trace_matches_autodiff(x64, loss, trace):
    features, labels, w = dense_problem()
    assert_margins_away_from_kink(features, labels, w)
    expected = exact_trace(loss, w, features, labels)
    np.testing.assert_allclose(trace(w, features, labels), expected, rtol=1e-5)


@LOSSES_AND_TRACES
def test_affine_trace_matches_autodiff(x64, loss, trace):
    features, _, labels, w = affine_problem()
    assert_margins_away_from_kink(features, labels, w)
    expected = exact_trace(loss, w, features, labels)
    np.testing.assert_allclose(trace(w, features, labels), expected, rtol=1e-5)
    np.testing.assert_allclose(trace(w, features.dense(), labels), expected, rtol=1e-5)


# --- AffineFeatures ------------------------------------------------------------------------------


def test_affine_matmul_and_row_norms_match_dense(x64):
    train, test, _, w = affine_problem()
    for features in (train, test):
        dense = features.dense()
        assert features.shape == dense.shape == (features.inputs.shape[0], 41)
        np.testing.assert_allclose(features @ w, dense @ w, rtol=1e-10, atol=1e-10)
        dense_norms = jnp.sum(dense**2, axis=1)
        np.testing.assert_allclose(squared_row_norms(features), dense_norms, rtol=1e-10)
        np.testing.assert_allclose(squared_row_norms(dense), dense_norms, rtol=1e-12)
        ws = jnp.stack([w, 2.0 * w, -w], axis=1)  # (D, k) right-hand sides
        np.testing.assert_allclose(features @ ws, dense @ ws, rtol=1e-10, atol=1e-10)
    dense = train.dense()  # the train split is standardized exactly
    np.testing.assert_allclose(jnp.mean(dense[:, 1:], axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(jnp.std(dense[:, 1:], axis=0), 1.0, rtol=1e-8)
    np.testing.assert_allclose(dense[:, 0], 1.0)


def test_affine_float32_row_norms_match_dense():
    rng = np.random.default_rng(1)
    train, _ = random_features(jax.random.key(1), rng.normal(size=(200, 20)), num_features=2000)
    assert train.inputs.dtype == train.projection.dtype == train.row_sq_norms.dtype == jnp.float32
    np.testing.assert_allclose(train.row_sq_norms, jnp.sum(train.dense() ** 2, axis=1), rtol=1e-4)
    # 1 + m standardized columns on average
    np.testing.assert_allclose(jnp.mean(train.row_sq_norms), 2001.0, rtol=1e-4)


def test_affine_under_vmap_grad_jit(x64):
    train, _, labels, w = affine_problem()
    ws = jnp.stack([w, -w, 0.5 * w])
    tangent = jnp.ones_like(w)

    @jax.jit
    def transformed(features):  # AffineFeatures enters jit as a pytree of tracers
        out = {"vmap_matmul": jax.vmap(lambda v: features @ v)(ws)}
        for name, loss in (("svm", svm_loss), ("logistic", logistic_loss)):
            out[f"{name}_grad"] = jax.grad(loss)(w, features, labels)
            bound = functools.partial(loss, features=features, labels=labels)
            out[f"{name}_jvp"] = jax.jvp(bound, (w,), (tangent,))
            out[f"{name}_vmap"] = jax.vmap(loss, in_axes=(0, None, None))(ws, features, labels)
        return out

    got, want = transformed(train), transformed(train.dense())
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(jax.grad(svm_loss)(w, train, labels), got["svm_grad"], rtol=1e-9)


def test_random_features_test_split_uses_train_statistics(x64):
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(30, 4)) * 5.0 + 3.0
    raw[:, 2] = 7.0  # constant column: std 0 → 1
    train, test = random_features(jax.random.key(0), raw, raw[:10], num_features=8, dtype="float64")
    np.testing.assert_allclose(test.dense(), train.dense()[:10], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(train.inputs[:, 2], 0.0)
    assert np.isfinite(train.dense()).all()


def test_affine_features_create_matches_fields():
    phi = jnp.arange(6.0).reshape(3, 2)
    features = AffineFeatures.create(phi, jnp.ones((2, 4)), jnp.full(4, 0.5), jnp.full(4, 2.0))
    dense_norms = jnp.sum(features.dense() ** 2, axis=1)
    np.testing.assert_allclose(features.row_sq_norms, dense_norms, rtol=1e-5)
    np.testing.assert_array_equal(features.inputs_t, phi.T)  # the products' copy of Φ
    five = AffineFeatures(*features[:5])  # positional construction: no Φᵀ, the same products
    assert five.inputs_t is None and five.shape == features.shape == (3, 5)
    w = jnp.arange(5.0)
    np.testing.assert_allclose(five @ w, features @ w, rtol=1e-6)


def test_affine_derivatives_with_respect_to_the_map(x64):
    """jax.grad with respect to Φ, W, μ and σ equals the dense X's (Φᵀ is not differentiated);
    a vmap over stacked maps equals one map at a time."""
    train, _, labels, w = affine_problem()

    def through_dense(features):
        return logistic_loss(w, AffineFeatures(*features[:5]).dense(), labels)

    ours = jax.jit(jax.grad(lambda f: logistic_loss(w, f, labels)))(train)
    theirs = jax.grad(through_dense)(train)
    for name in ("inputs", "projection", "mean", "scale"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    assert not np.any(ours.inputs_t)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2.0 * x]), train)
    np.testing.assert_allclose(jax.vmap(lambda f: f @ w)(stacked),
                               jnp.stack([train @ w, jax.tree.map(lambda x: 2.0 * x, train) @ w]),
                               rtol=1e-12)


def test_linear_init_params():
    w = linear.init_params(jax.random.key(0), 10_001)
    assert w.shape == (10_001,) and w.dtype == jnp.float32
    assert 0.09 < float(jnp.std(w)) < 0.11


def test_two_scales_valley_curvature_matches_autodiff(x64):
    from zojax.problems import two_scales

    n = 3
    for w in (-1.0, 0.0, two_scales.TRACE_MINIMIZER, 2.0):
        params = {"w": jnp.asarray(w), "u": jnp.zeros(n), "v": jnp.zeros(n)}
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        dense = np.asarray(jax.hessian(lambda x, unravel=unravel: two_scales.loss(unravel(x)))(
            flat))
        closed = two_scales.valley_curvature(w, n)
        np.testing.assert_allclose(closed["hessian_trace"], np.trace(dense), rtol=1e-12)
        np.testing.assert_allclose(closed["hessian_top_eigenvalue"],
                                   np.linalg.eigvalsh(dense)[-1], rtol=1e-12)
        np.testing.assert_allclose(closed["hessian_square_trace"], np.sum(dense**2), rtol=1e-12)
        assert float(two_scales.loss(params)) == 0.0  # the valley is the minimum set


def test_two_scales_minimizers():
    from zojax.problems import two_scales

    ws = np.linspace(-2.0, 3.0, 50_001)
    curvature = two_scales.valley_curvature(ws, 5)
    for name, where in (("hessian_trace", two_scales.TRACE_MINIMIZER),
                        ("hessian_top_eigenvalue", two_scales.EIGENVALUE_MINIMIZER),
                        ("hessian_square_trace", np.log(4.0) / 2.5)):
        assert abs(ws[np.argmin(np.asarray(curvature[name]))] - where) < 1e-3, name
    np.testing.assert_allclose(two_scales.TRACE_MINIMIZER, 0.8 * np.log(4.0), rtol=1e-6)
