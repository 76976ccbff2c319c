"""The tilted (ZEST) estimators against closed forms, quadrature and the two-point limit.

Means of many estimates are compared with their targets within a few standard errors (fixed
seeds, never loosened); the self-normalized gradient estimate also carries an O(1/k) bias, which
the quadrature test allows for explicitly (5 % of the gradient's norm).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax import estimators

Z_MAX = 5.0


def _params(dtype=jnp.float32):
    return {"w": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.array([[0.3, -0.2]], dtype)}


def _loss(params):
    x = jnp.concatenate([params["w"], params["b"].ravel()])
    return jnp.sum(jnp.arange(1.0, 6.0, dtype=x.dtype) * x**2) + jnp.sum(jnp.sin(x))


@pytest.mark.parametrize("direction", ["gaussian", "sphere"])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_small_tilt_with_one_pair_is_the_central_two_point_estimate(direction, chunk_size):
    """t → 0, antithetic, num_directions=2: exactly two_point(num_directions=1), float32."""
    kwargs = dict(smoothing=0.01, direction=direction, chunk_size=chunk_size)
    tilted = zojax.tilted_grad(_loss, tilt=1e-6, num_directions=2, **kwargs)
    central = zojax.zo_grad(_loss, num_directions=1, **kwargs)
    for seed in range(5):
        key = jax.random.key(seed)
        got, expected = jax.jit(tilted)(key, _params()), jax.jit(central)(key, _params())
        chex.assert_trees_all_close(got, expected, rtol=1e-4)


# A 2-D function with logarithmic growth: E exp(t f(x + λu)) is finite for every t.
_A = np.array([[1.0, 0.3], [0.3, 2.0]])
_C = np.array([0.2, -0.1])
_X0 = np.array([0.6, -0.5])


def _log_growth(x):
    y = x - jnp.asarray(_C, x.dtype)
    return jnp.log1p(0.5 * y @ jnp.asarray(_A, x.dtype) @ y)


def _hermite_grid(num_nodes=120):
    """Gauss–Hermite nodes and weights of N(0, I_2), as (n², 2) points and (n²,) weights."""
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    w = w / w.sum()
    points = np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    return points, np.outer(w, w).ravel()


def _quadrature_gradient(points, weights, tilt, smoothing):
    """∇L_t = E[e^{tf} ∇f(x + λu)] / E[e^{tf}], and by Stein (1/tλ) E[e^{tf} u] / E[e^{tf}]."""
    at = jnp.asarray(_X0 + smoothing * points)
    values, grads = jax.vmap(jax.value_and_grad(_log_growth))(at)
    e = weights * np.exp(tilt * (values - values.max()))
    return (e @ grads) / e.sum(), (e @ points) / e.sum() / (tilt * smoothing)


def _mean_and_sem(grad_fn, num_samples=2000):
    keys = jax.random.split(jax.random.key(0), num_samples)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: grad_fn(k, jnp.asarray(_X0))))(keys))
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(num_samples)


def test_mean_matches_gauss_hermite_quadrature(x64):
    """Gaussian directions, t in {0.5, 2, 10}, 64 antithetic pairs: 5 SE + 5 % of ‖∇L_t‖."""
    smoothing, points, weights = 0.15, *_hermite_grid()
    means = {}
    for tilt in (0.5, 2.0, 10.0):
        exact, stein = _quadrature_gradient(points, weights, tilt, smoothing)
        np.testing.assert_allclose(stein, exact, rtol=1e-8)  # the identity the estimator uses
        grad_fn = zojax.tilted_grad(_log_growth, smoothing=smoothing, tilt=tilt,
                                    num_directions=128)
        mean, sem = _mean_and_sem(grad_fn)
        tolerance = Z_MAX * sem + 0.05 * np.linalg.norm(exact)
        assert np.all(np.abs(mean - exact) < tolerance), (tilt, mean, exact, sem)
        means[tilt] = (mean, tolerance)
    # ... and the test can tell the tilts apart.
    assert np.any(np.abs(means[10.0][0] - means[0.5][0]) > 2 * means[10.0][1])


def test_sphere_targets_the_ball_gradient_up_to_a_scalar(x64):
    """Sphere u = √d v: the plug-in's limit is (1/tλ) E_v[e^{tf} u] / E_v[e^{tf}], parallel to
    ∇L_t of the ball of radius λ√d (divergence theorem, c = 1), scaled by E_ball / E_sphere."""
    smoothing, tilt, dim = 0.15, 2.0, 2
    radius = smoothing * np.sqrt(dim)
    theta = 2 * np.pi * np.arange(512) / 512  # trapezoid rule: spectral on the circle
    circle = np.stack([np.cos(theta), np.sin(theta)], 1)
    r, r_weights = np.polynomial.legendre.leggauss(64)
    r, r_weights = (r + 1) / 2, r_weights / 2
    disk = (r[:, None, None] * circle[None]).reshape(-1, 2)
    disk_weights = (2 * r[:, None] * r_weights[:, None] * np.ones((1, 512)) / 512).ravel()

    def ball_tilted_loss(x):
        values = jax.vmap(_log_growth)(x + radius * jnp.asarray(disk))
        return jax.scipy.special.logsumexp(tilt * values, b=jnp.asarray(disk_weights)) / tilt

    sphere_values = np.asarray(jax.vmap(_log_growth)(jnp.asarray(_X0 + radius * circle)))
    e_sphere = np.exp(tilt * sphere_values)
    numerator = (e_sphere @ (np.sqrt(dim) * circle)) / 512 / (tilt * smoothing)
    ball_mean = np.exp(tilt * ball_tilted_loss(jnp.asarray(_X0)))
    ball_gradient = jax.grad(ball_tilted_loss)(jnp.asarray(_X0))
    np.testing.assert_allclose(numerator / ball_mean, ball_gradient, rtol=1e-8)
    plug_in_limit = numerator / e_sphere.mean()
    ratio = ball_mean / e_sphere.mean()  # the documented scalar bias, here in d = 2
    np.testing.assert_allclose(plug_in_limit, ratio * ball_gradient, rtol=1e-8)
    assert 0.9 < ratio < 1  # the sphere's values weigh more than the ball's, here

    grad_fn = zojax.tilted_grad(_log_growth, smoothing=smoothing, tilt=tilt, num_directions=128,
                                direction="sphere")
    mean, sem = _mean_and_sem(grad_fn)
    tolerance = Z_MAX * sem + 0.05 * np.linalg.norm(plug_in_limit)
    assert np.all(np.abs(mean - plug_in_limit) < tolerance), (mean, plug_in_limit, sem)


def _gaussian_quadratic(dim=4):
    """f(x) = ½ xᵀHx + bᵀx, with its closed-form L_t under Gaussian u (finite: tλ²h_max < 1)."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(dim, dim))
    hessian = m @ m.T / dim + np.eye(dim)
    b = rng.normal(size=dim)

    def f(x):
        return 0.5 * x @ jnp.asarray(hessian) @ x + jnp.asarray(b) @ x

    def tilted_loss(x, tilt, smoothing):
        # E exp(t f(x + λu)) = e^{tf} det(I − tλ²H)^{-1/2} exp(½ t²λ² gᵀ(I − tλ²H)^{-1} g).
        g = jnp.asarray(hessian) @ x + jnp.asarray(b)
        shrunk = jnp.eye(dim) - tilt * smoothing**2 * jnp.asarray(hessian)
        return (f(x) - 0.5 * jnp.linalg.slogdet(shrunk)[1] / tilt
                + 0.5 * tilt * smoothing**2 * g @ jnp.linalg.solve(shrunk, g))

    return f, tilted_loss, jnp.asarray(rng.normal(size=dim))


