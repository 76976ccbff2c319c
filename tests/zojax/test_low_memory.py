"""The low-memory mode (zojax.low_memory) and the per-layer form of Flax objectives
(zojax.layerwise): the default mode's estimate, the memory it saves, its errors."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax import directions, low_memory
from zojax.methods.two_point import two_point_estimate
from zojax.objective import bind

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)


class Model(nn.Module):
    """Every kind of module the per-layer form handles: Embed (rows), Dense, LayerNorm."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 8)(ids).mean(1) + nn.Embed(7, 8)(jnp.zeros_like(ids[:, 0]))
        x = nn.LayerNorm()(nn.tanh(nn.Dense(16)(x)))
        return nn.Dense(3)(x)


MODEL = Model()
IDS = jax.random.randint(jax.random.key(1), (4, 5), 0, 50)
PARAMS = {"model": MODEL.init(jax.random.key(0), IDS)["params"], "bias": jnp.ones(3)}


def loss(params, ids):
    """A parameter read by modules and one read by the loss itself."""
    return jnp.sum((MODEL.apply({"params": params["model"]}, ids) + params["bias"]) ** 2)


def step(opt, value_fn, params=PARAMS):
    return jax.jit(lambda p, s: opt.update(None, s, p, value_fn=value_fn))(params, opt.init(params))


def assert_same(a, b, rtol):
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)


# The same directions and the same arithmetic, in another program: XLA fuses the objective's
# first operations with the perturbation differently and compiles erf⁻¹ (Gaussian directions)
# into each consumer with its own fused multiply-adds, so the last bits of a value or of a
# direction can differ. The modes agree to float32 rounding (relative to the largest entry).
ROUNDING = 1e-5
DIRECTIONS = ("gaussian", "rademacher", "sphere", "coordinate")


@pytest.mark.parametrize("direction,scheme,num_directions", [
    ("gaussian", "central", 3), ("gaussian", "forward", 1), ("rademacher", "central", 1),
    ("sphere", "central", 1), ("coordinate", "forward", 3)])
def test_the_same_estimate_as_the_default_mode(direction, scheme, num_directions):
    """Both ways of evaluating (the whole perturbed copy, per layer) against chunk_size=1."""
    def make(low):
        return zojax.zo_sgd(0.1, 1e-2, num_directions, direction=direction, scheme=scheme,
                            chunk_size=None if low else 1, low_memory=low, seed=3)

    value_fn = bind(loss, IDS)
    expected, expected_state = step(make(False), value_fn)
    for fn in (value_fn, bind(zojax.layerwise(loss), IDS)):
        updates, state = step(make(True), fn)
        assert_same(updates, expected, ROUNDING)
        np.testing.assert_allclose(state[0].value, expected_state[0].value, rtol=1e-6)
        assert int(state[0].num_queries) == int(expected_state[0].num_queries)


def test_pure_estimators_and_half_precision():
    vg = zojax.zo_value_and_grad(loss, smoothing=1e-2, num_directions=2, low_memory=True)
    reference = zojax.zo_value_and_grad(loss, smoothing=1e-2, num_directions=2, chunk_size=1)
    key = jax.random.key(0)
    (value, grads), (ref_value, ref_grads) = vg(key, PARAMS, IDS), reference(key, PARAMS, IDS)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert_same(grads, ref_grads, 1e-5)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    a = zojax.zo_grad(loss, smoothing=1e-2, low_memory=True)(key, half, IDS)
    b = zojax.zo_grad(loss, smoothing=1e-2, chunk_size=1)(key, half, IDS)
    assert jax.tree.map(lambda x: x.dtype, a) == jax.tree.map(lambda x: x.dtype, half)
    assert_same(jax.tree.map(lambda x: x.astype(jnp.float32), a),
                jax.tree.map(lambda x: x.astype(jnp.float32), b), 1e-2)


def test_in_optax_compositions_with_donation():
    """zo_adam, a chain, a NaN step and a jitted step with donated params and state."""
    opt = zojax.zo_adam(1e-2, 1e-2, 2, low_memory=True)
    reference = zojax.zo_adam(1e-2, 1e-2, 2, chunk_size=1)

    def train(opt, params):
        def body(carry, _):
            params, state = carry
            updates, state = opt.update(None, state, params, value_fn=bind(loss, IDS))
            return (optax.apply_updates(params, updates), state), None
        return jax.lax.scan(body, (params, opt.init(params)), None, length=3)[0][0]

    assert_same(jax.jit(lambda p: train(opt, p))(PARAMS),
                jax.jit(lambda p: train(reference, p))(PARAMS), ROUNDING)
    state = opt.init(PARAMS)
    updates, new = opt.update(None, state, PARAMS, value_fn=lambda p: loss(p, IDS) * jnp.nan)
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
    assert int(new[0].num_nonfinite) == 1 and int(new[1][0].count) == 0

    sgd = zojax.chain(zojax.two_point(1e-2, low_memory=True), optax.sgd(0.1))

    def donated(params, state):
        updates, state = sgd.update(None, state, params,
                                    value_fn=bind(zojax.layerwise(loss), IDS))
        return optax.apply_updates(params, updates), state

    donated = jax.jit(donated, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, PARAMS)
    new_params, _ = donated(params, sgd.init(params))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))


