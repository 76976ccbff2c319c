"""The literature's estimators as stages (zojax.variants): the claim each makes, checked
statistically with fixed seeds, and bad input. The optax contract battery is in
test_transforms.py (its REGISTRY holds them)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax import variants

Z_MAX = 4.5  # |estimate − expected| / standard error


def _estimate(opt, params, loss):
    return jax.jit(lambda p: opt.update(None, opt.init(p), p, value_fn=loss))(params)


# ---------------------------------------------------------------------------------------------
# FZOO.


def test_fzoo_is_the_normalized_gradient_on_a_linear_function():
    """ℓ_i − ℓ_0 = λ aᵀu_i exactly: E ĝ = a / ‖a‖ up to O(1/N). Standard error of coordinate j:
    the mean's, √((‖a‖² − a_j²) / N) / ‖a‖ (Rademacher), and the sample std's relative error
    times a_j / ‖a‖, at most √(1 / 2N) (kurtosis of aᵀu ≤ 3), added in quadrature."""
    a = jnp.linspace(-1.0, 2.0, 8)
    n = 20_000
    g, state = _estimate(zojax.fzoo(0.1, n, chunk_size=2_000), jnp.zeros(8), lambda w: a @ w)
    norm = float(jnp.linalg.norm(a))
    stderr = np.sqrt((norm**2 - np.asarray(a) ** 2) / n + np.asarray(a) ** 2 / (2 * n)) / norm
    z = np.abs(np.asarray(g) - np.asarray(a) / norm) / stderr
    assert z.max() < Z_MAX, z
    assert int(state.num_queries) == n + 1 and float(state.value) == 0.0


def test_fzoo_steps_do_not_depend_on_the_loss_scale_nor_on_smoothing():
    a, w = jnp.linspace(-1.0, 2.0, 8), jnp.ones(8)
    reference, _ = _estimate(zojax.fzoo(0.1, 6), w, lambda w: a @ w)
    scaled, _ = _estimate(zojax.fzoo(0.1, 6), w, lambda w: 1e3 * (a @ w))
    smaller, _ = _estimate(zojax.fzoo(0.01, 6), w, lambda w: a @ w)
    np.testing.assert_allclose(scaled, reference, rtol=1e-3)
    np.testing.assert_allclose(smaller, reference, rtol=1e-3)


def test_fzoo_chunked_equals_unchunked_and_a_flat_loss_gives_zero():
    loss = lambda w: jnp.sum(jnp.sin(w) ** 2)  # noqa: E731
    w = jnp.linspace(-1.0, 1.0, 5)
    whole, _ = _estimate(zojax.fzoo(0.1, 7), w, loss)
    chunked, _ = _estimate(zojax.fzoo(0.1, 7, chunk_size=3), w, loss)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    flat, state = _estimate(zojax.fzoo(0.1, 4), w, lambda w: jnp.zeros(()))
    assert np.all(np.asarray(flat) == 0) and int(state.num_nonfinite) == 0


# ---------------------------------------------------------------------------------------------
# Sparse-MeZO.


def test_sparse_masks_keep_the_small_magnitude_entries_of_each_leaf():
    params = {"a": jnp.arange(1.0, 101.0), "b": -jnp.arange(1.0, 11.0).reshape(2, 5)}
    masks = variants.sparse_masks(params, 0.75)
    assert int(masks["a"].sum()) == 25 and bool(masks["a"][:25].all())
    assert int(masks["b"].sum()) == 3 and bool(masks["b"].reshape(-1)[:3].all())


def test_sparse_thresholds_are_set_at_init_and_the_mask_follows_the_weights():
    """The paper's rule: h per leaf from the initial magnitudes; m = |θ| ≤ h at every step."""
    w = jnp.arange(1.0, 9.0)
    opt = zojax.sparse_two_point(0.1, sparsity=0.5)
    state = opt.init(w)
    np.testing.assert_allclose(state.perturbation_state, 4.5)
    moved = w.at[7].set(0.5).at[0].set(6.0)  # entry 7 is small now, entry 0 large
    g, state = opt.update(None, state, moved, value_fn=lambda w: jnp.sum(w**2))
    np.testing.assert_allclose(state.perturbation_state, 4.5)
    np.testing.assert_array_equal(np.asarray(g) != 0, np.asarray(moved) <= 4.5)