def test_quadratic_closed_forms_of_value_and_gradient(x64):
    f, tilted_loss, x = _gaussian_quadratic()
    smoothing, tilt = 0.2, 1.5  # tλ²h_max ≈ 0.2: weights have finite variance
    value, stderr = zojax.tilted_value(f, jax.random.key(1), x, smoothing=smoothing, tilt=tilt,
                                       num_samples=20_000, chunk_size=1000)
    expected = tilted_loss(x, tilt, smoothing)
    assert 0 < stderr < 0.01 and abs(value - expected) < Z_MAX * stderr, (value, expected, stderr)

    grad_fn = zojax.tilted_grad(f, smoothing=smoothing, tilt=tilt, num_directions=256)
    keys = jax.random.split(jax.random.key(2), 2000)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: grad_fn(k, x)))(keys))
    expected = np.asarray(jax.grad(tilted_loss)(x, tilt, smoothing))
    sem = samples.std(0, ddof=1) / np.sqrt(len(samples))
    tolerance = Z_MAX * sem + 0.05 * np.linalg.norm(expected)
    assert np.all(np.abs(samples.mean(0) - expected) < tolerance), (samples.mean(0), expected)


def test_tilted_value_small_tilt_is_the_smoothed_loss(x64):
    """t → 0: the mean of f(x + λu) and its standard error, without cancellation."""
    f, _, x = _gaussian_quadratic()
    key, smoothing = jax.random.key(3), 0.3
    value, stderr = zojax.tilted_value(f, key, x, smoothing=smoothing, tilt=1e-9,
                                       num_samples=500)
    values = jax.vmap(lambda i: f(x + smoothing * zojax.directions.gaussian(
        jax.random.fold_in(key, i), x)))(jnp.arange(500))
    np.testing.assert_allclose(value, jnp.mean(values), rtol=1e-6)
    np.testing.assert_allclose(stderr, jnp.std(values, ddof=1) / np.sqrt(500), rtol=1e-6)


