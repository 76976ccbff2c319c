r"""Estimators of the 2024–25 ZO fine-tuning literature, each one stage of the pipeline.

Each is a perturbation (:mod:`zojax.directions`) or a weighting (:mod:`zojax.weightings`)
passed to the shared loop (:func:`zojax.estimators.partial_estimate`), and an optax transform
built by :func:`zojax.transforms.estimator_transform`: no loop of its own.

- :func:`fzoo` (FZOO, Dang et al. 2025): one-sided Rademacher differences, the step normalized
  by the standard deviation of the batch's losses.
- :func:`sparse_two_point` (Sparse-MeZO, Liu et al. 2024): Gaussian perturbations of the
  small-magnitude entries of each leaf only.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks, directions, estimators, transforms, weightings

# ---------------------------------------------------------------------------------------------
# FZOO: a weighting.


class FzooState(NamedTuple):
    """Accumulator of :func:`fzoo_weighting`."""

    differences: weightings.MeanState  # Σ_i (ℓ_i − ℓ_0) u_i and the count.
    losses: weightings.MomentsState  # mean and M₂ of the ℓ_i = f(x + λu_i).


def fzoo_weighting(base) -> weightings.Weighting:
    r""":math:`\frac{1}{N\sigma}\sum_i (\ell_i - \ell_0)\,u_i`, :math:`\ell_i = f(x + \lambda
    u_i)`, :math:`\ell_0 = f(x)` (``base``), :math:`\sigma` the sample standard deviation of the
    :math:`\ell_i` (0 where :math:`\sigma = 0`). Values are ``(n, 1)``: the points alone."""
    differences = weightings.mean(lambda values: values[:, 0] - base)
    losses = weightings.mean_and_sem(lambda values: values[:, 0])

    def init(params):
        return FzooState(differences.init(params), losses.init(params))

    def add(acc, values, directions):
        return FzooState(differences.add(acc.differences, values, directions),
                         losses.add(acc.losses, values, None))

    def combine(a, b):
        return FzooState(differences.combine(a.differences, b.differences),
                         losses.combine(a.losses, b.losses))

    def finalize(acc):
        _, sem = losses.finalize(acc.losses)
        std = sem * jnp.sqrt(acc.losses.count)
        return jax.tree.map(lambda g: jnp.where(std > 0, g / std.astype(g.dtype), 0.0),
                            differences.finalize(acc.differences))

    def reduce(acc, axis_name):
        return FzooState(differences.reduce(acc.differences, axis_name),
                         weightings.all_reduce(losses, acc.losses, axis_name))

    return weightings.Weighting(init, add, combine, finalize, reduce)


def fzoo(smoothing, num_directions: int, *, chunk_size: int | None = None, seed=0,
         directions_sharding: NamedSharding | None = None
         ) -> optax.GradientTransformationExtraArgs:
    r"""FZOO's estimate: batched one-sided Rademacher differences over their losses' spread.

    .. math:: \hat g = \frac{1}{N\sigma}\sum_{i=1}^N \big(f(x + \lambda u_i) - f(x)\big)\,u_i,
        \qquad u_i \in \{\pm 1\}^d,\quad \sigma = \operatorname{std}_i f(x + \lambda u_i)

    (N + 1 queries per step). Chained with ``optax.sgd(η)`` it is FZOO's update
    :math:`x \leftarrow x - \eta\,\hat g`. Covariance of the directions: :math:`I`. What it
    estimates: as :math:`\lambda \to 0`, :math:`f(x + \lambda u) - f(x) \approx \lambda
    u^\top\nabla f` and :math:`\sigma \approx \lambda\|\nabla f\|` (Rademacher:
    :math:`\operatorname{Var} u^\top g = \|g\|^2`), so :math:`\mathbb{E}\hat g \to \nabla f /
    \|\nabla f\|` up to :math:`O(1/N)`: normalized gradient descent, whose step length does not
    depend on the loss's scale nor on λ. ``state.value`` is :math:`f(x)`.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        num_directions: :math:`N \geq 2` (static): σ needs two losses.
        chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = fzoo(0.01, 4)
        >>> g, state = opt.update(None, opt.init(jnp.ones(3)), jnp.ones(3),
        ...                       value_fn=lambda p: jnp.sum(p ** 2))
        >>> int(state.num_queries)
        5
    """
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    if num_directions < 2:
        raise ValueError(f"num_directions must be >= 2 (FZOO divides by the standard "
                         f"deviation of the step's losses), got {num_directions!r}.")
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    estimators.check_directions_sharding(directions_sharding, num_directions)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        del perturbation_state, extra_args
        base = value_fn(params).astype(jnp.float32)
        weighting = fzoo_weighting(base)
        partial = estimators.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction="rademacher", scheme="points", chunk_size=chunk_size,
            weighting=weighting, directions_sharding=directions_sharding)
        _, grads, finite = estimators.finalize(partial, params, weighting)
        return estimators.Estimate(base, grads, finite & jnp.isfinite(base),
                                   partial.num_queries + 1, ())

    return transforms.estimator_transform(estimate, seed, name="fzoo")


# ---------------------------------------------------------------------------------------------
# Sparse-MeZO: a perturbation.


def _small_magnitude_masks(params, sparsity: float):
    """Per leaf, True where ``|θ|`` is at most the leaf's ``1 − sparsity`` magnitude quantile."""
    def mask(p):
        magnitude = jnp.abs(p).astype(jnp.float32)
        return magnitude <= jnp.quantile(magnitude, 1.0 - sparsity)

    return jax.tree.map(mask, params)