def test_sparse_estimate_vanishes_off_the_mask_and_is_the_masked_gradient():
    """On a quadratic the central difference is uᵀ∇f exactly; u = m ⊙ z: E ĝ = m ⊙ ∇f,
    Var ĝ_j = ‖m ⊙ ∇f‖² + m_j (∇f)_j² (Gaussian)."""
    w = jnp.linspace(-2.0, 2.0, 9)
    hessian = jnp.diag(jnp.arange(1.0, 10.0))
    loss = lambda w: 0.5 * w @ hessian @ w  # noqa: E731
    q = 4_000
    g, _ = _estimate(zojax.sparse_two_point(0.1, q, sparsity=0.5, chunk_size=500), w, loss)
    mask = np.asarray(variants.sparse_masks(w, 0.5))
    assert 0 < mask.sum() < mask.size
    assert np.all(np.asarray(g)[~mask] == 0)
    grad = np.asarray(hessian @ w) * mask
    stderr = np.sqrt((np.sum(grad**2) + grad**2) / q)
    z = np.abs(np.asarray(g) - grad)[mask] / stderr[mask]
    assert z.max() < Z_MAX, z


# ---------------------------------------------------------------------------------------------
# HiZOO.

D = jnp.arange(1.0, 9.0)  # the diagonal Hessian of the quadratic below


def _quadratic(w):
    return 0.5 * jnp.sum(D * w**2)


def test_hizoo_one_update_has_its_closed_form_mean():
    """α = 1 from H = 1: H' = |ℓ₊ + ℓ₋ − 2ℓ₀|/(2λ²) z² = (zᵀDz) z²/2 exactly (quadratic), with
    mean (tr D + 2 D_j)/2; the step's mean is Σ∇f = ∇f (H = 1)."""
    w = jnp.linspace(-1.0, 1.0, 8)

    def one(seed):
        opt = zojax.hizoo(0.01, hessian_smooth=1.0, seed=seed)
        g, state = opt.update(None, opt.init(w), w, value_fn=_quadratic)
        return g, state.perturbation_state

    g, h = map(np.asarray, jax.jit(jax.vmap(one))(jnp.arange(20_000)))
    for sample, expected in ((h, (np.sum(D) + 2 * np.asarray(D)) / 2), (g, np.asarray(D * w))):
        z = np.abs(sample.mean(0) - expected) / (sample.std(0, ddof=1) / np.sqrt(len(sample)))
        assert z.max() < Z_MAX, z


