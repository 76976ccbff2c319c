"""The random streams of the directions (``stream=``): the default is ``jax.random`` bit for bit;
the fast stream's moments, and every estimator's mean with it, against closed forms (fixed
seeds, tolerances from standard errors, as in test_estimators)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zojax
from tests.zojax import test_low_memory
from tests.zojax.test_estimators import Z_MAX, _assert_mean, _flat, _params, _quadratic
from zojax import directions
from zojax.objective import bind

FAST = ("gaussian", "rademacher")
NUM_SAMPLES = 20_000


def test_default_stream_is_jax_random():
    """stream="jax" (the default) draws jax.random.normal / rademacher of each leaf's split key
    (bfloat16 too: test_estimators' fused-sampler test)."""
    dtype = jnp.float32
    params = {"a": jnp.zeros((3, 5), dtype), "b": jnp.zeros(7, dtype)}
    key = jax.random.key(7)
    keys = jax.random.split(key, 2)
    for name, reference in (("gaussian", jax.random.normal), ("rademacher", jax.random.rademacher)):
        for perturbation in (directions.as_perturbation(name),
                             directions.as_perturbation(name, "jax")):
            got = jax.jit(lambda k, p=perturbation: p.sample(k, params, (), ()))(key)
            for leaf, k in zip(("a", "b"), keys):
                expected = reference(k, params[leaf].shape, dtype)
                np.testing.assert_array_equal(np.asarray(got[leaf], np.float32),
                                              np.asarray(expected, np.float32))


def _fast_samples(name, size=8, num=NUM_SAMPLES):
    sample = directions.STREAMS["fast"][name].sample
    params = {"w": jnp.zeros(size - 3), "b": jnp.zeros((3,))}
    keys = jax.random.split(jax.random.key(0), num)
    u = jax.jit(jax.vmap(lambda k: sample(k, params, (), ())))(keys)
    return np.asarray(jnp.concatenate([u["w"], u["b"]], 1), np.float64)


@pytest.mark.parametrize("name", FAST)
def test_fast_stream_moments(name):
    """Mean 0 and E[u uᵀ] = I within a few standard errors; the Rademacher's entries are ±1, the
    Gaussian's (ones − 32) / 4 (multiples of 1/4 in [−8, 8], fourth moment 3 − 1/32)."""
    u = _fast_samples(name)
    _assert_mean(u, np.zeros(u.shape[1]))
    products = u[:, :, None] * u[:, None, :]
    sem = products.std(0, ddof=1) / np.sqrt(len(u))
    z = (products.mean(0) - np.eye(u.shape[1])) / np.maximum(sem, 1e-12)
    assert np.all(np.abs(z) < Z_MAX), z
    if name == "rademacher":
        np.testing.assert_array_equal(np.abs(u), 1.0)
    else:
        np.testing.assert_array_equal(u * 4, np.round(u * 4))
        assert np.abs(u).max() <= 8
        fourth = u**4
        z4 = (fourth.mean() - (3 - 1 / 32)) / (fourth.std(ddof=1) / np.sqrt(fourth.size))
        assert abs(z4) < Z_MAX


@pytest.mark.parametrize("name", FAST)
def test_fast_stream_rows_and_leaves_are_the_whole_draws(name):
    """sample_leaf (the low-memory mode's draws) gives the whole draw's leaf and rows, bit for
    bit, in float32 and bfloat16, for widths that are and are not multiples of 64."""
    perturbation = directions.STREAMS["fast"][name]
    params = {"e": jnp.zeros((50, 64)), "f": jnp.zeros((33, 7), jnp.bfloat16)}
    key = jax.random.key(3)
    whole = perturbation.sample(key, params, (), ())
    rows = jnp.array([[0, 32], [17, 17]])
    for index, leaf in enumerate(("e", "f")):
        got = perturbation.sample_leaf(key, params, (), (), index)
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(whole[leaf], np.float32))
        got_rows = jax.jit(lambda k, i=index: perturbation.sample_leaf(k, params, (), (), i,
                                                                        rows))(key)
        np.testing.assert_array_equal(np.asarray(got_rows, np.float32),
                                      np.asarray(whole[leaf][rows], np.float32))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("estimator", ("central", "forward", "low_memory", "forward_grad"))
def test_unbiased_on_quadratic_with_the_fast_stream(name, estimator):
    """The two-point estimates (central, forward, low-memory) and the forward gradient have mean
    ∇f on a quadratic with the fast stream."""
    if estimator == "forward_grad":
        grad_fn = zojax.forward_grad(_quadratic, direction=name, stream="fast")
    else:
        grad_fn = zojax.zo_grad(_quadratic, smoothing=0.05, direction=name, stream="fast",
                                scheme="central" if estimator == "low_memory" else estimator,
                                low_memory=estimator == "low_memory")
    keys = jax.random.split(jax.random.key(42), NUM_SAMPLES)
    samples = jax.jit(jax.vmap(lambda k: grad_fn(k, _params(), 1.0)))(keys)
    flat = np.concatenate([samples["w"], samples["b"].reshape(NUM_SAMPLES, -1)], axis=1)
    _assert_mean(flat, _flat(jax.grad(_quadratic)(_params(), 1.0)))


def test_low_memory_equals_the_default_mode_with_the_fast_stream():
    """The low-memory mode regenerates the fast stream's directions per layer (whole leaves, and
    the embedding rows of the batch): the estimate of chunk_size=1, to float32 rounding. (The
    Gaussian only, for the tests' time: the Rademacher's rows are compared with its whole draw
    above, and its low-memory estimate's mean below.)"""
    def make(low):
        return zojax.zo_sgd(0.1, 1e-2, direction="gaussian", stream="fast",
                            chunk_size=None if low else 1, low_memory=low, seed=3)

    expected, _ = test_low_memory.step(make(False), bind(test_low_memory.loss,
                                                         test_low_memory.IDS))
    updates, _ = test_low_memory.step(make(True), bind(zojax.layerwise(test_low_memory.loss),
                                                       test_low_memory.IDS))
    test_low_memory.assert_same(updates, expected, test_low_memory.ROUNDING)


def test_a_stream_a_direction_cannot_use_is_an_error_naming_both():
    for direction in ("sphere", "coordinate", lambda key, params: params):
        with pytest.raises(ValueError, match="stream='fast'.*direction="):
            zojax.two_point(0.1, direction=direction, stream="fast")
    with pytest.raises(ValueError, match="stream='fast'.*direction='sphere'"):
        zojax.zo_sgd(0.1, 0.1, direction="sphere", stream="fast", low_memory=True)
    for stream in ("Fast", None, 1):
        with pytest.raises(ValueError, match="stream must be one of"):
            zojax.zo_grad(jnp.sum, smoothing=0.1, stream=stream)