def program_bytes(fn, *args):
    compiled = jax.jit(fn, donate_argnums=(0, 1) if len(args) == 3 else ()).lower(*args).compile()
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)


class Wide(nn.Module):
    """Embedding-heavy like a transformer: a 4096 × 128 table and four 128-wide layers."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(4096, 128)(ids).mean(1)
        for _ in range(4):
            x = nn.tanh(nn.Dense(128)(x))
        return nn.Dense(2)(x)


def test_memory_above_the_forward_pass():
    """Compiled memory (argument + output + temp − alias) of a ZO-SGD step with the params and
    state donated, minus the forward pass's, in parameter sizes P: the default mode holds a
    direction, a perturbed copy and an accumulator; the low-memory mode at most one perturbed
    copy (any value_fn) and, per layer, about nothing; q = 1 and 4 alike."""
    wide = Wide()
    ids = jnp.zeros((16, 8), jnp.int32)
    params = jax.eval_shape(lambda: wide.init(jax.random.key(0), ids)["params"])
    size = sum(x.size * 4 for x in jax.tree.leaves(params))

    def loss(p, ids):
        return jnp.sum(wide.apply({"params": p}, ids) ** 2)

    forward = program_bytes(loss, params, ids)

    def above(opt, value_fn):
        def train_step(p, s, ids):
            updates, s = opt.update(None, s, p, value_fn=value_fn(ids))
            return optax.apply_updates(p, updates), s
        return (program_bytes(train_step, params, jax.eval_shape(opt.init, params), ids)
                - forward) / size

    default = above(zojax.zo_sgd(0.1, 1e-3, 1, chunk_size=1), lambda ids: bind(loss, ids))
    assert default > 2.0, default
    for q in (1, 4):  # 4: an unrolled sum for the table, chained loops for the layers
        plain = above(zojax.zo_sgd(0.1, 1e-3, q, low_memory=True), lambda ids: bind(loss, ids))
        layer = above(zojax.zo_sgd(0.1, 1e-3, q, low_memory=True),
                      lambda ids: bind(zojax.layerwise(loss), ids))
        assert plain <= 1.05, (q, plain)
        assert layer <= 0.25, (q, layer)


def test_bad_input_names_the_option():
    stateful = zojax.directions.Perturbation(
        init=lambda params: jnp.zeros(()), prepare=lambda key, params, state: (),
        sample=lambda key, params, state, context: directions.gaussian(key, params),
        update=lambda state, *a, **k: state, cov_matvec=lambda state, v: v)
    with pytest.raises(ValueError, match="low_memory=True.*stateful|state"):
        zojax.two_point(1e-2, direction=stateful, low_memory=True)
    with pytest.raises(ValueError, match="chunk_size"):
        zojax.zo_sgd(0.1, 1e-2, 4, chunk_size=2, low_memory=True)
    with pytest.raises(ValueError, match="low_memory must be True or False.*static_args"):
        zojax.two_point(1e-2, low_memory="yes")
    with pytest.raises(ValueError, match="weighting"):
        two_point_estimate(
            bind(loss, IDS), jax.random.key(0), PARAMS, smoothing=1e-2, num_directions=1,
            weighting=zojax.weightings.mean(lambda v: v[:, 0]), low_memory=True)
    # natural perturbations keep a Fisher state: no low-memory mode to ask for.
    assert "low_memory" not in inspect.signature(zojax.natural).parameters


def test_layerwise_refuses_params_it_cannot_follow():
    def cast_inside(params, ids):  # the modules read converted copies, not the given leaves
        half = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
        return loss(half, ids)

    opt = zojax.two_point(1e-2, low_memory=True)
    with pytest.raises(ValueError, match="not leaves of the params"):
        step(opt, bind(zojax.layerwise(cast_inside), IDS))
    # Outside a low-memory step the per-layer objective is the loss itself.
    assert float(zojax.layerwise(loss)(PARAMS, IDS)) == float(loss(PARAMS, IDS))


def test_zero_of_is_zero_for_every_finite_value_and_index():
    for x in (jnp.float32(-0.0), jnp.float32(3.5), jnp.int32(7), jnp.int32(-5),
              jnp.bfloat16(jnp.inf), jnp.array([True])):
        assert int(low_memory.zero_of(x)) == 0