def test_hizoo_hessian_converges_to_the_diagonal_hessian_up_to_its_scalar():
    """The update's fixed point is H = (d + 2)/2 · D (see hizoo's docstring). 64 chains of
    25,000 steps at α = 0.004 (the slowest mode relaxes in (d + 2)/(2α) = 1,250 steps), H
    averaged over each chain's second half: the shape H_j / D_j / mean matches to the chains'
    standard error; the scale is biased up by O(α) by the multiplicative noise (+2.6% here)."""
    w, alpha, steps = jnp.linspace(-1.0, 1.0, 8), 0.004, 25_000

    def chain(seed):
        opt = zojax.hizoo(0.01, hessian_smooth=alpha, seed=seed)

        def body(state, _):
            state = opt.update(None, state, w, value_fn=_quadratic)[1]
            return state, state.perturbation_state

        return jax.lax.scan(body, opt.init(w), length=steps)[1][steps // 2:].mean(0)

    ratio = np.asarray(jax.jit(jax.vmap(chain))(jnp.arange(64))) / np.asarray(D) / 5.0
    shape = ratio / ratio.mean(1, keepdims=True)
    z = np.abs(shape.mean(0) - 1) / (shape.std(0, ddof=1) / np.sqrt(len(shape)))
    assert z.max() < Z_MAX, z
    assert 1.0 < ratio.mean() < 1.0 + 10 * alpha, ratio.mean()


def test_hizoo_directions_have_covariance_h_inverse():
    perturbation = variants.hizoo_perturbation()
    hessian = jnp.array([1.0, 4.0, 16.0])
    u = jax.vmap(lambda k: perturbation.sample(k, jnp.zeros(3), hessian, ()))(
        jax.random.split(jax.random.key(0), 20_000))
    np.testing.assert_allclose(np.asarray(perturbation.cov_matvec(hessian, jnp.ones(3))),
                               [1.0, 0.25, 0.0625])
    second = np.asarray(u**2)
    z = np.abs(second.mean(0) - 1 / np.asarray(hessian)) / (
        second.std(0, ddof=1) / np.sqrt(len(second)))
    assert z.max() < Z_MAX, z


# ---------------------------------------------------------------------------------------------
# LOZO.


def _held(perturbation, params, seed=1):
    """A LOZO state holding a drawn V, its next step not a refresh."""
    state = perturbation.init(params)
    return perturbation.update(state, jax.random.key(seed), params, None)


def test_lozo_mean_is_the_gradient_projected_on_the_held_basis():
    """Central differences on a quadratic are exact: E ĝ = Σ ∇f, Σ = I ⊗ VVᵀ/r given V
    (cov_matvec), checked against the empirical mean of 400 estimates of 25 directions."""
    w = jnp.arange(12.0).reshape(4, 3) / 10
    target = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    loss = lambda w: 0.5 * jnp.sum((w - target) ** 2)  # noqa: E731
    perturbation = variants.lozo_perturbation(rank=2, refresh_every=100)
    state = _held(perturbation, w)
    estimate = jax.jit(jax.vmap(lambda key: zojax.estimators.two_point_estimate(
        loss, key, w, smoothing=0.1, num_directions=25, direction=perturbation,
        perturbation_state=state).grads))
    g = np.asarray(estimate(jax.random.split(jax.random.key(0), 400)))
    expected = np.asarray(perturbation.cov_matvec(state, w - target))
    z = np.abs(g.mean(0) - expected) / (g.std(0, ddof=1) / np.sqrt(len(g)))
    assert z.max() < Z_MAX, z
    assert not np.allclose(expected, w - target)  # rank 2 of 3: a projection, not ∇f


def test_lozo_unbiased_over_fresh_bases_and_each_update_has_rank_r():
    w = jnp.arange(12.0).reshape(4, 3) / 10
    loss = lambda w: 0.5 * jnp.sum(w**2)  # noqa: E731

    def estimate(seed):
        opt = zojax.lozo(0.1, rank=1, refresh_every=1, num_directions=2, seed=seed)
        return opt.update(None, opt.init(w), w, value_fn=loss)[0]

    g = np.asarray(jax.jit(jax.vmap(estimate))(jnp.arange(4_000)))
    z = np.abs(g.mean(0) - np.asarray(w)) / (g.std(0, ddof=1) / np.sqrt(len(g)))
    assert z.max() < Z_MAX, z
    assert max(np.linalg.matrix_rank(x) for x in g[:20]) == 1  # Σ_i c_i U_i Vᵀ: V is shared


def test_lozo_holds_v_for_refresh_every_steps():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    opt = zojax.lozo(0.1, rank=2, refresh_every=3)
    state, held = opt.init(params), []
    step = jax.jit(lambda s: opt.update(None, s, params, value_fn=lambda p: jnp.sum(p["w"]))[1])
    for _ in range(7):
        state = step(state)
        basis = state.perturbation_state.v
        assert basis[0].shape == (1, 2) and basis[1].shape == (4, 2)  # leaves: b, w
        held.append(np.asarray(basis[1]))
    changed = [not np.array_equal(a, b) for a, b in zip(held, held[1:])]
    assert changed == [False, False, True, False, False, True]  # redrawn at steps 3 and 6


# ---------------------------------------------------------------------------------------------
# ZO-SVRG.


def _batch_loss(hessian, centre):
    return lambda w: 0.5 * (w - centre) @ hessian @ (w - centre)


def test_zo_svrg_snapshot_schedule_queries_and_the_full_estimate():
    full, minibatch = _batch_loss(jnp.eye(3), jnp.ones(3)), _batch_loss(2 * jnp.eye(3), 0.0)
    opt = zojax.zo_svrg(0.1, 2, snapshot_every=3)
    w, state = jnp.zeros(3), opt.init(jnp.zeros(3))
    step = jax.jit(lambda s, w: opt.update(None, s, w, value_fn=minibatch, full_value_fn=full))
    queries, snapshots = [], []
    for _ in range(4):
        g, new = step(state, w)
        queries.append(int(new.num_queries - state.num_queries))
        state = new
        # Snapshot steps return the new g̃; at the snapshot itself the control variate cancels
        # the minibatch estimates exactly (same u): ĝ = g̃.
        np.testing.assert_array_equal(g, state.perturbation_state.snapshot_grads)
        snapshots.append(np.asarray(g))
    assert queries == [4, 8, 8, 4]
    assert np.array_equal(snapshots[0], snapshots[2]) and not np.allclose(snapshots[2],
                                                                          snapshots[3])


def test_zo_svrg_correction_is_the_minibatch_gradient_change():
    """ĝ − g̃ = (1/q) Σ u uᵀ A_B (x − x̃) exactly (quadratic, central, same u): mean
    w = A_B (x − x̃), variance (‖w‖² + w_j²)/q (Gaussian). Near the snapshot it is far below
    the plain two-point estimate's."""
    hessian = jnp.diag(jnp.arange(1.0, 6.0))
    loss = _batch_loss(hessian, jnp.linspace(-1.0, 1.0, 5))
    q, snapshot = 8_000, jnp.zeros(5)
    opt = zojax.zo_svrg(0.1, q, snapshot_every=10, chunk_size=1_000)
    state = jax.jit(lambda s: opt.update(None, s, snapshot, value_fn=loss,
                                         full_value_fn=loss)[1])(opt.init(snapshot))
    x = snapshot + 0.01 * jnp.arange(5.0)
    g, _ = jax.jit(lambda s: opt.update(None, s, x, value_fn=loss, full_value_fn=loss))(state)
    w = np.asarray(hessian @ (x - snapshot))
    stderr = np.sqrt((np.sum(w**2) + w**2) / q)
    z = np.abs(np.asarray(g - state.perturbation_state.snapshot_grads) - w) / stderr
    assert z.max() < Z_MAX, z
    plain = jax.grad(loss)(x)
    assert np.sum(w**2) < 1e-2 * float(plain @ plain)  # the variances: ‖w‖² vs ‖∇f_B(x)‖²


def test_zo_svrg_needs_the_large_batch_objective():
    opt = zojax.zo_svrg(0.1, snapshot_every=2)
    with pytest.raises(ValueError, match="full_value_fn"):
        opt.update(None, opt.init(jnp.ones(2)), jnp.ones(2), value_fn=jnp.sum)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("make, match", [
    (lambda: zojax.fzoo(0.1, 1), "num_directions must be >= 2"),
    (lambda: zojax.fzoo(0.0, 4), "smoothing"),
    (lambda: zojax.fzoo(0.1, 4, chunk_size=0), "chunk_size"),
    (lambda: zojax.sparse_two_point(0.1, sparsity=0.0), "sparsity"),
    (lambda: zojax.sparse_two_point(0.1, sparsity=1.0), "sparsity"),
    (lambda: zojax.sparse_two_point(0.1, sparsity=float("nan")), "sparsity"),
    (lambda: zojax.sparse_two_point(0.1, sparsity="half"), "sparsity"),
    (lambda: zojax.sparse_two_point(-1.0, sparsity=0.5), "smoothing"),
    (lambda: zojax.hizoo(0.1, hessian_smooth=-0.1), "hessian_smooth"),
    (lambda: zojax.hizoo(0.1, hessian_smooth=1.5), "hessian_smooth"),
    (lambda: zojax.hizoo(0.1, hessian_smooth=float("nan")), "hessian_smooth"),
    (lambda: zojax.hizoo(0.0), "smoothing"),
    (lambda: zojax.hizoo(0.1, 0), "num_directions"),
    (lambda: zojax.lozo(0.1, rank=0, refresh_every=1), "rank"),
    (lambda: zojax.lozo(0.1, rank=1.5, refresh_every=1), "rank"),
    (lambda: zojax.lozo(0.1, rank=1, refresh_every=0), "refresh_every"),
    (lambda: zojax.lozo(0.0, rank=1, refresh_every=1), "smoothing"),
    (lambda: zojax.zo_svrg(0.1, snapshot_every=0), "snapshot_every"),
    (lambda: zojax.zo_svrg(0.1, snapshot_every=2.0), "snapshot_every"),
    (lambda: zojax.zo_svrg(0.1, 0, snapshot_every=2), "num_directions"),
    (lambda: zojax.zo_svrg(0.1, snapshot_every=2, chunk_size=0), "chunk_size"),
])
def test_bad_hyperparameters_are_errors_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# Sparse-MeZO from a degenerate start (issue 34).


def _paper_sparse_perturbation(sparsity):
    """The paper's rule as it stood before: each threshold the quantile, degenerate or not."""
    return variants.sparse_perturbation(sparsity)._replace(init=lambda params: jax.tree.map(
        lambda p: jnp.quantile(jnp.abs(p).astype(jnp.float32), 1.0 - sparsity), params))


def _bits(tree):
    """``tree`` with its typed PRNG keys as their key data, to compare with NumPy."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x, tree)


def _run(estimator, params, loss, num_steps):
    """``num_steps`` SGD steps (learning rate 0.05) in one ``lax.scan``; params, state."""
    opt = optax.chain(estimator, optax.sgd(0.05))

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(None, state, params, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    return jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=num_steps)[0])(params)


def test_sparse_least_squares_from_zeros_descends():
    """From zeros every threshold is 0: the paper's rule perturbs every entry at the first step
    and freezes each one that moved, so the loss stays where one step left it (8.62 → 8.61 in
    300 steps). The degenerate leaf is now perturbed densely: the steps are two_point's, bit for
    bit (the same directions, none masked), and the loss falls to 1.7e-7, by 5e7 (consistent
    least squares, 32 × 8, minimum 0)."""
    ka, kw = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (32, 8))
    b = a @ jax.random.normal(kw, (8,))
    loss = lambda w: 0.5 * jnp.mean((a @ w - b) ** 2)  # noqa: E731
    zeros, initial = jnp.zeros(8), float(loss(jnp.zeros(8)))
    state = jax.jit(zojax.sparse_two_point(0.01, sparsity=0.5).init)(zeros)  # traced params
    assert np.isinf(state.perturbation_state)

    stalled, _ = _run(zojax.two_point(0.01, direction=_paper_sparse_perturbation(0.5)), zeros,
                      loss, 300)
    sparse, (sparse_state, _) = _run(zojax.sparse_two_point(0.01, sparsity=0.5), zeros, loss,
                                     300)
    dense, _ = _run(zojax.two_point(0.01), zeros, loss, 300)
    assert float(loss(stalled)) > 0.99 * initial, float(loss(stalled))  # the defect
    assert float(loss(sparse)) < 1e-4 * initial, float(loss(sparse))
    np.testing.assert_array_equal(sparse, dense)
    assert np.isinf(sparse_state.perturbation_state)


def test_sparse_degenerate_leaves_are_dense_and_the_others_keep_the_paper_rule():
    """Thresholds: the quantile where it exceeds the leaf's smallest magnitude, else +inf (all
    zeros, all ones, most entries tied at zero, a single entry). A start with no degenerate
    leaf gives the paper's estimates and states exactly, step after step, as masks move."""
    kw, km = jax.random.split(jax.random.key(1))
    thresholds = variants.sparse_thresholds({
        "w": jax.random.normal(kw, (8,)), "zeros": jnp.zeros(5), "ones": -jnp.ones((2, 3)),
        "mostly_zero": jnp.array([0.0, 0.0, 0.0, 1.0, 2.0]), "scalar": jnp.array(0.3)}, 0.5)
    assert np.isfinite(thresholds["w"])
    assert all(np.isinf(thresholds[name]) for name in ("zeros", "ones", "mostly_zero", "scalar"))
    masks = variants.sparse_masks({"b": jnp.zeros(3)}, 0.5)
    assert bool(masks["b"].all())

    params = {"w": jax.random.normal(kw, (8,)), "m": jax.random.normal(km, (3, 4))}
    loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum((p["m"] - 1.0) ** 2)  # noqa: E731
    new = zojax.sparse_two_point(0.1, 3, sparsity=0.5)
    old = zojax.two_point(0.1, 3, direction=_paper_sparse_perturbation(0.5))
    new_state, old_state = new.init(params), old.init(params)
    assert all(np.isfinite(h) for h in jax.tree.leaves(new_state.perturbation_state))
    update = jax.jit(lambda opt, state, p: opt.update(None, state, p, value_fn=loss),
                     static_argnums=0)
    for _ in range(4):
        new_g, new_state = update(new, new_state, params)
        old_g, old_state = update(old, old_state, params)
        jax.tree.map(np.testing.assert_array_equal, _bits((new_g, new_state)),
                     _bits((old_g, old_state)))
        params = jax.tree.map(lambda p, g: p - 0.2 * g, params, new_g)
