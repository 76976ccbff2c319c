"""The literature's estimators as stages (zojax.variants): the claim each makes, checked
statistically with fixed seeds, and bad input. The optax contract battery is in
test_transforms.py (its REGISTRY holds them)."""

import jax
import jax.numpy as jnp
import numpy as np
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
])
def test_bad_hyperparameters_are_errors_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()
