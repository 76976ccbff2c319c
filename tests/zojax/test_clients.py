"""zojax transforms inside the optax and flax wrappers users reach for: each composition gives the
hand-written equivalent's result, or a clear error that says what to do instead."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import zojax


def _params():
    return {"body": jnp.array([0.5, -1.0, 2.0]), "head": jnp.array([1.0, -2.0])}


def _loss(params, scale=1.0):
    return scale * (jnp.sum((params["body"] - 1.0) ** 2) + jnp.sum(params["head"] ** 2))


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _assert_trees_equal(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if tolerance:
            np.testing.assert_allclose(x, y, **tolerance)
        else:
            np.testing.assert_array_equal(x, y)


# --- Gradient accumulation ------------------------------------------------------------------


def test_multisteps_around_an_estimator_raises_naming_the_supported_form():
    opt = optax.MultiSteps(zojax.zo_sgd(0.1, 1e-3), every_k_schedule=3)
    params = _params()
    with pytest.raises(ValueError, match=r"MultiSteps.*zojax\.chain\(zojax\.two_point"):
        jax.jit(lambda s, p: opt.update(_zeros(p), s, p, value_fn=_loss))(opt.init(params),
                                                                           params)


def test_accumulation_after_the_estimator_is_the_mean_of_k_estimates_with_every_query_counted():
    k, q, lr = 3, 2, 0.1
    estimator = zojax.two_point(0.05, q, seed=4)
    opt = zojax.chain(estimator, optax.MultiSteps(optax.sgd(lr), every_k_schedule=k))
    params = _params()
    state, est_state, estimates = opt.init(params), estimator.init(params), []
    step = jax.jit(lambda p, s, scale: opt.update(
        None, s, p, value_fn=functools.partial(_loss, scale=scale)))
    estimate = jax.jit(lambda s, scale: estimator.update(
        None, s, params, value_fn=functools.partial(_loss, scale=scale)))
    current = params
    for i in range(k):  # one minibatch (here: a scale of the loss) per call
        g, est_state = estimate(est_state, 1.0 + i)
        estimates.append(g)
        updates, state = step(current, state, 1.0 + i)
        current = optax.apply_updates(current, updates)
    mean = jax.tree.map(lambda *g: sum(g) / k, *estimates)
    _assert_trees_equal(current, jax.tree.map(lambda p, g: p - lr * g, params, mean),
                        rtol=1e-6)
    assert int(state[0].num_queries) == k * 2 * q


# --- A transform before the estimator; apply_if_finite ----------------------------------------


def test_a_transform_chained_before_the_estimator_raises():
    opt = optax.chain(optax.clip_by_global_norm(1.0), zojax.two_point(1e-3), optax.sgd(0.1))
    params = _params()
    with pytest.raises(ValueError, match=r"before the estimator.*clip_by_global_norm"):
        opt.update(jax.grad(_loss)(params), opt.init(params), params, value_fn=_loss)


def test_apply_if_finite_around_an_estimator_raises_and_names_zojax_policy():
    opt = optax.apply_if_finite(zojax.zo_sgd(0.1, 1e-3), 3)
    params = _params()
    with pytest.raises(ValueError, match=r"apply_if_finite.*zojax\.chain"):
        opt.update(_zeros(params), opt.init(params), params, value_fn=_loss)


# --- Non-finite steps: the whole chain's state and the params untouched -----------------------

ALIASES = {
    "zo_sgd": lambda: zojax.zo_sgd(0.05, 1e-3, 2),
    "zo_adam": lambda: zojax.zo_adam(0.05, 1e-3, 2),
    "zo_sign_sgd": lambda: zojax.zo_sign_sgd(0.05, 1e-3, 2),
    "zest": lambda: zojax.zest(0.05, 1e-3, 1.0, 4),
    # the chains the docs recommend with the other estimators
    "hizoo_adam": lambda: zojax.chain(zojax.hizoo(1e-3, 2), optax.adamw(0.05, weight_decay=0.1)),
    "lozo_sgd_momentum": lambda: zojax.chain(zojax.lozo(1e-3, rank=1, refresh_every=2),
                                             optax.sgd(0.05, momentum=0.9)),
    "fzoo_schedule": lambda: zojax.chain(zojax.fzoo(1e-3, 2), optax.scale_by_adam(),
                                         optax.scale_by_schedule(lambda t: -0.05 / (1 + t))),
}


@pytest.mark.parametrize("name", ALIASES)
def test_a_nonfinite_step_leaves_params_and_the_optimizer_state_untouched(name):
    opt = ALIASES[name]()
    params = _params()

    @jax.jit
    def step(params, state, poison):
        value_fn = lambda p: _loss(p) + jnp.where(poison, jnp.nan, 0.0)
        updates, state = opt.update(None, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    params, state = step(params, opt.init(params), False)  # moments are non-zero now
    new_params, new_state = step(params, state, True)
    _assert_trees_equal(new_params, params)
    _assert_trees_equal(new_state[1:], state[1:])  # every transform after the estimator
    assert int(new_state[0].num_nonfinite) == 1 and int(new_state[0].count) == 2
    assert int(new_state[0].num_queries) > int(state[0].num_queries)
    moved, _ = step(new_params, new_state, False)
    assert not np.allclose(moved["head"], params["head"])


def test_chain_needs_an_estimator_first():
    with pytest.raises(ValueError, match="first transform must be a zojax estimator"):
        zojax.chain(optax.sgd(0.1), optax.adam(0.1)).init(_params())


# --- Parameter subsets -------------------------------------------------------------------------


def test_masked_with_a_dummy_updates_tree_raises():
    opt = optax.masked(zojax.zo_sgd(0.1, 1e-3), {"body": False, "head": True})
    params = _params()
    with pytest.raises(ValueError, match=r"masked.*None at the estimator's leaves"):
        opt.update(params, opt.init(params), params, value_fn=_loss)


def test_masked_params_need_the_full_params_to_reach_the_loss():
    opt = optax.masked(zojax.zo_sgd(0.1, 1e-3), {"body": False, "head": True})
    params = _params()
    with pytest.raises(ValueError, match=r"MaskedNode.*zojax\.fill_masked"):
        opt.update({"body": _zeros(params["body"]), "head": None}, opt.init(params), params,
                   value_fn=_loss)


def test_multi_transform_zo_head_first_order_body_equals_the_hand_written_step():
    labels = {"body": "fo", "head": "zo"}
    tx = optax.multi_transform({"zo": zojax.zo_sgd(0.1, 1e-3, 3, seed=2),
                                "fo": optax.adam(0.05)}, labels)
    params = _params()

    @jax.jit
    def step(params, state):
        body_grads = jax.grad(lambda b: _loss({**params, "body": b}))(params["body"])
        updates, state = tx.update({"body": body_grads, "head": None}, state, params,
                                   value_fn=zojax.fill_masked(_loss, params))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    new, _ = step(params, state)
    # By hand: ZO on the head alone (the rest closed over), Adam on the body alone.
    zo, adam = zojax.zo_sgd(0.1, 1e-3, 3, seed=2), optax.adam(0.05)
    head_updates, _ = zo.update(None, zo.init(params["head"]), params["head"],
                                value_fn=lambda h: _loss({**params, "head": h}))
    body_updates, _ = adam.update(jax.grad(_loss)(params)["body"], adam.init(params["body"]))
    np.testing.assert_allclose(new["head"], params["head"] + head_updates, rtol=1e-6)
    np.testing.assert_allclose(new["body"], params["body"] + body_updates, rtol=1e-6)


def test_masked_frozen_leaves_keep_the_updates_they_were_given():
    opt = optax.masked(zojax.zo_sgd(0.1, 1e-3), {"body": False, "head": True})
    params = _params()
    updates, _ = opt.update({"body": _zeros(params["body"]), "head": None}, opt.init(params),
                            params, value_fn=zojax.fill_masked(_loss, params))
    np.testing.assert_array_equal(updates["body"], 0.0)
    assert np.all(updates["head"] != 0)


def test_fill_masked_keeps_a_line_form():
    def loss(p, scale):
        return scale * jnp.sum(p["head"] ** 2) + jnp.sum(p["body"])

    def along(p, u, steps, scale):
        return jax.vmap(lambda t: loss(jax.tree.map(lambda x, v: x + t * v, p, u), scale))(steps)

    params = _params()
    objective = zojax.fill_masked(zojax.estimators.Objective(loss, along), params)
    masked = {"body": optax.MaskedNode(), "head": params["head"]}
    u = {"body": optax.MaskedNode(), "head": jnp.array([1.0, 1.0])}
    got = objective.along(masked, u, jnp.array([0.0, 1.0]), 2.0)
    np.testing.assert_allclose(got, [loss(params, 2.0),
                                     loss({**params, "head": params["head"] + 1}, 2.0)])


def test_the_trainable_subtree_alone_descends():
    params = _params()
    opt = zojax.zo_sgd(0.05, 1e-3, 4)

    def step(carry, _):
        head, state = carry
        updates, state = opt.update(None, state, head,
                                    value_fn=lambda h: _loss({**params, "head": h}))
        return (optax.apply_updates(head, updates), state), None

    (head, _), _ = jax.lax.scan(step, (params["head"], opt.init(params["head"])), length=100)
    assert float(jnp.sum(head ** 2)) < 0.01 * float(jnp.sum(params["head"] ** 2))


# --- APIs that drop extra arguments ---------------------------------------------------------


def test_lookahead_recipe_equals_the_hand_written_lookahead():
    sync, alpha, lr = 3, 0.5, 0.05
    estimator = zojax.two_point(0.05, 2, seed=1)  # λ ≫ the rounding of f
    lookahead = optax.lookahead(optax.sgd(lr), sync_period=sync, slow_step_size=alpha)
    params = optax.LookaheadParams.init_synced(_params())
    est_state, la_state = estimator.init(params.fast), lookahead.init(params)
    # By hand: fast SGD steps on the same estimates; every `sync` steps the slow weights move
    # alpha of the way to the fast ones, and the fast ones restart there.
    fast = slow = _params()
    hand_state = estimator.init(fast)
    for t in range(2 * sync):
        g, est_state = estimator.update(None, est_state, params.fast, value_fn=_loss)
        updates, la_state = lookahead.update(g, la_state, params)
        params = optax.apply_updates(params, updates)
        g_hand, hand_state = estimator.update(None, hand_state, fast, value_fn=_loss)
        fast = jax.tree.map(lambda x, g: x - lr * g, fast, g_hand)
        if (t + 1) % sync == 0:
            slow = fast = jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast)
    # lookahead rounds its moves in another order: ZO amplifies that by |f|/λ.
    _assert_trees_equal(params.slow, slow, rtol=1e-5)
    _assert_trees_equal(params.fast, fast, rtol=1e-5)


def test_train_state_recipe_equals_apply_gradients_on_the_estimate():
    opt = zojax.zo_adam(0.05, 1e-3, 2)
    params = _params()
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=opt)
    # The recipe: apply_gradients' three lines, with value_fn passed to tx.update.
    updates, opt_state = state.tx.update(None, state.opt_state, state.params, value_fn=_loss)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    # By hand: the estimate, then Adam.
    estimator, adam = zojax.two_point(1e-3, 2), optax.adam(0.05)
    g, _ = estimator.update(None, estimator.init(params), params, value_fn=_loss)
    by_hand, _ = adam.update(g, adam.init(params))
    _assert_trees_equal(state.params, optax.apply_updates(params, by_hand), rtol=1e-6)
    assert int(state.step) == 1 and int(state.opt_state[0].num_queries) == 4


# --- reduce_on_plateau ------------------------------------------------------------------------


def test_reduce_on_plateau_after_the_estimator_matches_the_schedule_fed_exact_losses():
    """The chain hands the estimator's loss to reduce_on_plateau: the same scales as feeding it
    the exact loss at every step (not the 0.0 of state.value before the first update)."""
    lr, steps = 0.3, 120
    plateau = dict(factor=0.5, patience=5, cooldown=0, accumulation_size=1, rtol=1e-3)
    estimator = zojax.two_point(1e-3, 1, seed=3)
    opt = zojax.chain(estimator, optax.sgd(lr), optax.contrib.reduce_on_plateau(**plateau))
    rop = optax.contrib.reduce_on_plateau(**plateau)
    plain = optax.chain(estimator, optax.sgd(lr))

    def run(carry, _):
        (params, state), (ref_params, ref_state, rop_state) = carry
        updates, state = opt.update(None, state, params, value_fn=_loss)
        ref_updates, ref_state = plain.update(None, ref_state, ref_params, value_fn=_loss)
        ref_updates, rop_state = rop.update(ref_updates, rop_state, ref_params,
                                            value=_loss(ref_params))
        return ((optax.apply_updates(params, updates), state),
                (optax.apply_updates(ref_params, ref_updates), ref_state, rop_state)), (
                    state[2].scale, rop_state.scale)

    params = _params()
    _, (scales, ref_scales) = jax.jit(lambda p: jax.lax.scan(
        run, ((p, opt.init(p)), (p, plain.init(p), rop.init(p))), length=steps))(params)
    np.testing.assert_array_equal(scales, ref_scales)
    assert scales[plateau["patience"]] == 1.0  # no collapse at the start
    assert 0 < scales[-1] < 1.0  # and it does lower the rate once the loss stalls


# --- Clear errors for plausible mistakes -----------------------------------------------------


def test_a_misspelled_value_fn_is_named():
    opt = zojax.two_point(1e-3)
    with pytest.raises(ValueError, match=r"value_fn.*\['loss_fn'\]"):
        opt.update(None, opt.init(_params()), _params(), loss_fn=_loss)


def test_a_loss_with_aux_says_what_to_do():
    opt = zojax.two_point(1e-3)
    with pytest.raises(ValueError, match=r"\(loss, aux\).*\[0\]"):
        opt.update(None, opt.init(_params()), _params(), value_fn=lambda p: (_loss(p), {}))


def test_a_batch_of_keys_as_seed_fails_at_construction():
    with pytest.raises(ValueError, match=r"seed must be one int or one PRNG key.*\(4,\)"):
        zojax.zo_sgd(0.1, 1e-3, seed=jax.random.split(jax.random.key(0), 4))
    with pytest.raises(ValueError, match="seed must be one"):
        zojax.two_point(1e-3, seed=np.zeros((4, 2), np.uint32))


def test_params_that_are_not_arrays_are_named():
    opt = zojax.two_point(1e-3)
    with pytest.raises(TypeError, match=r"\[1\] is a float.*jnp\.asarray"):
        opt.init([jnp.ones(2), 1.0])