@pytest.mark.parametrize("antithetic, line_form", [(True, False), (True, True), (False, False)])
def test_chunked_equals_unchunked(antithetic, line_form, x64):
    """Chunk sizes dividing num_directions (12 points, 6 pairs) or not: one estimate, 1e-10."""
    fun = _loss
    if line_form:
        fun = estimators.Objective(_loss, lambda p, u, steps: jax.vmap(
            lambda t: _loss(jax.tree.map(lambda a, b: a + t * b, p, u)))(steps))
    params, key = _params(jnp.float64), jax.random.key(5)
    chunk_sizes = (None, 2, 5) if antithetic else (None, 4, 5)

    @jax.jit
    def estimates(key, params):
        return [zojax.tilted_grad(fun, smoothing=0.3, tilt=3.0, num_directions=12,
                                  antithetic=antithetic, chunk_size=c)(key, params)
                for c in chunk_sizes]

    expected, *chunked = estimates(key, params)
    for got in chunked:
        chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-12)
    if not antithetic:
        values = jax.jit(lambda key, params: [zojax.tilted_value(
            _loss, key, params, smoothing=0.3, tilt=3.0, num_samples=12, chunk_size=c)
            for c in (None, 5)])(key, params)
        for value, stderr in values[1:]:
            np.testing.assert_allclose(value, values[0][0], rtol=1e-12)
            np.testing.assert_allclose(stderr, values[0][1], rtol=1e-10)


def test_large_tilt_stays_finite_and_follows_the_largest_loss():
    """t·f ~ 1e4 in float32: the softmax is the argmax, ĝ = s u /(tλ) of the worst point."""
    params, key, smoothing, tilt = _params(), jax.random.key(6), 0.05, 1000.0
    loss = lambda p: 10.0 + _loss(p)  # t·f ≈ 2e4

    @jax.jit
    def run(key, params):
        kwargs = dict(smoothing=smoothing, tilt=tilt, num_directions=8)
        return (zojax.tilted_grad(loss, **kwargs)(key, params),
                zojax.tilted_grad(loss, antithetic=False, **kwargs)(key, params),
                estimators.partial_estimate(loss, key, params, smoothing=smoothing,
                                            num_directions=4).values,
                zojax.tilted_value(loss, key, params, smoothing=smoothing, tilt=tilt,
                                   num_samples=64))

    grads, one_sided, values, (value, stderr) = run(key, params)
    for tree in (grads, one_sided):
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(tree))
    assert np.isfinite(value) and np.isfinite(stderr)
    i, k = np.unravel_index(np.argmax(values), values.shape)
    u = zojax.directions.gaussian(jax.random.fold_in(key, int(i)), params)
    expected = jax.tree.map(lambda d: (1.0 if k == 0 else -1.0) * d / (tilt * smoothing), u)
    chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-7)


def test_tilt_and_smoothing_sweep_in_one_program():
    """vmap over (t, λ) through inject_hyperparams: each member equals its own run."""
    make = optax.inject_hyperparams(zojax.zest, static_args=("num_directions",))

    def run(tilt, smoothing):
        opt = make(learning_rate=0.02, smoothing=smoothing, tilt=tilt, num_directions=4)
        params = _params()

        def body(carry, _):
            params, state = carry
            updates, state = opt.update(None, state, params, value_fn=_loss)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, opt.init(params)), length=20)[0][0]

    tilts, lams = jnp.array([0.1, 1.0, 10.0]), jnp.array([0.1, 0.05, 0.01])
    swept = jax.jit(jax.vmap(run))(tilts, lams)
    for i in range(3):
        alone = jax.jit(run)(tilts[i], lams[i])
        np.testing.assert_allclose(swept["w"][i], alone["w"], rtol=1e-5, atol=1e-6)


