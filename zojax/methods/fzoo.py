r"""FZOO (Dang et al. 2025): one-sided Rademacher differences, the step normalized by the
standard deviation of the batch's losses."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import pipeline, weightings
from zojax.transform import estimator_transform


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
    pipeline.validate(smoothing, num_directions, chunk_size=chunk_size,
                      directions_sharding=directions_sharding)
    if num_directions < 2:
        raise ValueError(f"num_directions must be >= 2 (FZOO divides by the standard "
                         f"deviation of the step's losses), got {num_directions!r}.")

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        del perturbation_state, extra_args
        base = value_fn(params).astype(jnp.float32)
        weighting = fzoo_weighting(base)
        partial = pipeline.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction="rademacher", scheme="plus", chunk_size=chunk_size,
            weighting=weighting, directions_sharding=directions_sharding)
        _, grads, finite = pipeline.finalize(partial, params, weighting)
        return pipeline.Estimate(base, grads, finite & jnp.isfinite(base),
                                   partial.num_queries + 1, ())

    return estimator_transform(estimate, seed, name="fzoo")
