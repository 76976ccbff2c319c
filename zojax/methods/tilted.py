r"""The tilted (soft-SAM, ZEST) objective, :math:`L_t(x) = \frac1t\log\mathbb{E}\,
e^{t f(x + \lambda u)}`: its gradient estimate, its Monte Carlo value and the transform."""

from collections.abc import Callable

import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks, pipeline, weightings
from zojax.objective import bind
from zojax.transform import estimator_transform

TILTED_DIRECTIONS = ("gaussian", "sphere")


def _validate(smoothing, tilt, num_directions, direction, antithetic, chunk_size,
              directions_sharding=None):
    pipeline.validate(smoothing, num_directions, chunk_size=chunk_size,
                      directions_sharding=directions_sharding,
                      shared=num_directions // 2 if antithetic else None,
                      shared_name=(f"num_directions // 2 (the ± pairs of {num_directions} points)"
                                   if antithetic else None))
    _checks.check_positive_finite("tilt", tilt)
    if num_directions < 2:
        raise ValueError("num_directions must be >= 2 (a self-normalized estimate of one point "
                         f"is pure noise), got {num_directions!r}.")
    if antithetic and num_directions % 2:
        raise ValueError("num_directions counts points; with antithetic=True it must be even "
                         f"(k pairs x ± λu), got {num_directions!r}.")
    _checks.check_choice("direction", direction, TILTED_DIRECTIONS)


def tilted_estimate(fun: Callable, key, params, *, smoothing, tilt, num_directions: int,
                    direction: str = "gaussian", antithetic: bool = True,
                    chunk_size: int | None = None,
                    directions_sharding: NamedSharding | None = None,
                    **extra_args) -> pipeline.Estimate:
    """One step of the tilted estimator: the :class:`Estimate` for ``fun(params)``.

    ``value`` is the mean of the evaluated losses; a step whose tilt or smoothing is not
    positive and finite (traced hyperparameters) is reported as not finite.
    """
    del extra_args
    weighting = weightings.tilted(smoothing, tilt, antithetic)
    partial = pipeline.partial_estimate(
        fun, key, params, smoothing=smoothing,
        num_directions=num_directions // 2 if antithetic else num_directions,
        direction=direction, scheme="central" if antithetic else "plus",
        chunk_size=chunk_size, weighting=weighting, directions_sharding=directions_sharding)
    value, grads, finite = pipeline.finalize(partial, params, weighting)
    finite &= jnp.isfinite(tilt) & (tilt > 0)
    return pipeline.Estimate(value, grads, finite, partial.num_queries, ())