def test_counts_queries_and_reports_the_mean_loss():
    def state_after_one_update(opt):
        update = jax.jit(lambda state, params: opt.update(None, state, params, value_fn=_loss))
        return update(opt.init(_params()), _params())[1]

    state = state_after_one_update(zojax.tilted(0.01, tilt=1.0, num_directions=6))
    assert int(state.num_queries) == 6
    np.testing.assert_allclose(state.value, _loss(_params()), rtol=1e-3)
    state = state_after_one_update(zojax.tilted(0.01, tilt=1.0, num_directions=5,
                                                antithetic=False))
    assert int(state.num_queries) == 5


@pytest.mark.parametrize("bad, match", [
    (dict(tilt=0.0), "tilt"), (dict(tilt=-1.0), "tilt"), (dict(tilt=float("nan")), "tilt"),
    (dict(tilt=float("inf")), "tilt"), (dict(tilt="1"), "tilt"),
    (dict(smoothing=0.0), "smoothing"),
    (dict(num_directions=1), "num_directions"), (dict(num_directions=0), "num_directions"),
    (dict(num_directions=3), "num_directions"), (dict(num_directions=4.0), "num_directions"),
    (dict(num_directions=1, antithetic=False), "num_directions"),
    (dict(direction="rademacher"), r"direction must be one of \('gaussian', 'sphere'\)"),
    (dict(direction="gauss"), "direction"), (dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_raises_at_construction(bad, match):
    kwargs = {**dict(smoothing=0.1, tilt=1.0, num_directions=4), **bad}
    with pytest.raises(ValueError, match=match):
        zojax.tilted_grad(_loss, **kwargs)
    with pytest.raises(ValueError, match=match):
        zojax.tilted(**kwargs)
    with pytest.raises(ValueError, match=match):
        zojax.zest(0.1, **kwargs)


def test_bad_input_of_tilted_value_and_zest():
    call = lambda **kw: zojax.tilted_value(_loss, jax.random.key(0), _params(), **{
        **dict(smoothing=0.1, tilt=1.0, num_samples=4), **kw})
    for bad, match in [(dict(tilt=0.0), "tilt"), (dict(num_samples=0), "num_samples"),
                       (dict(smoothing=-1.0), "smoothing"), (dict(direction="coordinate"),
                                                             "direction")]:
        with pytest.raises(ValueError, match=match):
            call(**bad)
    with pytest.raises(ValueError, match="learning_rate"):
        zojax.zest(-0.1, 0.1, 1.0, 4)
    zojax.tilted(0.1, tilt=1.0, num_directions=3, antithetic=False)  # fine without pairs


def test_runner_method_zest_sweeps_tilts_in_one_program(tmp_path):
    """The runner's "zest" method: tilts are traced (one program), hparams record the tilt."""
    import ml_collections

    from experiments import runner
    from experiments.runner import groups as runner_groups

    problem = runner.Problem(_loss, lambda p: {"loss": _loss(p)}, _params())
    fields = dict(learning_rate=0.01, smoothing=0.05, tilt=(0.5, 5.0), num_directions=4,
                  direction="sphere")
    members = runner.sweep("zest", fields, problem)
    experiment = runner.Experiment("zest", members, progress_metrics=("loss",))
    config = ml_collections.ConfigDict(dict(num_steps=20, eval_every=10, log_evals=0,
                                            evals_per_chunk=2, checkpoint_every=1))
    groups = runner_groups.make_groups(experiment, None, "vmap", config)
    assert len(groups) == 1
    results = runner.run(experiment, config, tmp_path / "run")
    assert [run["hparams"]["tilt"] for run in results["runs"]] == [0.5, 5.0]
    assert all(run["num_queries"][-1] == 80 for run in results["runs"])
    assert all(run["metrics"]["loss"][-1] < run["metrics"]["loss"][0] for run in results["runs"])
    bad = ml_collections.ConfigDict({**config.to_dict(), "zest": dict(tilt=(1.0, -1.0))})
    with pytest.raises(ValueError, match=r"config\.zest\.tilt"):
        runner.validate(bad)
