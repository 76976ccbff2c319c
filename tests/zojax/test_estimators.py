"""Statistical tests of the pure estimators against closed forms.

Every check compares a Monte Carlo mean with its expected value coordinate by coordinate, with a
tolerance of a few standard errors of that mean (fixed seeds; never loosened).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zojax

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

DIRECTIONS = ("gaussian", "sphere", "rademacher", "coordinate")
SCHEMES = ("central", "forward")
NUM_SAMPLES = 40_000
Z_MAX = 4.5  # over ~100 coordinates x combinations, P(any |z| > 4.5) is about 1e-3.


def _params():
    return {"w": jnp.array([0.5, -1.0, 2.0, 0.3, -0.7]), "b": jnp.array([[1.0, -2.0], [0.2, 0.4]])}


def _quadratic(params, scale):
    """½ xᵀAx + cᵀx with a dense SPD A over the flattened pytree (d = 9)."""
    x = jnp.concatenate([params["w"], params["b"].ravel()])
    rng = np.random.default_rng(0)
    m = rng.normal(size=(9, 9))
    a = jnp.asarray(m @ m.T / 9 + np.eye(9))
    c = jnp.asarray(rng.normal(size=9))
    return scale * (0.5 * x @ a @ x + c @ x)


def _cubic(params):
    """Σ a_i x_i³ over the flattened pytree: its smoothed gradients have closed forms."""
    x = jnp.concatenate([params["w"], params["b"].ravel()])
    return jnp.sum(_cubic_coefficients() * x**3)


def _cubic_coefficients():
    return jnp.linspace(0.5, 1.5, 9)


def _estimates(fun, direction, scheme, smoothing, *args, num_samples=NUM_SAMPLES):
    grad_fn = zojax.zo_grad(fun, smoothing=smoothing, direction=direction, scheme=scheme)
    keys = jax.random.split(jax.random.key(42), num_samples)
    samples = jax.jit(jax.vmap(lambda k: grad_fn(k, _params(), *args)))(keys)
    flat = jnp.concatenate([samples["w"], samples["b"].reshape(num_samples, -1)], axis=1)
    return flat.astype(jnp.float64) if flat.dtype == jnp.float64 else np.asarray(flat, np.float64)


def _assert_mean(samples, expected):
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(0)
    sem = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    z = (mean - np.asarray(expected)) / np.maximum(sem, 1e-12)
    assert np.all(np.abs(z) < Z_MAX), f"z-scores {z}, mean {mean}, expected {expected}"


def _flat(tree):
    return np.concatenate([np.ravel(tree["w"]), np.ravel(tree["b"])])


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased_on_quadratic(direction, scheme, x64):
    """Central estimates are unbiased on quadratics; forward ones too, except coordinate."""
    smoothing = 0.05
    samples = _estimates(_quadratic, direction, scheme, smoothing, 1.0)
    expected = _flat(jax.grad(_quadratic)(_params(), 1.0))
    if direction == "coordinate" and scheme == "forward":
        # E[(uᵀAu) u] = √d diag(A) for u = √d e_i: forward coordinate is biased by (λ√d/2)·diag(A).
        flat_quadratic = lambda x: _quadratic(_unflatten(x), 1.0)
        hessian = jax.hessian(flat_quadratic)(jnp.asarray(_flat(_params())))
        expected = expected + 0.5 * smoothing * np.sqrt(9) * np.diag(hessian)
    _assert_mean(samples, expected)


def _unflatten(x):
    return {"w": x[:5], "b": x[5:].reshape(2, 2)}


def _cubic_smoothed_gradient(direction, scheme, smoothing, dim=9):
    """Documented mean of each estimator on f = Σ a_i x_i³ (see zojax.directions)."""
    a, x, lam2 = np.asarray(_cubic_coefficients()), _flat(_params()), smoothing**2
    exact = 3 * a * x**2
    if direction == "gaussian":  # ∇ of the Gaussian-smoothed f: E(x+λu)³ = x³ + 3xλ².
        return exact + 3 * a * lam2
    if direction == "sphere":  # ∇ of f averaged over the ball of radius λ√d.
        return exact + 3 * a * lam2 * dim / (dim + 2)
    if direction == "rademacher":  # the finite-difference quotient: E u⁴ = 1.
        return exact + a * lam2
    central = exact + a * lam2 * dim  # coordinate: u = √d e_i.
    return central if scheme == "central" else central + 3 * a * x * smoothing * np.sqrt(dim)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_documented_mean_on_cubic(direction, scheme, x64):
    """With a large λ the estimates converge to the documented smoothed gradients, not ∇f."""
    smoothing = 0.5
    samples = _estimates(_cubic, direction, scheme, smoothing)
    _assert_mean(samples, _cubic_smoothed_gradient(direction, scheme, smoothing))


def test_bias_is_detectable():
    """The statistical check has power: the Gaussian-smoothed bias 3aλ² is resolved at λ = 0.5."""
    samples = _estimates(_cubic, "gaussian", "central", 0.5)
    with pytest.raises(AssertionError):
        _assert_mean(samples, 3 * np.asarray(_cubic_coefficients()) * _flat(_params()) ** 2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunk_size_does_not_change_the_estimate(scheme, x64):
    """Same key, same directions: equal up to summation order (float64 isolates the logic)."""
    fun = lambda p, s: _quadratic(p, s)
    key = jax.random.key(3)
    reference = zojax.zo_grad(fun, smoothing=0.01, num_directions=7, scheme=scheme)(
        key, _params(), 2.0)
    for chunk_size in (1, 2, 3, 7, 100):
        chunked = zojax.zo_grad(fun, smoothing=0.01, num_directions=7, scheme=scheme,
                                chunk_size=chunk_size)
        got = jax.jit(chunked)(key, _params(), 2.0)
        np.testing.assert_allclose(_flat(got), _flat(reference), rtol=1e-10)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_value(scheme):
    fun = lambda p: _quadratic(p, 1.0)
    smoothing, key = 0.1, jax.random.key(0)
    value, _ = zojax.zo_value_and_grad(fun, smoothing=smoothing, num_directions=3,
                                       scheme=scheme)(key, _params())
    if scheme == "forward":
        np.testing.assert_allclose(value, fun(_params()), rtol=1e-6)
    else:
        directions = [zojax.directions.gaussian(jax.random.fold_in(key, i), _params())
                      for i in range(3)]
        shifted = [fun(jax.tree.map(lambda x, u, s=s: x + s * smoothing * u, _params(), u))
                   for u in directions for s in (1, -1)]
        np.testing.assert_allclose(value, np.mean(shifted), rtol=1e-5)


def test_kwargs_and_pytree_structure():
    fun = lambda p, x, *, scale: scale * jnp.sum((p["w"] * x) ** 2) + jnp.sum(p["b"])
    grads = zojax.zo_grad(fun, smoothing=0.1, num_directions=2)(
        jax.random.key(0), _params(), 2.0, scale=3.0)
    assert jax.tree.structure(grads) == jax.tree.structure(_params())
    assert all(g.shape == p.shape and g.dtype == p.dtype
               for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(_params())))


def test_custom_sampler_plugs_in():
    """A shaped sampler (here a diagonal scaling, E[u uᵀ] = diag(s²)) needs no new estimator."""
    scales = {"w": jnp.full(5, 2.0), "b": jnp.full((2, 2), 0.5)}

    def scaled(key, params):
        return jax.tree.map(lambda u, s: u * s, zojax.directions.gaussian(key, params), scales)

    grad_fn = zojax.zo_grad(lambda p: _quadratic(p, 1.0), smoothing=0.01, direction=scaled)
    keys = jax.random.split(jax.random.key(1), NUM_SAMPLES)
    samples = jax.vmap(lambda k: grad_fn(k, _params()))(keys)
    flat = np.concatenate([samples["w"], samples["b"].reshape(NUM_SAMPLES, -1)], axis=1)
    expected = _flat(scales) ** 2 * _flat(jax.grad(_quadratic)(_params(), 1.0))
    _assert_mean(flat, expected)


def test_never_differentiates_the_objective():
    @jax.custom_jvp
    def fun(x):
        return jnp.sum(x**2)

    @fun.defjvp
    def _(primals, tangents):
        raise AssertionError("the objective was differentiated")

    for scheme in SCHEMES:
        for chunk_size in (None, 2):
            grads = jax.jit(zojax.zo_grad(fun, smoothing=0.1, num_directions=4, scheme=scheme,
                                          chunk_size=chunk_size))(jax.random.key(0), jnp.ones(3))
            assert grads.shape == (3,)
    with pytest.raises(AssertionError, match="differentiated"):
        zojax.forward_grad(fun)(jax.random.key(0), jnp.ones(3))


def _with_line_form(scale):
    """_quadratic with its line form written out: f(x + t u) = f(x) + t ∇f(x)ᵀu + ½ t² uᵀAu."""
    fun = lambda p, s: _quadratic(p, s)  # noqa: E731 (a fresh function to attach .along to)

    def along(params, direction, steps, s):
        slope = jax.jvp(lambda p: _quadratic(p, s), (params,), (direction,))[1]
        negated = jax.tree.map(jnp.negative, direction)
        curvature = _quadratic(direction, s) + _quadratic(negated, s)  # s uᵀAu
        return _quadratic(params, s) + steps * slope + 0.5 * steps**2 * curvature

    fun.along = along
    return fun


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_line_form_gives_the_same_estimate(scheme, chunk_size, x64):
    """An objective's line form ``fun.along`` is used when present, with the same result."""
    key, scale = jax.random.key(5), 2.0
    kwargs = dict(smoothing=0.1, num_directions=7, scheme=scheme, chunk_size=chunk_size)
    fun = _with_line_form(scale)
    plain = zojax.zo_value_and_grad(lambda p, s: _quadratic(p, s), **kwargs)(key, _params(), scale)
    along = jax.jit(zojax.zo_value_and_grad(fun, **kwargs))(key, _params(), scale)
    np.testing.assert_allclose(along[0], plain[0], rtol=1e-10)
    np.testing.assert_allclose(_flat(along[1]), _flat(plain[1]), rtol=1e-9)
    # The transform gets it from value_fn; bind keeps the line form, a lambda drops it.
    opt = zojax.two_point(0.1, num_directions=7, scheme=scheme, chunk_size=chunk_size, seed=key)
    value_fn = zojax.estimators.bind(fun, scale)
    assert hasattr(value_fn, "along") and not hasattr(lambda p: fun(p, scale), "along")
    updates, _ = opt.update(None, opt.init(_params()), _params(), value_fn=value_fn)
    expected, _ = opt.update(None, opt.init(_params()), _params(),
                             value_fn=lambda p: _quadratic(p, scale))
    np.testing.assert_allclose(_flat(updates), _flat(expected), rtol=1e-9)


