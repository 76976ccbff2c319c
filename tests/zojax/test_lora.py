"""zojax.lora: merged weights, the adapters' estimate against the smoothed loss's gradient, the
frozen base in both memory modes and in optax chains, and the errors of bad input."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import zojax
from zojax.lora import Adapter

PARAMS = {"layer": {"query": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10, "bias": jnp.ones(3)},
                    "value": {"kernel": -jnp.arange(6.0).reshape(3, 2) / 10,
                              "bias": jnp.zeros(2)}},
          "scale": jnp.asarray(0.5)}
X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
PATHS = r".*/(query|value)/kernel"


def loss(params, x):
    layer = params["layer"]
    h = jnp.tanh(x @ layer["query"]["kernel"] + layer["query"]["bias"])
    return params["scale"] * jnp.sum((h @ layer["value"]["kernel"] + layer["value"]["bias"]) ** 2)


def test_merged_weights_are_w_plus_scaled_a_b():
    adapters = zojax.lora.init(jax.random.key(0), PARAMS, PATHS, rank=2)
    assert jax.tree.structure(adapters) == jax.tree.structure(
        {"layer": {"query": {"kernel": Adapter(0, 0)}, "value": {"kernel": Adapter(0, 0)}}})
    q = adapters["layer"]["query"]["kernel"]
    assert q.a.shape == (4, 2) and q.b.shape == (2, 3)
    assert float(jnp.max(jnp.abs(q.a))) <= 1 / np.sqrt(4) and not jnp.any(q.b)
    # at init (B = 0) the merged params are the base
    merged = zojax.lora.merge(PARAMS, adapters, alpha=16.0)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(merged),
                                                           jax.tree.leaves(PARAMS)))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    merged = zojax.lora.merge(PARAMS, adapters, alpha=3.0)
    for name in ("query", "value"):
        w, (a, b) = PARAMS["layer"][name]["kernel"], adapters["layer"][name]["kernel"]
        np.testing.assert_allclose(merged["layer"][name]["kernel"], w + 3.0 / 2 * a @ b,
                                   rtol=1e-6, atol=1e-6)
        assert merged["layer"][name]["bias"] is PARAMS["layer"][name]["bias"]
    assert merged["scale"] is PARAMS["scale"]
    # bfloat16: computed in float32, rounded once to the matrix's dtype
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), (PARAMS, adapters))
    merged = zojax.lora.merge(*half, alpha=3.0)["layer"]["query"]["kernel"]
    w, (a, b) = jax.tree.map(lambda x: x.astype(jnp.float32), (
        half[0]["layer"]["query"]["kernel"], half[1]["layer"]["query"]["kernel"]))
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(merged, (w + 1.5 * a @ b).astype(jnp.bfloat16))


NUM_SAMPLES = 20_000
Z_MAX = 4.5  # over 10 coordinates, P(any |z| > 4.5) is about 7e-5


def test_the_adapters_estimate_is_unbiased_for_the_smoothed_gradient(x64):
    """A LoRA loss is quartic in (A, B): its Gaussian smoothing f_λ = E f(x + λu) has the
    gradient ∇f + (λ²/2) ∇Δf exactly (the fourth-order term is a constant), which the mean of
    central two-point estimates on the adapters matches, and the plain ∇f does not."""
    params = {"w": jnp.asarray([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])}
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)))
    y = jnp.asarray(np.random.default_rng(3).normal(size=(6, 2)))

    def regression(params):
        return jnp.sum((x @ params["w"] - y) ** 2)

    rng = np.random.default_rng(4)
    adapters = {"w": Adapter(jnp.asarray(rng.normal(size=(3, 2))),
                             jnp.asarray(rng.normal(size=(2, 2))))}
    objective = zojax.lora.objective(regression, params, alpha=2.0)
    smoothing = 0.5
    grad_fn = zojax.zo_grad(objective, smoothing=smoothing)
    keys = jax.random.split(jax.random.key(5), NUM_SAMPLES)
    samples = jax.jit(jax.vmap(lambda k: ravel_pytree(grad_fn(k, adapters))[0]))(keys)
    flat, unravel = ravel_pytree(adapters)
    f = lambda v: objective(unravel(v))  # noqa: E731
    laplacian = lambda v: jnp.trace(jax.hessian(f)(v))  # noqa: E731
    exact = jax.jit(jax.grad(f))(flat)
    smoothed = exact + smoothing**2 / 2 * jax.jit(jax.grad(laplacian))(flat)
    samples = np.asarray(samples)
    sem = samples.std(0, ddof=1) / np.sqrt(NUM_SAMPLES)
    z = (samples.mean(0) - np.asarray(smoothed)) / sem
    assert np.all(np.abs(z) < Z_MAX), f"z-scores {z}"
    told_apart = np.abs((samples.mean(0) - np.asarray(exact)) / sem)  # from ∇f
    assert np.max(told_apart) > 2 * Z_MAX


def test_estimators_perturb_and_move_the_adapters_alone_in_both_memory_modes():
    """Jitted steps on the adapters, the base params an argument: the low-memory mode's estimate
    is the default mode's (zojax.zo_sgd against optax.chain(zojax.two_point, optax.sgd)), and
    the merged params differ from the base at the adapted matrices alone."""
    adapters = zojax.lora.init(jax.random.key(0), PARAMS, PATHS, rank=2)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B ≠ 0: every entry moves
    base = jax.tree.map(jnp.copy, PARAMS)

    def step(opt):
        @jax.jit
        def run(adapters, params):
            value_fn = zojax.objective.bind(zojax.lora.objective(loss, params, 4.0), X)
            updates, _ = opt.update(None, opt.init(adapters), adapters, value_fn=value_fn)
            return optax.apply_updates(adapters, updates)
        return run(adapters, PARAMS)

    low = step(zojax.zo_sgd(0.1, 1e-2, 2, low_memory=True))
    default = step(optax.chain(zojax.two_point(1e-2, 2, chunk_size=1), optax.sgd(0.1)))
    assert jax.tree.structure(low) == jax.tree.structure(adapters)
    # to float32 rounding, relative to the largest entry (see tests/zojax/test_low_memory.py)
    for a, b, before in zip(*map(jax.tree.leaves, (low, default, adapters))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
        assert bool(jnp.all(a != before))
    merged = jax.tree_util.tree_flatten_with_path(zojax.lora.merge(PARAMS, low, 4.0))[0]
    for (path, x), y in zip(merged, jax.tree.leaves(base)):
        assert bool(jnp.array_equal(x, y)) == (not zojax.lora.path_name(path).endswith("kernel"))
    # the base params are left as they were
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(PARAMS),
                                                           jax.tree.leaves(base)))


def test_select_combine_and_freeze_train_a_subset():
    subset = zojax.lora.select(PARAMS, [r".*bias", "scale"])
    assert jax.tree.map(jnp.shape, subset) == {
        "layer": {"query": {"bias": (3,)}, "value": {"bias": (2,)}}, "scale": ()}
    combined = zojax.lora.combine(PARAMS, jax.tree.map(lambda x: x + 1, subset))
    np.testing.assert_array_equal(combined["scale"], 1.5)
    assert combined["layer"]["query"]["kernel"] is PARAMS["layer"]["query"]["kernel"]
    value_fn = zojax.objective.bind(zojax.lora.freeze(loss, PARAMS), X)
    assert float(value_fn(subset)) == pytest.approx(float(loss(PARAMS, X)))
    grads = jax.jit(zojax.zo_grad(value_fn, smoothing=1e-3))(jax.random.key(0), subset)
    assert jax.tree.structure(grads) == jax.tree.structure(subset)


def test_bad_input_is_an_error_naming_it():
    init = functools.partial(zojax.lora.init, jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match=r"'layer/query/bias' is float32\[3\]"):
        init(r"layer/query/.*")
    with pytest.raises(ValueError, match=r"'scale' is float32\[\]"):
        init("scale")
    with pytest.raises(ValueError, match=r"the path pattern '.*/key/kernel' matches no "
                                         r"parameter.*layer/query/kernel"):
        init([PATHS, ".*/key/kernel"])
    with pytest.raises(ValueError, match="matches no parameter"):
        zojax.lora.select(PARAMS, "query/kernel")  # whole paths: no match
    with pytest.raises(ValueError, match="rank must be a positive int"):
        init(PATHS, rank=0)
    with pytest.raises(ValueError, match="'other/kernel' is not the path of a leaf"):
        zojax.lora.merge(PARAMS, {"other": {"kernel": Adapter(jnp.ones((4, 1)),
                                                              jnp.ones((1, 3)))}})
    with pytest.raises(ValueError, match=r"the adapter of 'layer/value/kernel' has a \(4, 1\)"):
        zojax.lora.merge(PARAMS, {"layer": {"value": {"kernel": Adapter(
            jnp.ones((4, 1)), jnp.ones((1, 3)))}}})
    with pytest.raises(ValueError, match="the subset's 'scale' is float32\\[2\\]"):
        zojax.lora.combine(PARAMS, {"scale": jnp.ones(2)})


def test_lora_with_layerwise_is_the_plain_estimate_or_an_error_saying_what_to_do():
    """``lora.objective(layerwise(loss), ...)`` keeps the value alone (the estimate of the plain
    low-memory mode on the adapters); ``layerwise(lora.objective(...))`` cannot see the merged
    kernels as leaves: an error naming LoRA's way."""
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    x = jnp.ones((3, 5))
    params = model.init(jax.random.key(0), x)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
    adapters = jax.tree.map(lambda a: a + 0.1,
                            zojax.lora.init(jax.random.key(1), params, r".*kernel", rank=2))
    grad = functools.partial(zojax.zo_grad, smoothing=1e-2, num_directions=2, low_memory=True)
    key = jax.random.key(3)
    plain = grad(zojax.lora.objective(loss, params))(key, adapters)
    chex.assert_trees_all_equal(
        grad(zojax.lora.objective(zojax.layerwise(loss), params))(key, adapters), plain)
    with pytest.raises(ValueError, match=r"zojax\.lora\.objective\(loss, params\)"):
        grad(zojax.layerwise(zojax.lora.objective(loss, params)))(key, adapters)