def tilted_grad(fun: Callable, *, smoothing, tilt, num_directions: int,
                direction: str = "gaussian", antithetic: bool = True,
                chunk_size: int | None = None,
                directions_sharding: NamedSharding | None = None):
    r"""Zeroth-order estimate of the gradient of the tilted (soft-SAM) smoothed loss.

    .. math::

        L_t(x) = \frac1t \log \mathbb{E}_u\, e^{t f(x + \lambda u)}, \qquad
        \hat g = \frac{1}{t\lambda} \sum_{i,k} w_{ik}\, s_k u_i, \quad
        w_{ik} = \operatorname{softmax}_{ik}\big(t f(x + s_k \lambda u_i)\big)

    :math:`t \to 0` gives the ordinary smoothed loss :math:`\mathbb{E} f(x + \lambda u)` (a
    trace penalty), :math:`t \to \infty` the largest loss of the neighbourhood (SAM). This
    estimator is zojax's own derivation (the ZEST paper's estimator is not public):

    - *Gaussian* :math:`u \sim N(0, I)`: Stein's lemma gives :math:`\nabla L_t =
      \frac{1}{t\lambda}\,\mathbb{E}[e^{t f(x+\lambda u)} u] / \mathbb{E}[e^{t f(x+\lambda u)}]`,
      and :math:`\hat g` is its self-normalized plug-in (bias :math:`O(1/k)`).
    - *Sphere* :math:`u = \sqrt d\, v`, :math:`v` uniform on the unit sphere (zojax's isotropic
      convention, radius :math:`\rho = \lambda\sqrt d`): the divergence theorem gives the gradient
      of the *ball*-smoothed :math:`L_t`, :math:`\frac{d}{t\rho}\mathbb{E}_v[e^{tf}v] /
      \mathbb{E}_{\text{ball}}[e^{tf}]`, whose numerator is :math:`\frac{1}{t\lambda}
      \mathbb{E}_v[e^{tf}u]` (so :math:`c = 1`). The plug-in normalizes by sphere values instead
      of ball values: its direction is exact and its length is scaled by :math:`r =
      \mathbb{E}_{\text{ball}} e^{tf} / \mathbb{E}_{\text{sphere}} e^{tf} = 1 - \frac{t\rho}{d+1}
      \langle v^\top\nabla f(x + \rho v)\rangle_w + \dots`, a bias :math:`O(t\lambda\|\nabla f\|
      /\sqrt d)` that vanishes as :math:`t \to 0` or :math:`d \to \infty`.

    Any baseline cancels in the softmax: the largest value is subtracted for stability, so a
    large tilt (:math:`t f \sim 10^4`) stays finite. Expanding the softmax, :math:`\hat g \approx
    \frac{1}{t\lambda}\overline{u} + \frac1\lambda\overline{(f - \bar f)\,u} + O(t)`: the first
    term has mean zero and variance :math:`\propto 1/t^2`. With ``antithetic=True`` the
    directions come in pairs :math:`\pm u_i` that sum to zero, the term vanishes exactly, and
    each pair's weight difference is computed with ``expm1`` (see
    :func:`zojax.weightings.softmax`), so that small tilts keep their precision: with one pair
    and :math:`t \to 0`, :math:`\hat g` is exactly the central two-point estimate. Without
    antithetic pairs, expect that variance at small :math:`t`.

    Where :math:`L_t` does not exist: with Gaussian directions :math:`\mathbb{E}\,e^{tf}` is
    infinite when :math:`f` grows faster than quadratically (the quartic Figure-1 function of
    :mod:`zojax.problems.test_function`) and, on a quadratic with Hessian eigenvalues
    :math:`h_i`, once :math:`t\lambda^2 h_{\max} \ge 1`; the plug-in stays finite but estimates
    nothing. The sphere has bounded support: :math:`L_t` is always finite; prefer it for sweeps
    over :math:`t`.

    Args:
        fun: objective ``fun(params, *args, **kwargs) -> scalar``, or an :class:`Objective`;
            only evaluated (through its line form when it has one, see :func:`bind`).
        smoothing: :math:`\lambda > 0` (numeric, may be traced).
        tilt: :math:`t > 0` (numeric, may be traced: sweep it with ``vmap`` or
            ``optax.inject_hyperparams``).
        num_directions: the number of points evaluated (static); with ``antithetic=True`` an even
            ``2k``, the ``2k`` points :math:`x \pm \lambda u_i` of
            ``two_point(num_directions=k)`` (pair ``j`` from ``fold_in(key, j)``).
        direction: ``"gaussian"`` or ``"sphere"`` (static).
        antithetic: evaluate pairs :math:`\pm u_i` (static).
        chunk_size: directions (pairs) evaluated at a time in a ``lax.scan``, as in
            :func:`zo_grad` (static); the estimate does not depend on it.
        directions_sharding: split the directions (pairs) over a mesh axis, as in
            :func:`zo_grad`; their number must be a multiple of its size.

    Returns:
        ``grad_fn(key, params, *args, **kwargs) -> grads`` with the structure, shapes and dtypes
        of ``params``.

    Raises:
        ValueError: ``smoothing`` or ``tilt`` not positive and finite; ``num_directions`` < 2 or
            odd with ``antithetic=True``; an unknown ``direction``; a bad ``chunk_size``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> grad_fn = tilted_grad(lambda p: jnp.sum(p ** 2), smoothing=0.1, tilt=1.0,
        ...                       num_directions=8)
        >>> grad_fn(jax.random.key(0), jnp.ones(3)).shape
        (3,)
    """
    _validate(smoothing, tilt, num_directions, direction, antithetic, chunk_size,
                     directions_sharding)

    def grad_fn(key, params, *args, **kwargs):
        return tilted_estimate(bind(fun, *args, **kwargs), key, params, smoothing=smoothing,
                               tilt=tilt, num_directions=num_directions, direction=direction,
                               antithetic=antithetic, chunk_size=chunk_size,
                               directions_sharding=directions_sharding).grads

    return grad_fn