def test_line_form_replaces_the_perturbed_evaluations():
    """Central differences with a line form never evaluate ``fun`` itself."""
    def fun(x):
        raise AssertionError("fun was evaluated")

    fun.along = lambda x, u, steps: jnp.sum((x + steps[:, None] * u) ** 2, axis=1)
    for chunk_size in (None, 2):
        grads = zojax.zo_grad(fun, smoothing=0.1, num_directions=4, chunk_size=chunk_size)(
            jax.random.key(0), jnp.ones(3))
        assert grads.shape == (3,) and bool(jnp.all(jnp.isfinite(grads)))


def test_line_form_must_return_one_value_per_step():
    fun = lambda x: jnp.sum(x**2)  # noqa: E731
    fun.along = lambda x, u, steps: jnp.sum(x + u)  # one value, not one per step
    with pytest.raises(ValueError, match=r"fun.along must return one value per step"):
        zojax.zo_grad(fun, smoothing=0.1)(jax.random.key(0), jnp.ones(3))
    opt = zojax.two_point(0.1)
    with pytest.raises(ValueError, match=r"value_fn.along must return one value per step"):
        opt.update(None, opt.init(jnp.ones(3)), jnp.ones(3), value_fn=zojax.estimators.bind(fun))


def test_forward_grad_is_the_zero_smoothing_limit(x64):
    fun = lambda p: _cubic(p)
    key = jax.random.key(5)
    limit = zojax.forward_grad(fun, num_directions=6)(key, _params())
    close = zojax.zo_grad(fun, smoothing=1e-5, num_directions=6)(key, _params())
    np.testing.assert_allclose(_flat(limit), _flat(close), rtol=1e-6, atol=1e-8)
    samples = jax.vmap(lambda k: zojax.forward_grad(fun)(k, _params()))(
        jax.random.split(key, NUM_SAMPLES))
    flat = np.concatenate([samples["w"], samples["b"].reshape(NUM_SAMPLES, -1)], axis=1)
    _assert_mean(flat, _flat(jax.grad(fun)(_params())))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_directions_are_isotropic(direction, x64):
    """E[u uᵀ] = I for every named sampler (the convention that makes λ comparable)."""
    params = _params()
    sample = zojax.directions.SAMPLERS[direction]
    u = jax.vmap(lambda k: _flat_jnp(sample(k, params)))(jax.random.split(jax.random.key(0),
                                                                           NUM_SAMPLES))
    second_moment = np.asarray(u.T @ u / NUM_SAMPLES)
    per_entry_sem = np.asarray(jnp.std(u[:, :, None] * u[:, None, :], axis=0)) / np.sqrt(
        NUM_SAMPLES)
    z = (second_moment - np.eye(9)) / np.maximum(per_entry_sem, 1e-12)
    assert np.all(np.abs(z) < Z_MAX)


def _flat_jnp(tree):
    return jnp.concatenate([jnp.ravel(tree["w"]), jnp.ravel(tree["b"])])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_samplers_equal_jax_random(dtype):
    """The fused threefry samplers are bit-identical to jax.random (under jit and vmap too)."""
    params = {"a": jnp.zeros((3, 5), dtype), "b": jnp.zeros(7, dtype)}
    key = jax.random.key(123)
    for sample, reference in ((zojax.directions.gaussian, jax.random.normal),
                              (zojax.directions.rademacher, jax.random.rademacher)):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        expected = treedef.unflatten([reference(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])
        for got in (sample(key, params), jax.jit(sample)(key, params),
                    jax.tree.map(lambda x: x[0], jax.vmap(sample, (0, None))(key[None], params))):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
                np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
