r"""HiZOO (Zhao et al. 2025): perturbations shaped by a diagonal Hessian estimate kept in the
state and updated from the step's own evaluations."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks, directions, pipeline, weightings
from zojax.transform import estimator_transform


def hizoo_perturbation() -> directions.Perturbation:
    r"""Directions :math:`u = H^{-1/2} z`, :math:`z \sim N(0, I)`, :math:`H` the diagonal
    Hessian estimate kept as the state (params' structure, float32 or wider, initially 1).
    Covariance :math:`\Sigma = H^{-1}`. The state changes in :func:`hizoo`, from the step's
    evaluations (:func:`hizoo_weighting`)."""

    def init(params):
        return jax.tree.map(lambda p: jnp.ones(p.shape, weightings.accumulator_dtype(p.dtype)),
                            params)

    def sample(key, params, hessian, context):
        del context
        return jax.tree.map(lambda z, h: (z * jax.lax.rsqrt(h)).astype(z.dtype),
                            directions.gaussian(key, params), hessian)

    return directions.Perturbation(init, lambda key, params, state: (), sample,
                                   lambda state, *args, **kwargs: state,
                                   lambda hessian, v: jax.tree.map(jnp.divide, v, hessian))


class HizooState(NamedTuple):
    """Accumulator of :func:`hizoo_weighting`."""

    grads: weightings.MeanState  # Σ_i (ℓ₊ − ℓ₋)/(2λ) u_i.
    curvature: weightings.MeanState  # Σ_i |ℓ₊ + ℓ₋ − 2ℓ₀| / (2λ²) u_i².


def hizoo_weighting(smoothing, base) -> weightings.Weighting:
    r"""The central estimate :math:`\frac1q\sum_i \frac{\ell_{i+} - \ell_{i-}}{2\lambda} u_i`
    and, in the same pass, :math:`\frac1q\sum_i \frac{|\ell_{i+} + \ell_{i-} - 2\ell_0|}
    {2\lambda^2} u_i^2` (``base`` = :math:`\ell_0`), finalized as the pair."""
    grads = weightings.mean(lambda values: (values[:, 0] - values[:, 1]) / (2 * smoothing))
    curvature = weightings.mean(
        lambda values: jnp.abs(values[:, 0] + values[:, 1] - 2 * base) / (2 * smoothing**2))

    def add(acc, values, directions):
        return HizooState(grads.add(acc.grads, values, directions),
                          curvature.add(acc.curvature, values, jax.tree.map(jnp.square,
                                                                            directions)))

    def combine(a, b):
        return HizooState(grads.combine(a.grads, b.grads),
                          curvature.combine(a.curvature, b.curvature))

    return weightings.Weighting(
        lambda params: HizooState(grads.init(params), curvature.init(params)), add, combine,
        lambda acc: (grads.finalize(acc.grads), curvature.finalize(acc.curvature)),
        lambda acc, axis_name: jax.lax.psum(acc, axis_name))


def hizoo(smoothing, num_directions: int = 1, *, hessian_smooth=1e-8,
          chunk_size: int | None = None, seed=0,
          directions_sharding: NamedSharding | None = None
          ) -> optax.GradientTransformationExtraArgs:
    r"""HiZOO (Zhao et al. 2025): central differences along :math:`u = H^{-1/2} z`, and the
    diagonal Hessian estimate :math:`H` updated from the same evaluations and :math:`f(x)`.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda u_i) - f(x - \lambda u_i)}{2\lambda}
        \,u_i, \qquad H \leftarrow (1 - \alpha) H + \alpha\, \frac1q\sum_i
        \frac{|f(x + \lambda u_i) + f(x - \lambda u_i) - 2 f(x)|}{2\lambda^2}\, H \odot z_i^2

    (the authors' code: :math:`H` starts at 1, :math:`H \odot z^2 = H^2 \odot u^2`). Covariance
    :math:`\Sigma = H^{-1}`: on a quadratic :math:`\mathbb{E}\hat g = H^{-1}\nabla f`, a
    diagonally preconditioned step. On a quadratic with diagonal Hessian :math:`D`, where the
    second difference is :math:`\lambda^2 u^\top D u` exactly,
    :math:`\mathbb{E}[(z^\top A z) z_j^2] = \operatorname{tr} A + 2A_{jj}` with
    :math:`A = H^{-1/2} D H^{-1/2}`, so the update's fixed point is :math:`H = \frac{d + 2}{2}
    D`: the true diagonal Hessian up to one scalar (which rescales λ and the step alike). The
    step uses the H that shaped its directions (the reference rescales it by the updated one,
    a change of O(α)). 2q + 1 queries per step; the state is H (params-sized, float32), and a
    step holds one more float32 accumulator than a two-point step (the curvature sum).
    ``state.value`` is :math:`f(x)`.

    Args:
        smoothing: :math:`\lambda > 0` (the paper's μ; numeric, may be injected/vmapped).
        num_directions: ``q`` (static).
        hessian_smooth: :math:`\alpha \in [0, 1]`, the paper's smoothing of H (its code's
            ``hessian_smooth``; 1e-8 to 1e-6 for LLMs, larger for small models; 0: MeZO with
            fixed unit H).
        chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = hizoo(0.01, hessian_smooth=0.5)
        >>> w = jnp.ones(3)
        >>> g, state = opt.update(None, opt.init(w), w, value_fn=lambda w: jnp.sum(w ** 2))
        >>> int(state.num_queries), state.perturbation_state.shape
        (3, (3,))
    """
    pipeline.validate(smoothing, num_directions, chunk_size=chunk_size,
                      directions_sharding=directions_sharding)
    if not isinstance(hessian_smooth, jax.core.Tracer):
        number = _checks.concrete_value(hessian_smooth)
        if number is None or not (0 <= number <= 1):
            raise ValueError(f"hessian_smooth must be a number in [0, 1], got "
                             f"{hessian_smooth!r}.")
    perturbation = hizoo_perturbation()

    def estimate(key, value_fn, params, hessian, **extra_args):
        del extra_args
        base = value_fn(params)
        base = base.astype(weightings.accumulator_dtype(base.dtype))
        weighting = hizoo_weighting(smoothing, base)
        partial = pipeline.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, chunk_size=chunk_size, weighting=weighting,
            perturbation_state=hessian, directions_sharding=directions_sharding)
        grads, curvature = weighting.finalize(partial.acc)
        alpha = jnp.asarray(hessian_smooth, jnp.float32)
        hessian = jax.tree.map(lambda h, c: (1 - alpha) * h + alpha * h * h * c, hessian,
                               curvature)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return pipeline.Estimate(base, grads, partial.finite & jnp.isfinite(base),
                                   partial.num_queries + 1, hessian)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                                          name="hizoo")