def tilted_value(fun: Callable, key, params, *args, smoothing, tilt, num_samples: int,
                 direction: str = "gaussian", chunk_size: int | None = None, **kwargs):
    r"""Monte Carlo :math:`L_t(x) = \frac1t\log\mathbb{E}_u\, e^{t f(x + \lambda u)}`, with its
    standard error.

    The log-mean-exp of ``num_samples`` values :math:`f(x + \lambda u_i)` (direction ``i`` from
    ``fold_in(key, i)``, as :func:`tilted_grad`), biased by :math:`O(1/n)` (Jensen); the
    standard error is the delta method's (:func:`zojax.weightings.log_mean_exp`). See
    :func:`tilted_grad` for where :math:`L_t` exists.

    Returns:
        ``(estimate, stderr)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> value, stderr = tilted_value(lambda p: jnp.sum(p ** 2), jax.random.key(0),
        ...                              jnp.zeros(2), smoothing=0.1, tilt=1e-6, num_samples=4000)
        >>> bool(abs(value - 0.02) < 4 * stderr)  # t → 0: E f(x + λu) = λ² d
        True
    """
    pipeline.validate(smoothing, num_samples, chunk_size=chunk_size, num_name="num_samples")
    _checks.check_positive_finite("tilt", tilt)
    _checks.check_choice("direction", direction, TILTED_DIRECTIONS)
    weighting = weightings.log_mean_exp(tilt)
    partial = pipeline.partial_estimate(
        bind(fun, *args, **kwargs), key, params, smoothing=smoothing, num_directions=num_samples,
        direction=direction, scheme="plus", chunk_size=chunk_size, weighting=weighting)
    return weighting.finalize(partial.acc)


def tilted(smoothing, tilt, num_directions: int, *, direction: str = "gaussian",
           antithetic: bool = True, chunk_size: int | None = None, seed=0,
           directions_sharding: NamedSharding | None = None
           ) -> optax.GradientTransformationExtraArgs:
    r"""The tilted (soft-SAM, ZEST) zeroth-order gradient estimate as an optax transformation.

    :math:`\hat g = \frac{1}{t\lambda}\sum_{ik} \operatorname{softmax}_{ik}(t f_{ik})\, s_k u_i`
    estimates :math:`\nabla L_t`, :math:`L_t(x) = \frac1t\log\mathbb{E}\,e^{t f(x+\lambda u)}`:
    see :func:`zojax.tilted_grad` for the derivation, the small-tilt and existence caveats.
    Same ``value_fn`` contract, :class:`TwoPointState` and non-finite policy as
    :func:`two_point`; ``state.value`` is the mean of the evaluated losses.

    Args:
        smoothing: :math:`\lambda > 0`; numeric, may be injected/vmapped.
        tilt: :math:`t > 0`; numeric, may be injected/vmapped.
        num_directions: points evaluated per step (static; even with ``antithetic=True``: the
            points of ``two_point(num_directions=num_directions // 2)``).
        direction: ``"gaussian"`` or ``"sphere"`` (static).
        antithetic: pairs :math:`\pm u` (static).
        chunk_size: directions (pairs) evaluated at a time (static).
        seed: int seed or typed PRNG key of the directions.
        directions_sharding: split the directions (pairs) over a mesh axis, as in
            :func:`two_point`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.chain(tilted(0.01, tilt=1.0, num_directions=4), optax.sgd(0.1))
        >>> state = opt.init(jnp.ones(3))
        >>> updates, state = opt.update(None, state, jnp.ones(3), value_fn=lambda p: jnp.sum(p**2))
    """
    _validate(smoothing, tilt, num_directions, direction, antithetic, chunk_size,
              directions_sharding)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        del perturbation_state
        return tilted_estimate(
            value_fn, key, params, smoothing=smoothing, tilt=tilt,
            num_directions=num_directions, direction=direction, antithetic=antithetic,
            chunk_size=chunk_size, directions_sharding=directions_sharding, **extra_args)

    return estimator_transform(estimate, seed, name="tilted")
