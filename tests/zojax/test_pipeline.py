"""The estimator stages: stateful perturbations, weightings that chunk exactly, partial estimates
that combine, the transform builder's state, objectives, and the non-CPU backend path."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from stages import diagonal_perturbation

import zojax
from zojax import _cpu, estimators, weightings

Z_MAX = 4.5  # |mean − expected| / standard error, per coordinate


def _params(dtype=jnp.float32):
    return {"w": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.array([[0.3, 0.1]], dtype)}


_SCALES = {"w": jnp.array([1.0, 2.0, 0.5]), "b": jnp.array([[3.0, 1.0]])}


def _quadratic(params):
    return sum(jnp.sum(s * (p - 0.2) ** 2) for s, p in zip(jax.tree.leaves(_SCALES),
                                                           jax.tree.leaves(params)))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------------------------
# Stateful perturbations


def test_stateful_perturbation_mean_is_sigma_grad(x64):
    """E[ĝ] = Σ∇f on a quadratic (central differences are exact there)."""
    perturbation = diagonal_perturbation()
    params = _params()
    state = perturbation.init(params)
    state = {**state, "variance": jax.tree.map(lambda v, s: v * s, state["variance"], _SCALES)}
    grad_fn = zojax.zo_grad(_quadratic, smoothing=0.3, num_directions=4, direction=perturbation)
    keys = jax.random.split(jax.random.key(0), 4000)
    flat = lambda tree: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    samples = jax.jit(jax.vmap(lambda k: flat(grad_fn(k, params, perturbation_state=state))))(keys)
    samples = np.asarray(samples, np.float64)
    expected = _flat(perturbation.cov_matvec(state, jax.grad(_quadratic)(params)))
    sem = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(samples.mean(axis=0) - expected) < Z_MAX * sem)


def _run(opt, params, num_steps=6, loss=_quadratic):
    def step(carry, _):
        params, state = carry
        updates, state = opt.update(None, state, params, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, opt.init(params)), length=num_steps)
    return params, state


def test_stateful_perturbation_through_two_point():
    """Under jit, lax.scan, vmap and inject_hyperparams, its state nested in the optax state."""
    perturbation = diagonal_perturbation()
    opt = optax.chain(zojax.two_point(0.01, 3, direction=perturbation, seed=1), optax.sgd(0.05))
    params = _params()
    final, state = jax.jit(functools.partial(_run, opt))(params)
    nested = optax.tree_utils.tree_get(state, "perturbation_state")
    assert int(nested["steps"]) == 6
    assert not np.allclose(_flat(nested["variance"]), 2.0)  # updated from the values
    assert _quadratic(final) < _quadratic(params)
    # vmapped over seeds: one state per member.
    seeds = jnp.arange(3)
    _, states = jax.jit(jax.vmap(lambda s: _run(
        optax.chain(zojax.two_point(0.01, 3, direction=perturbation, seed=s), optax.sgd(0.05)),
        params)))(seeds)
    chex.assert_shape(optax.tree_utils.tree_get(states, "perturbation_state")["steps"], (3,))
    # inject_hyperparams lifts the smoothing and gives the same updates.
    injected = optax.inject_hyperparams(zojax.two_point,
                                        static_args=("num_directions", "direction"))(
        smoothing=0.01, num_directions=3, direction=perturbation, seed=1)
    plain = zojax.two_point(0.01, 3, direction=perturbation, seed=1)
    got, _ = jax.jit(functools.partial(_run, optax.chain(injected, optax.sgd(0.05))))(params)
    expected, _ = jax.jit(functools.partial(_run, optax.chain(plain, optax.sgd(0.05))))(params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6)
    assert int(optax.tree_utils.tree_get(
        injected.init(params), "perturbation_state")["steps"]) == 0


def test_stateful_perturbation_keeps_its_state_on_a_nonfinite_step():
    perturbation = diagonal_perturbation()
    opt = zojax.two_point(0.01, 2, direction=perturbation)
    params = _params()
    state = opt.init(params)
    updates, new_state = jax.jit(lambda s: opt.update(None, s, params,
                                                      value_fn=lambda p: _quadratic(p) * jnp.inf)
                                 )(state)
    chex.assert_trees_all_equal(new_state.perturbation_state, state.perturbation_state)
    assert int(new_state.num_nonfinite) == 1 and not np.any(_flat(updates))


def test_stateful_perturbation_without_state_says_how_to_pass_it():
    grad_fn = zojax.zo_grad(_quadratic, smoothing=0.1, direction=diagonal_perturbation())
    with pytest.raises(ValueError, match=r"perturbation_state=perturbation\.init\(params\)"):
        grad_fn(jax.random.key(0), _params())
    with pytest.raises(ValueError, match="perturbation_state"):
        zojax.forward_grad(_quadratic, direction=diagonal_perturbation())(jax.random.key(0),
                                                                          _params())


@pytest.mark.parametrize("bad, where", [
    (lambda key, p: {"w": p["w"]}, "structure"),
    (lambda key, p: {"w": p["w"], "b": jnp.zeros((2,))}, r"params\['b'\]"),
    (lambda key, p: {"w": p["w"].astype(jnp.float16), "b": p["b"]}, r"params\['w'\]"),
])
def test_sample_of_another_structure_shape_or_dtype_names_the_leaf(bad, where):
    with pytest.raises(ValueError, match=where):
        zojax.zo_grad(_quadratic, smoothing=0.1, direction=bad)(jax.random.key(0), _params())
    opt = zojax.two_point(0.1, direction=bad)
    with pytest.raises(ValueError, match=where):
        opt.update(None, opt.init(_params()), _params(), value_fn=_quadratic)


def test_one_registry_of_direction_names():
    assert tuple(zojax.directions.PERTURBATIONS) == tuple(zojax.directions.SAMPLERS)
    for factory in (lambda d: zojax.two_point(0.1, direction=d),
                    lambda d: zojax.zo_grad(_quadratic, smoothing=0.1, direction=d),
                    lambda d: zojax.forward_gradient(direction=d),
                    lambda d: zojax.hutchinson_trace(_quadratic, jax.random.key(0), _params(),
                                                     num_samples=2, direction=d),
                    lambda d: zojax.zo_trace(_quadratic, jax.random.key(0), _params(),
                                             delta=0.1, num_samples=2, direction=d)):
        with pytest.raises(ValueError, match=r"direction must be one of \('gaussian', 'sphere', "
                                             r"'rademacher', 'coordinate'\)"):
            factory("gauss")


@pytest.mark.parametrize("direction", list(zojax.directions.SAMPLERS))
def test_named_perturbations_are_isotropic_by_cov_matvec(direction):
    perturbation = zojax.directions.as_perturbation(direction)
    v = _params()
    chex.assert_trees_all_equal(perturbation.cov_matvec(perturbation.init(v), v), v)


# ---------------------------------------------------------------------------------------------
# Weightings, partial estimates


def _with_line_form():
    def along(params, direction, steps):
        return jax.vmap(lambda t: _quadratic(jax.tree.map(lambda x, u: x + t * u, params,
                                                          direction)))(steps)

    return estimators.Objective(_quadratic, along)


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_softmax_weighting_chunks_exactly(chunk_size, x64):
    """Chunked (dividing q or not), scanned and combined accumulators: one unchunked call."""
    key, params, num = jax.random.key(3), _params(jnp.float64), 10
    weighting = weightings.softmax(tilt=2.0)

    def estimate(start, num_directions, chunk):
        return estimators.partial_estimate(_quadratic, key, params, smoothing=0.3, start=start,
                                           num_directions=num_directions, chunk_size=chunk,
                                           weighting=weighting)

    @jax.jit
    def all_three():
        halves = estimators.combine(estimate(0, 4, chunk_size), estimate(4, 6, 2), weighting)
        return estimate(0, num, None), estimate(0, num, chunk_size), halves

    whole, chunked, halves = all_three()
    expected = estimators.finalize(whole, params, weighting)
    for partial in (chunked, halves):
        value, grads, _ = estimators.finalize(partial, params, weighting)
        chex.assert_trees_all_close(grads, expected[1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(value, expected[0], rtol=1e-10)
    # It is a softmax: the weights of every value of every direction, normalized together.
    weights = jax.nn.softmax(2.0 * whole.values.ravel()).reshape(whole.values.shape)
    directions = [zojax.directions.gaussian(jax.random.fold_in(key, i), params)
                  for i in range(num)]
    softmax = jax.tree.map(lambda *us: sum((w[0] - w[1]) * u for w, u in zip(weights, us)),
                           *directions)
    chex.assert_trees_all_close(expected[1], softmax, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheme", ["central", "forward"])
@pytest.mark.parametrize("line_form", [False, True])
def test_two_halves_combine_to_the_whole(scheme, line_form, x64):
    key, params = jax.random.key(4), _params(jnp.float64)
    fun = _with_line_form() if line_form else _quadratic
    kwargs = dict(smoothing=0.1, scheme=scheme)

    @jax.jit
    def whole_and_halves(start):  # the second half from a traced start (a device's share)
        whole = estimators.partial_estimate(fun, key, params, num_directions=9, chunk_size=2,
                                            **kwargs)
        first = estimators.partial_estimate(fun, key, params, num_directions=4, **kwargs)
        second = estimators.partial_estimate(fun, key, params, start=start, num_directions=5,
                                             **kwargs)
        return whole, estimators.combine(first, second)

    whole, combined = whole_and_halves(4)
    value, grads, finite = estimators.finalize(combined, params)
    expected = estimators.finalize(whole, params)
    chex.assert_trees_all_close(grads, expected[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(value, expected[0], rtol=1e-12)
    np.testing.assert_allclose(combined.values, whole.values, rtol=1e-12)
    assert bool(finite)
    # Each half of a forward estimate evaluates f(x) itself: one query more than the whole.
    assert int(combined.num_queries) == int(whole.num_queries) + (scheme == "forward")


def test_mean_and_sem_weighting_combines_exactly(x64):
    samples = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, size=(50, 1)))
    weighting = weightings.mean_and_sem(lambda values: values[:, 0])
    params = jnp.zeros(1, jnp.float64)
    one = weighting.add(weighting.init(params), samples, None)
    split = weighting.combine(weighting.add(weighting.init(params), samples[:17], None),
                              weighting.add(weighting.init(params), samples[17:], None))
    for acc in (one, split):
        mean, sem = weighting.finalize(acc)
        np.testing.assert_allclose(mean, np.mean(samples), rtol=1e-12)
        np.testing.assert_allclose(sem, np.std(samples, ddof=1) / np.sqrt(50), rtol=1e-12)


def test_per_coordinate_mean_and_sem_combines_exactly(x64):
    """A pytree sample per direction (Hutchinson's diagonal): Chan's update, leaf by leaf."""
    rng = np.random.default_rng(1)
    params = {"a": jnp.zeros((2, 3), jnp.float64), "b": jnp.zeros((), jnp.float64)}
    samples = {"a": jnp.asarray(rng.normal(1.0, 2.0, size=(40, 2, 3))),
               "b": jnp.asarray(rng.normal(size=40))}
    weighting = weightings.mean_and_sem(lambda values: values, per_coordinate=True)
    first = jax.tree.map(lambda x: x[:13], samples)
    second = jax.tree.map(lambda x: x[13:], samples)
    one = weighting.add(weighting.init(params), samples, None)
    split = weighting.combine(weighting.add(weighting.init(params), first, None),
                              weighting.add(weighting.init(params), second, None))
    for acc in (one, split):
        mean, sem = weighting.finalize(acc)
        for name in params:
            assert mean[name].shape == params[name].shape
            np.testing.assert_allclose(mean[name], np.mean(samples[name], axis=0), rtol=1e-12)
            np.testing.assert_allclose(sem[name], np.std(samples[name], axis=0, ddof=1)
                                       / np.sqrt(40), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The transform builder's state


@pytest.mark.parametrize("scheme, per_step", [("central", 6), ("forward", 4)])
def test_state_value_and_num_queries(scheme, per_step):
    opt = zojax.two_point(0.01, 3, scheme=scheme)
    params = _params()
    _, state = jax.jit(functools.partial(_run, opt, num_steps=5))(params)
    assert state.num_queries.dtype == jnp.int32 and int(state.num_queries) == 5 * per_step
    assert state.value.dtype == jnp.float32 and state.value.shape == ()
    state = opt.init(params)
    _, state = opt.update(None, state, params, value_fn=_quadratic)
    # The loss at the params it was given (central: the mean of f(x ± λu), within O(λ²)).
    np.testing.assert_allclose(state.value, _quadratic(params), rtol=1e-3)
    assert optax.tree_utils.tree_get(state, "value") is state.value
    # optax's reader of the state's value finds it.
    assert optax.tree_utils.tree_get(optax.chain(opt, optax.sgd(1.0)).init(params),
                                     "value") is not None


def test_two_point_state_keeps_its_first_three_fields():
    key = jax.random.key(0)
    state = zojax.TwoPointState(jnp.zeros([], jnp.int32), key, jnp.zeros([], jnp.int32))
    assert state[:3] == (state.count, state.key, state.num_nonfinite)
    assert state.perturbation_state == () and int(state.num_queries) == 0
    opt = zojax.two_point(0.1)
    _, new = opt.update(None, state, _params(), value_fn=_quadratic)
    assert int(new.count) == 1 and int(new.num_queries) == 2


def test_estimator_transform_builds_a_new_estimator():
    """A forward-difference estimator from the public builder, with the builder's policy."""
    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return estimators.two_point_estimate(value_fn, key, params, smoothing=0.01,
                                             num_directions=2, scheme="forward",
                                             perturbation_state=perturbation_state)

    opt = zojax.transforms.estimator_transform(estimate, seed=3)
    reference = zojax.two_point(0.01, 2, scheme="forward", seed=3)
    params = _params()
    got, state = opt.update(None, opt.init(params), params, value_fn=_quadratic)
    expected, _ = reference.update(None, reference.init(params), params, value_fn=_quadratic)
    chex.assert_trees_all_close(got, expected)
    assert int(state.num_queries) == 3


# ---------------------------------------------------------------------------------------------
# Objectives, traces


def test_objectives_bind_and_function_attributes():
    objective = _with_line_form()
    bound = estimators.bind(objective)
    assert isinstance(bound, estimators.Objective) and bound.along is not None
    plain = estimators.bind(lambda p, a: _quadratic(p) * a, 2.0)
    assert plain.along is None and float(plain(_params())) == float(2 * _quadratic(_params()))

    def fun(params):
        return _quadratic(params)

    fun.along = objective.along  # today's documented form, converted
    assert estimators.as_objective(fun).along is not None
    key = jax.random.key(0)
    for f in (objective, fun, bound):
        chex.assert_trees_all_close(
            zojax.zo_grad(f, smoothing=0.1, num_directions=3)(key, _params()),
            zojax.zo_grad(_quadratic, smoothing=0.1, num_directions=3)(key, _params()),
            rtol=1e-5)


def test_zo_trace_direction_and_line_form(x64):
    key, params = jax.random.key(1), _params(jnp.float64)
    exact = float(zojax.hessian_trace(_quadratic, params))
    plain = zojax.zo_trace(_quadratic, key, params, delta=0.1, num_samples=64, chunk_size=8)
    along = zojax.zo_trace(_with_line_form(), key, params, delta=0.1, num_samples=64)
    np.testing.assert_allclose(along, plain, rtol=1e-10)
    # Rademacher probes: zᵀHz = tr H exactly for a diagonal H, so the SEM is 0.
    estimate, sem = zojax.zo_trace(_quadratic, key, params, delta=0.1, num_samples=16,
                                   direction="rademacher")
    np.testing.assert_allclose(estimate, exact, rtol=1e-10)
    assert float(sem) < 1e-8


# ---------------------------------------------------------------------------------------------
# The non-CPU backend path, run on this CPU


@pytest.mark.parametrize("scheme", ["central", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_default_backend_path_gives_the_same_estimates(scheme, chunk_size, x64):
    """The plain branches of zojax._cpu (other platforms) agree with the CPU tricks."""
    key, params = jax.random.key(2), _params(jnp.float64)
    kwargs = dict(smoothing=0.1, num_directions=7, scheme=scheme, chunk_size=chunk_size)

    def estimates():  # the directions whose sampling and storage differ by backend
        return jax.jit(lambda: [zojax.zo_grad(_quadratic, direction=d, **kwargs)(key, params)
                                for d in ("gaussian", "rademacher", "sphere")])()

    cpu = estimates()
    with _cpu.force_default():
        default = estimates()
    *draws, sphere = zip(default, cpu)
    chex.assert_trees_all_close(*zip(*draws), rtol=1e-12, atol=1e-14)
    # The sphere's scale √(d / Σ n²) is a float32 sum by design, in an order each program's
    # compiler picks: (d + 1) float32 roundings at most, doubled (in the direction and in its
    # finite-difference coefficient).
    d = sum(x.size for x in jax.tree.leaves(params))
    chex.assert_trees_all_close(*sphere, rtol=2 * (d + 1) * np.finfo(np.float32).eps)


def test_default_backend_path_samples_and_steps():
    """float32: the plain samplers are jax.random itself; a scanned ZO-SGD run descends."""
    params = _params()
    key = jax.random.key(5)
    fused = zojax.directions.gaussian(key, params)
    with _cpu.force_default():
        plain = zojax.directions.gaussian(key, params)
        final, state = jax.jit(functools.partial(
            _run, zojax.zo_sgd(0.05, 0.01, num_directions=2, chunk_size=1), num_steps=20))(params)
    chex.assert_trees_all_equal(plain, fused)
    assert _quadratic(final) < _quadratic(params)
    assert int(optax.tree_utils.tree_get(state, "num_queries")) == 80


@pytest.mark.parametrize("smoothing", [0.0, -0.1, float("nan"), float("inf")])
def test_traced_bad_smoothing_raises_nothing_and_skips_the_step(smoothing):
    """Under inject_hyperparams values are traced: no error, the non-finite policy applies."""
    opt = optax.inject_hyperparams(zojax.two_point, static_args=("num_directions",))(
        smoothing=0.1, num_directions=2)
    params = _params()
    state = opt.init(params)
    state.hyperparams["smoothing"] = jnp.asarray(smoothing)
    updates, state = jax.jit(lambda s: opt.update(None, s, params, value_fn=_quadratic))(state)
    assert not np.any(_flat(updates)) and int(state.inner_state.num_nonfinite) == 1


def test_a_bound_objective_is_a_function_to_jax():
    objective = estimators.bind(_with_line_form())
    params = _params()
    np.testing.assert_allclose(jax.jit(objective)(params), _quadratic(params))
    chex.assert_trees_all_close(jax.jit(jax.grad(objective))(params), jax.grad(_quadratic)(params))
