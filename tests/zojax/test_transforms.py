"""One registry of every zojax transform drives one contract battery (optax `_common_test`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from stages import diagonal_perturbation

import zojax

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

# name -> (factory, kwargs); every factory takes its numeric hyperparameters by keyword.
REGISTRY = {
    "two_point": (zojax.two_point, dict(smoothing=0.01, num_directions=3)),
    "two_point_forward": (zojax.two_point, dict(smoothing=0.01, num_directions=3,
                                                scheme="forward")),
    "two_point_chunked": (zojax.two_point, dict(smoothing=0.01, num_directions=5, chunk_size=2)),
    "two_point_sphere": (zojax.two_point, dict(smoothing=0.01, direction="sphere")),
    "two_point_rademacher": (zojax.two_point, dict(smoothing=0.01, direction="rademacher")),
    "two_point_coordinate": (zojax.two_point, dict(smoothing=0.01, direction="coordinate")),
    "two_point_stateful": (zojax.two_point, dict(smoothing=0.01, num_directions=3,
                                                 direction=diagonal_perturbation())),
    "forward_gradient": (zojax.forward_gradient, dict(num_directions=2)),
    "tilted": (zojax.tilted, dict(smoothing=0.01, tilt=1.0, num_directions=4)),
    # Without antithetic pairs the estimate carries a mean-zero ū/(tλ) term: tλ ~ 1 keeps it small.
    "tilted_sphere_one_sided_chunked": (zojax.tilted, dict(
        smoothing=0.1, tilt=10.0, num_directions=8, direction="sphere", antithetic=False,
        chunk_size=3)),
    # ZO-NP and its baselines on blocks of 2 of the 4 parameters (one block per step).
    "natural": (zojax.natural, dict(smoothing=0.01, num_directions=3, max_block_size=2,
                                    update_every=2, num_fisher_inputs=3)),
    "natural_autodiff_all_blocks": (zojax.natural, dict(
        smoothing=0.01, num_directions=3, max_block_size=3, update_every=1, fisher="gaussian",
        jacobian="autodiff", block_coordinate=False)),
    "natural_one_matrix": (zojax.natural, dict(smoothing=0.01, num_directions=2,
                                               max_block_size=2, update_every=1,
                                               max_fisher_blocks=1)),
    "block_two_point": (zojax.block_two_point, dict(smoothing=0.01, num_directions=3,
                                                    max_block_size=2)),
    "block_two_point_coordinate": (zojax.block_two_point, dict(
        smoothing=0.01, num_directions=3, max_block_size=2, direction="coordinate")),
    "fzoo": (zojax.fzoo, dict(smoothing=0.01, num_directions=3)),
    "fzoo_chunked": (zojax.fzoo, dict(smoothing=0.01, num_directions=5, chunk_size=2)),
    "sparse_two_point": (zojax.sparse_two_point, dict(smoothing=0.01, num_directions=3,
                                                      sparsity=0.5)),
    "hizoo": (zojax.hizoo, dict(smoothing=0.01, num_directions=2, hessian_smooth=0.1)),
    "hizoo_chunked": (zojax.hizoo, dict(smoothing=0.01, num_directions=5, chunk_size=2,
                                        hessian_smooth=0.1)),
    "lozo": (zojax.lozo, dict(smoothing=0.01, rank=1, refresh_every=2, num_directions=3)),
    "lozo_chunked": (zojax.lozo, dict(smoothing=0.01, rank=2, refresh_every=1, num_directions=5,
                                      chunk_size=2)),
    "zo_svrg": (zojax.zo_svrg, dict(smoothing=0.01, num_directions=2, snapshot_every=2)),
    "zo_sgd": (zojax.zo_sgd, dict(learning_rate=0.1, smoothing=0.01, num_directions=2)),
    "zo_adam": (zojax.zo_adam, dict(learning_rate=0.1, smoothing=0.01)),
    "zo_sign_sgd": (zojax.zo_sign_sgd, dict(learning_rate=0.1, smoothing=0.01)),
    "zest": (zojax.zest, dict(learning_rate=0.1, smoothing=0.01, tilt=1.0, num_directions=4)),
}
ALIASES = ("zo_sgd", "zo_adam", "zo_sign_sgd", "zest")  # they take the step themselves
ZEROTH_ORDER = [name for name in REGISTRY if name != "forward_gradient"]


def _make(name, **overrides):
    factory, kwargs = REGISTRY[name]
    return factory(**{**kwargs, **overrides})


def _params(dtype=jnp.float32):
    return {"w": jnp.array([2.0, -2.0, 0.5], dtype), "b": jnp.array([[0.3]], dtype)}


def _loss(params):
    return jnp.sum(jnp.square(params["w"] - 1.0)) + 2.0 * jnp.sum(jnp.square(params["b"]))


def _outputs(params):
    """Model outputs for the Fisher of `natural` (logits (4, 3)); the other transforms ignore
    this extra argument."""
    return jnp.outer(jnp.arange(1.0, 5.0), params["w"]) + params["b"][0, 0]


def _step(opt, params, state, loss=_loss):
    # The extra arguments a runner gives: natural's model outputs, zo_svrg's large-batch loss.
    updates, state = opt.update(None, state, params, value_fn=loss, output_fn=_outputs,
                                full_value_fn=loss)
    return optax.apply_updates(params, updates), state


def _assert_finite_like(tree, like):
    assert jax.tree.structure(tree) == jax.tree.structure(like)
    for leaf, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(like)):
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@functools.cache
def _jitted(name):
    """``(opt, jit(step))`` of a registry entry, made once: the tests that take one plain step
    share its compiled program."""
    opt = _make(name)
    return opt, jax.jit(functools.partial(_step, opt))


@pytest.mark.parametrize("name", REGISTRY)
def test_jit_init_update(name):
    opt, step = _jitted(name)
    params = _params()
    state = jax.jit(opt.init)(params)
    new_params, state = step(params, state)
    _assert_finite_like(new_params, params)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_params),
                                                     jax.tree.leaves(params)))


@pytest.mark.parametrize("name", REGISTRY)
def test_descends_in_scan(name):
    opt = _make(name)
    if name not in ALIASES:  # bare estimators return gradients: add the step
        opt = optax.chain(opt, optax.sgd(0.05))
    params = _params()

    def body(carry, _):
        params, state = carry
        return _step(opt, params, state), _loss(params)

    (final, _), losses = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), length=200))(
        params)
    _assert_finite_like(final, params)
    assert _loss(final) < 0.5 * _loss(params), losses[::20]


@pytest.mark.parametrize("name", REGISTRY)
def test_vmap_over_seeds(name):
    def run(seed):
        opt = _make(name, seed=seed)
        params = _params()
        return _step(opt, params, opt.init(params))[0]

    out = jax.jit(jax.vmap(run))(jnp.arange(4))
    assert out["w"].shape == (4, 3)
    assert not np.allclose(out["w"][0], out["w"][1])
    # Both compiled: eager and jitted programs need not agree to the last bit, and ZO amplifies
    # last-bit differences of f by |f|/λ.
    np.testing.assert_allclose(out["w"][2], jax.jit(run)(2)["w"], rtol=1e-5)


@pytest.mark.parametrize("name", REGISTRY)
def test_abstract_init(name):
    opt = _make(name)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
    state = jax.eval_shape(opt.init, abstract)
    assert jax.tree.structure(state) == jax.tree.structure(opt.init(_params()))


@pytest.mark.parametrize("name", REGISTRY)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_kept(name, dtype):
    opt, step = _jitted(name)
    params = _params(dtype)
    new_params, _ = step(params, opt.init(params))
    _assert_finite_like(new_params, params)


@pytest.mark.parametrize("name", REGISTRY)
def test_inject_hyperparams_gives_the_same_updates(name):
    factory, kwargs = REGISTRY[name]
    # Shape-changing ints are static (strings and None stay static by type).
    static = [k for k in ("num_directions", "chunk_size", "max_block_size", "max_fisher_blocks",
                          "rank")
              if k in kwargs or k == "num_directions"]
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    plain, step = _jitted(name)
    params = _params()
    expected, _ = step(params, plain.init(params))
    got, state = jax.jit(functools.partial(_step, injected))(params, injected.init(params))
    # inject_hyperparams stores b2 = 0.999 in float32: 1 - b2 then carries a 5e-5 relative error.
    rtol = 1e-4 if name == "zo_adam" else 1e-6
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=rtol)
    assert "seed" in state.hyperparams  # the int seed was lifted into the state as an array


def test_vmapped_sweep_of_smoothing_and_learning_rate():
    """Both λ and η sweep in one compiled program; each member equals its own run."""
    make = optax.inject_hyperparams(zojax.zo_sgd, static_args=("num_directions",))

    def run(learning_rate, smoothing):
        opt = make(learning_rate=learning_rate, smoothing=smoothing, num_directions=2)
        params = _params()

        def body(carry, _):
            return _step(opt, *carry), None

        return jax.lax.scan(body, (params, opt.init(params)), length=20)[0][0]

    lrs, lams = jnp.array([0.01, 0.05, 0.1]), jnp.array([0.1, 0.01, 0.001])
    swept = jax.jit(jax.vmap(run))(lrs, lams)
    for i in range(3):
        alone = jax.jit(run)(lrs[i], lams[i])
        np.testing.assert_allclose(swept["w"][i], alone["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["two_point", "forward_gradient", "natural"])
def test_chain_with_clipping_adam_and_multisteps(name):
    estimator = _make(name)
    params = _params()
    chained = optax.chain(estimator, optax.clip_by_global_norm(1.0), optax.adam(0.05))
    new_params, _ = jax.jit(functools.partial(_step, chained))(params, chained.init(params))
    _assert_finite_like(new_params, params)

    k = 3
    multi = optax.chain(_make(name), optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k))
    state = multi.init(params)
    step = jax.jit(functools.partial(_step, multi))
    current, estimates = params, []
    for i in range(k):
        plain_state = jax.tree.map(lambda x: x, state[0])
        estimates.append(estimator.update(None, plain_state, current, value_fn=_loss,
                                          output_fn=_outputs)[0])
        current, state = step(current, state)
        if i < k - 1:  # parameters only move at the k-th step
            np.testing.assert_array_equal(current["w"], params["w"])
    mean = jax.tree.map(lambda *g: sum(g) / k, *estimates)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean)
    np.testing.assert_allclose(current["w"], expected["w"], rtol=1e-5)


@pytest.mark.parametrize("name", ZEROTH_ORDER)
def test_never_differentiates_value_fn(name):
    @jax.custom_jvp
    def loss(params):
        return _loss(params)

    @loss.defjvp
    def _(primals, tangents):
        raise AssertionError("value_fn was differentiated")

    opt = _make(name)
    params = _params()
    jax.jit(functools.partial(_step, opt, loss=loss))(params, opt.init(params))


@pytest.mark.parametrize("name", REGISTRY)
def test_nonfinite_loss_gives_zero_update_and_is_counted(name):
    opt = _make(name)
    params = _params()
    state = opt.init(params)
    bad = lambda p: _loss(p) + jnp.where(p["w"][0] > 0, jnp.nan, 0.0)
    step = jax.jit(functools.partial(_step, opt, loss=bad))
    new_params, state = step(params, state)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    new_params, state = step(new_params, state)
    counter = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, zojax.TwoPointState)) if isinstance(s, zojax.TwoPointState)][0].num_nonfinite
    assert int(counter) == 2
    inf_loss = lambda p: _loss(p) * jnp.inf
    new_params, _ = jax.jit(functools.partial(_step, opt, loss=inf_loss))(params, opt.init(params))
    _assert_finite_like(new_params, params)


def test_state_fields_and_key_handling():
    opt = zojax.two_point(0.1, seed=jax.random.key(7))
    state = opt.init(_params())
    assert isinstance(state, zojax.TwoPointState)
    assert state.count.dtype == jnp.int32 and state.num_nonfinite.dtype == jnp.int32
    assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    _, state2 = opt.update(None, state, _params(), value_fn=_loss)
    assert int(state2.count) == 1
    assert not np.array_equal(jax.random.key_data(state2.key), jax.random.key_data(state.key))
    same_seed = zojax.two_point(0.1, seed=7).init(_params())
    np.testing.assert_array_equal(jax.random.key_data(same_seed.key),
                                  jax.random.key_data(state.key))