def sparse_perturbation(sparsity) -> directions.Perturbation:
    r"""Gaussian directions on the small-magnitude entries of each leaf: :math:`u = m \odot z`,
    :math:`z \sim N(0, I)`, :math:`m_j = [\,|\theta_j| \le q_{1-s}(|\theta_{\text{leaf}}|)\,]`.

    The masks are recomputed from the parameters at every step (``prepare``), so they follow the
    weights as they move. Covariance :math:`\Sigma = \operatorname{diag}(m)`: on a quadratic the
    central estimate's mean is :math:`m \odot \nabla f`, zero off the mask.
    """

    def prepare(key, params, state):
        del key, state
        return _small_magnitude_masks(params, sparsity)

    def sample(key, params, state, masks):
        del state
        z = directions.gaussian(key, params)
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), z, masks)

    def cov_matvec(state, v):
        del state, v
        raise NotImplementedError("Σ = diag(m) depends on the step's params: Σv is "
                                  "jnp.where(sparse_masks(params, sparsity), v, 0).")

    return directions.Perturbation(lambda params: (), prepare, sample,
                                   lambda state, *args, **kwargs: state, cov_matvec)


def sparse_masks(params, sparsity: float) -> Any:
    """The masks a :func:`sparse_perturbation` step at ``params`` perturbs (True: perturbed)."""
    return _small_magnitude_masks(params, sparsity)


def sparse_two_point(smoothing, num_directions: int = 1, *, sparsity: float,
                     scheme: str = "central", chunk_size: int | None = None, seed=0,
                     directions_sharding: NamedSharding | None = None
                     ) -> optax.GradientTransformationExtraArgs:
    r"""Sparse-MeZO: :func:`zojax.two_point` with :func:`sparse_perturbation` directions.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda m\odot z_i) - f(x - \lambda m\odot
        z_i)}{2\lambda}\, m\odot z_i

    Only the entries of each leaf at or below its ``1 − sparsity`` magnitude quantile are
    perturbed (and so updated); the others get a zero estimate. Same state, queries and
    non-finite policy as :func:`zojax.two_point`.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        num_directions: ``q`` (static).
        sparsity: the fraction of each leaf left unperturbed, the largest entries, in (0, 1).
        scheme, chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = sparse_two_point(0.01, 2, sparsity=0.5)
        >>> g, _ = opt.update(None, opt.init(jnp.arange(4.0)), jnp.arange(4.0),
        ...                   value_fn=lambda p: jnp.sum(p ** 2))
        >>> bool(g[2] == 0) and bool(g[3] == 0)  # the two largest entries stay put
        True
    """
    if not isinstance(sparsity, jax.core.Tracer):  # traced: injected by inject_hyperparams
        number = _checks.concrete_value(sparsity)
        if number is None or not (math.isfinite(number) and 0 < number < 1):
            raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}.")
    return transforms.two_point(smoothing, num_directions,
                                direction=sparse_perturbation(sparsity), scheme=scheme,
                                chunk_size=chunk_size, seed=seed,
                                directions_sharding=directions_sharding)
