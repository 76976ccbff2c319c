r"""Sparse-MeZO (Liu et al. 2024): Gaussian perturbations of the small-magnitude entries of each
leaf only."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks, directions
from zojax.methods.two_point import two_point


def sparse_thresholds(params, sparsity) -> Any:
    """Per leaf, the ``1 − sparsity`` quantile of ``|θ|`` (a float32 scalar per leaf), or
    ``+inf`` where that quantile is *degenerate*: equal to the leaf's smallest magnitude (all
    magnitudes equal, e.g. a leaf of zeros, or so many tied at the minimum that the quantile
    falls among them): such a leaf is perturbed densely (see :func:`sparse_perturbation`)."""

    def threshold(p):
        magnitudes = jnp.abs(p).astype(jnp.float32)
        quantile = jnp.quantile(magnitudes, 1.0 - sparsity)
        smallest = jnp.min(magnitudes, initial=jnp.inf)
        return jnp.where(quantile == smallest, jnp.float32(jnp.inf), quantile)

    return jax.tree.map(threshold, params)


def sparse_masks(params, sparsity=None, thresholds=None) -> Any:
    """Per leaf, True where ``|θ| ≤`` the leaf's threshold (True: perturbed and updated): the
    ``thresholds`` given (a :func:`sparse_perturbation` state), else those of ``params`` at
    ``sparsity`` (the masks of a first step from ``params``; all True on a degenerate leaf)."""
    if thresholds is None:
        thresholds = sparse_thresholds(params, sparsity)
    return jax.tree.map(lambda p, h: jnp.abs(p).astype(jnp.float32) <= h, params, thresholds)


def sparse_perturbation(sparsity) -> directions.Perturbation:
    r"""Gaussian directions on the small-magnitude entries of each leaf: :math:`u = m \odot z`,
    :math:`z \sim N(0, I)`, :math:`m_j = [\,|\theta_j| \le h_\ell\,]`.

    As in the paper, each leaf's threshold :math:`h_\ell` is the ``1 − sparsity`` quantile of
    its initial magnitudes (the state: one scalar per leaf, :func:`sparse_thresholds` at
    ``init``), and the mask is recomputed from the current parameters at every step
    (``prepare``: one elementwise comparison, fused into the step), so it follows the weights as
    they move. Covariance :math:`\Sigma = \operatorname{diag}(m)`: on a quadratic the central
    estimate's mean is :math:`m \odot \nabla f`, zero off the mask.

    A degenerate threshold, :math:`h_\ell = \min_j |\theta_j|` at ``init`` (a leaf initialized
    at zero: a linear model, a bias, LoRA's B; or at a constant, such as a norm's scale), is
    stored as :math:`+\infty`: the leaf is perturbed densely at every step, as by
    :func:`zojax.two_point`. Why: its initial magnitudes rank nothing, every entry sits on the
    threshold, and the paper's rule perturbs them all at the first step, then freezes each one
    that moved outward: from zero, the whole leaf after one step, silently (least squares from
    zeros, ``tests/test_variants.py``: loss 8.62 → 8.61 in 300 steps; dense: 1.7e-7). Keeping
    the first step's mask (all entries) costs nothing per step. Thresholds taken later, from
    the first weights that differ, are of the size of one step and freeze the leaf again
    (there: within two steps); a quantile of the current weights would sort the leaf at every
    step, which the fixed threshold exists to avoid. A leaf that is not degenerate (one of two
    or more entries whose magnitudes all differ never is) keeps the paper's threshold and mask
    exactly. ``jnp.isinf`` of the state shows which leaves are dense.
    """

    def prepare(key, params, thresholds):
        del key
        return sparse_masks(params, thresholds=thresholds)

    def sample(key, params, state, masks):
        del state
        z = directions.gaussian(key, params)
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), z, masks)

    def cov_matvec(state, v):
        del state, v
        raise NotImplementedError("Σ = diag(m) depends on the step's params: Σv is "
                                  "jnp.where(sparse_masks(params, thresholds=state), v, 0).")

    return directions.Perturbation(lambda params: sparse_thresholds(params, sparsity), prepare,
                                   sample, lambda state, *args, **kwargs: state, cov_matvec)


def sparse_two_point(smoothing, num_directions: int = 1, *, sparsity: float,
                     scheme: str = "central", chunk_size: int | None = None, seed=0,
                     directions_sharding: NamedSharding | None = None
                     ) -> optax.GradientTransformationExtraArgs:
    r"""Sparse-MeZO: :func:`zojax.two_point` with :func:`sparse_perturbation` directions.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda m\odot z_i) - f(x - \lambda m\odot
        z_i)}{2\lambda}\, m\odot z_i

    Only the entries of each leaf at or below its threshold, the ``1 − sparsity`` quantile of
    its magnitudes at ``init``, are perturbed (and so updated); the others get a zero estimate.
    The mask is recomputed at every step from the current weights. A leaf whose threshold is
    degenerate (its smallest initial magnitude: all equal, e.g. initialized at zero) is
    perturbed densely instead of being frozen after its first step (threshold ``+inf``; see
    :func:`sparse_perturbation`). Same queries and non-finite policy as
    :func:`zojax.two_point`; the state adds one threshold per leaf.

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
    return two_point(smoothing, num_directions,
                                direction=sparse_perturbation(sparsity), scheme=scheme,
                                chunk_size=chunk_size, seed=seed,
                                directions_sharding=directions_sharding)
