"""Half-precision (bfloat16, float16) parameters: how accurate the estimate is, and where λ is too
small for the dtype.

A half-precision entry x moves only by multiples of its spacing (about 2⁻⁷|x| in bfloat16,
2⁻¹⁰|x| in float16): zojax forms x ± λu in float32, rounds it once, and weights each direction
by the perturbation actually applied. Float32 parameters go through the same code as before.
Fixed seeds; the cosine's tolerance is three jackknife standard errors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax import pipeline
from zojax.objective import Objective, bind

IN, WIDTH, BATCH = 4, 16, 64  # d = 97 parameters
NUM_BATCHES, PER_BATCH = 16, 256  # 4096 directions, in 16 partial estimates (for the jackknife)
Z = 3.0


def _mlp():
    """A tanh MLP with N(0, 1/fan_in) weights, and a regression batch from a teacher MLP."""
    k1, k2, k3, k4, k5, k6 = jax.random.split(jax.random.key(0), 6)
    params = {"w1": jax.random.normal(k1, (IN, WIDTH)) / np.sqrt(IN),
              "b1": 0.1 * jax.random.normal(k4, (WIDTH,)),
              "w2": jax.random.normal(k2, (WIDTH, 1)) / np.sqrt(WIDTH),
              "b2": jnp.zeros((1,))}
    teacher = {"w1": jax.random.normal(k5, (IN, WIDTH)) / np.sqrt(IN), "b1": jnp.zeros(WIDTH),
               "w2": jax.random.normal(k6, (WIDTH, 1)) / np.sqrt(WIDTH), "b2": jnp.zeros(1)}
    x = jax.random.normal(k3, (BATCH, IN))
    return params, x, _forward(teacher, x)


def _forward(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _loss(params, x, y):
    """The mean squared error, computed in the parameters' dtype (the model's own rounding)."""
    dtype = params["w1"].dtype
    return jnp.mean((_forward(params, x.astype(dtype)) - y.astype(dtype)) ** 2)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cosine_at_the_documented_smoothing(dtype):
    """At λ = HALF_PRECISION_SMOOTHING[dtype] (no warning) the mean estimate over 4096 directions
    has cosine ≥ 0.9 with ∇f at the rounded point, by three jackknife standard errors."""
    smoothing = pipeline.HALF_PRECISION_SMOOTHING[dtype]
    params32, x, y = _mlp()
    params = jax.tree.map(lambda p: p.astype(dtype), params32)
    grad = np.asarray(_flat(jax.grad(_loss)(jax.tree.map(lambda p: p.astype(jnp.float32),
                                                         params), x, y)), np.float64)
    objective = bind(_loss, x, y)

    @jax.jit
    def batches(key, params):
        def one(start):  # directions [start, start + PER_BATCH): 16 of them make 0..4095
            partial = pipeline.partial_estimate(objective, key, params, smoothing=smoothing,
                                                  start=start, num_directions=PER_BATCH,
                                                  chunk_size=PER_BATCH)
            grads = pipeline.finalize(partial, params)[1]
            assert all(g.dtype == jnp.dtype(dtype) for g in jax.tree.leaves(grads))
            return _flat(grads)

        return jax.lax.map(one, jnp.arange(NUM_BATCHES, dtype=jnp.uint32) * PER_BATCH)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented λ does not warn
        estimates = np.asarray(batches(jax.random.key(1), params), np.float64)
    mean = estimates.mean(0)
    cosine = _cosine(mean, grad)
    left_out = np.array([_cosine((mean * NUM_BATCHES - e) / (NUM_BATCHES - 1), grad)
                         for e in estimates])
    stderr = np.sqrt((NUM_BATCHES - 1) / NUM_BATCHES * np.sum((left_out - left_out.mean()) ** 2))
    assert cosine - Z * stderr >= 0.9, (cosine, stderr)


@pytest.mark.parametrize("other", ["float16", "float32"])
@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_a_float16_leaf_the_step_cannot_move_gets_no_estimate(other, scheme):
    """A float16 leaf at 4.0 (spacing 2⁻⁸) is never moved by λu = 1e-4·u: its estimate must be
    zero, not the mean of c_i u_i over directions that never moved it (noise of either sign)."""
    key = jax.random.key(0)
    params = {"w": (0.2 * jax.random.normal(key, (24,))).astype(other),
              "scale": jnp.full((8,), 4.0, jnp.float16)}

    def loss(p):  # computed in float32 from the rounded params: ∇ = (w + 1, scale − 3)
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        return 0.5 * jnp.sum((p["w"] + 1) ** 2) + 0.5 * jnp.sum((p["scale"] - 3) ** 2)

    grad = jax.grad(loss)(params)
    estimate = jax.jit(zojax.zo_grad(loss, smoothing=1e-4, num_directions=256, scheme=scheme))(
        jax.random.key(1), params)
    scale = np.asarray(estimate["scale"], np.float32)
    assert np.all(scale * np.asarray(grad["scale"]) >= 0), scale  # never the wrong sign
    np.testing.assert_array_equal(scale, 0.0)
    # The leaf the step moves is estimated: 256 directions, 24 entries, cosine ≈ 0.95 expected.
    assert _cosine(np.asarray(estimate["w"], np.float32), np.asarray(grad["w"])) > 0.85


def test_half_precision_weights_are_the_applied_perturbation():
    """One direction, coefficient 1: the weighting sees (round(x + λu) − round(x − λu)) / 2λ for a
    bfloat16 leaf (x ± λu formed in float32, rounded once) and u itself for a float32 leaf."""
    smoothing = 3e-3
    params = {"half": jnp.linspace(-2.0, 2.0, 33).astype(jnp.bfloat16),
              "full": jnp.linspace(-2.0, 2.0, 33)}
    ones = zojax.weightings.mean(lambda values: jnp.ones(values.shape[0]))
    key = jax.random.key(2)
    for chunk_size in (None, 1):
        got = jax.jit(lambda params, chunk_size=chunk_size: ones.finalize(
            pipeline.partial_estimate(lambda p: jnp.float32(0), key, params,
                                        smoothing=smoothing, num_directions=1,
                                        chunk_size=chunk_size, weighting=ones).acc))(params)
        u = zojax.directions.gaussian(jax.random.fold_in(key, 0), params)
        np.testing.assert_array_equal(got["full"], u["full"])
        x, v = params["half"].astype(jnp.float32), u["half"].astype(jnp.float32)
        plus = (x + jnp.float32(smoothing) * v).astype(jnp.bfloat16).astype(jnp.float32)
        minus = (x - jnp.float32(smoothing) * v).astype(jnp.bfloat16).astype(jnp.float32)
        np.testing.assert_allclose(got["half"], (plus - minus) / (2 * jnp.float32(smoothing)),
                                   rtol=1e-6)
        assert not np.allclose(got["half"], v, rtol=0.05)  # rounding matters at this λ


def _sum_of_squares(p):
    return jnp.sum(p["w"].astype(jnp.float32) ** 2) + jnp.sum(p["b"] ** 2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_warns_below_the_smallest_smoothing(dtype):
    """A UserWarning at trace time that names the leaf, its dtype and the smallest λ (the
    documented λ itself does not warn: test_cosine_at_the_documented_smoothing)."""
    smallest = pipeline.HALF_PRECISION_SMOOTHING[dtype]
    params = {"w": jnp.ones(3, dtype), "b": jnp.zeros(2, jnp.float32)}
    opt = zojax.two_point(smallest / 4, num_directions=2)
    with pytest.warns(UserWarning, match=rf"{dtype}.*params\['w'\].*λ ≥ {smallest:g}"):
        jax.jit(lambda s, p: opt.update(None, s, p, value_fn=_sum_of_squares))(opt.init(params),
                                                                               params)


def test_no_warning_for_float32_or_a_traced_smoothing():
    params = {"w": jnp.ones(3, jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
    full = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    injected = optax.inject_hyperparams(zojax.two_point, static_args=("num_directions",))(
        smoothing=1e-5, num_directions=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(zojax.zo_grad(_sum_of_squares, smoothing=1e-7, num_directions=2))(
            jax.random.key(0), full)
        jax.jit(lambda s, p: injected.update(None, s, p, value_fn=_sum_of_squares))(
            injected.init(params), params)


def test_float32_is_the_plain_two_point_formula():
    """Float32 params: the estimate is the hand-written two-point formula with the same
    directions, u_i = gaussian(fold_in(key, i), params), chunked or not, with or without a line
    form. The entries sit near 1000 (spacing 6e-5) and λ = 1e-3: weighting by the applied step
    instead of u_i, as for half-precision leaves, would differ by about 1%."""
    smoothing, num_directions, key = 1e-3, 7, jax.random.key(3)
    params = {"w": 1000.0 + jnp.arange(12.0).reshape(3, 4) / 8, "b": jnp.linspace(999.0, 1001.0, 5)}
    center = jax.tree.map(jnp.copy, params)
    a = {"w": jnp.linspace(0.5, 2.0, 12).reshape(3, 4), "b": jnp.linspace(-1.0, 1.0, 5)}

    def loss(p):  # f depends on p − center (exact in float32): no cancellation in f(x ± λu)
        return sum(jnp.sum(a_ * (p_ - c_) + 0.5 * (p_ - c_) ** 2)
                   for a_, p_, c_ in zip(jax.tree.leaves(a), jax.tree.leaves(p),
                                         jax.tree.leaves(center)))

    def along(p, u, steps):
        return jax.vmap(lambda t: loss(jax.tree.map(lambda x, v: x + t * v, p, u)))(steps)

    @jax.jit
    def formula(params):  # {scheme: estimate}
        step, out = jnp.float32(smoothing), {}
        u = jax.vmap(lambda i: zojax.directions.gaussian(jax.random.fold_in(key, i), params))(
            jnp.arange(num_directions, dtype=jnp.uint32))
        plus = jax.vmap(lambda u: loss(jax.tree.map(lambda x, v: x + step * v, params, u)))(u)
        minus = jax.vmap(lambda u: loss(jax.tree.map(lambda x, v: x - step * v, params, u)))(u)
        for scheme, c in (("central", (plus - minus) / (2 * step)),
                          ("forward", (plus - loss(params)) / step)):
            out[scheme] = jax.tree.map(lambda v, c=c: jnp.tensordot(c, v, 1) / num_directions, u)
        return out

    expected = formula(params)
    for scheme, chunk_size, fun in (("central", None, loss), ("central", 1, loss),
                                    ("forward", 3, loss),
                                    ("central", 3, Objective(loss, along))):
        got = jax.jit(zojax.zo_grad(fun, smoothing=smoothing, num_directions=num_directions,
                                    scheme=scheme, chunk_size=chunk_size))(key, params)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected[scheme])):
            assert g.dtype == jnp.float32
            np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-5,
                                       err_msg=f"{scheme}, chunk_size={chunk_size}, {fun}")
