r"""Pure zeroth-order gradient estimators (matfree-style closures, key first).

Two-point estimates with ``q`` directions :math:`u_i` (see :mod:`zojax.directions`):

.. math::

    \text{central: }\hat g = \frac1q \sum_i \frac{f(x+\lambda u_i)-f(x-\lambda u_i)}{2\lambda}u_i,
    \qquad
    \text{forward: } \hat g = \frac1q \sum_i \frac{f(x+\lambda u_i) - f(x)}{\lambda} u_i

Direction ``i`` is drawn from ``jax.random.fold_in(key, i)``, so the same key gives the same
estimate whatever ``chunk_size`` is. With ``chunk_size=None`` all directions (and the ± pair of
each) are evaluated as one vmapped batch; with ``chunk_size=c`` a ``lax.scan`` evaluates ``c``
at a time and accumulates :math:`\sum_i c_i u_i` on the fly, so each direction is generated,
used and dropped (MeZO style) and memory does not grow with ``q``.

The objective is only ever *evaluated*: it is never differentiated (except by
:func:`forward_grad`, the λ → 0 reference, which says so).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zojax import _checks
from zojax.directions import Sampler, get_sampler

SCHEMES = ("central", "forward")


def _accumulator_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def directional_estimate(coefficients, sample: Sampler, key, params, num_directions: int,
                         chunk_size: int | None):
    """Returns ``(mean_i c_i u_i, values)`` for ``q`` directions ``u_i = sample(fold_in(key, i))``.

    ``coefficients(U) -> (c, values)`` maps a batch of directions (leading axis ``n``) to their
    scalar coefficients ``c`` (n,) and the objective values it evaluated (n, k). This is the one
    loop every estimator in zojax shares: vmapped at once, or chunked in a ``lax.scan``.
    """

    def draw(indices):
        return jax.vmap(lambda i: sample(jax.random.fold_in(key, i), params))(indices)

    def weighted_sum(coeffs, directions):
        return jax.tree.map(
            lambda u: jnp.tensordot(coeffs.astype(_accumulator_dtype(u.dtype)),
                                    u.astype(_accumulator_dtype(u.dtype)), axes=1),
            directions,
        )

    def chunk(indices):
        directions = draw(indices)
        coeffs, values = coefficients(directions)
        return weighted_sum(coeffs, directions), values

    indices = jnp.arange(num_directions, dtype=jnp.uint32)
    if chunk_size is None or chunk_size >= num_directions:
        total, values = chunk(indices)
    else:
        def body(acc, idx):
            part, vals = chunk(idx)
            return jax.tree.map(jnp.add, acc, part), vals

        num_chunks, remainder = divmod(num_directions, chunk_size)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulator_dtype(p.dtype)), params)
        main = indices[: num_chunks * chunk_size].reshape(num_chunks, chunk_size)
        total, values = jax.lax.scan(body, zeros, main)
        values = values.reshape(num_chunks * chunk_size, *values.shape[2:])
        if remainder:
            part, vals = chunk(indices[num_chunks * chunk_size:])
            total = jax.tree.map(jnp.add, total, part)
            values = jnp.concatenate([values, vals])
    grads = jax.tree.map(lambda g, p: (g / num_directions).astype(p.dtype), total, params)
    return grads, values


def _validate(smoothing, num_directions, direction, scheme, chunk_size):
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    _checks.check_choice("direction", direction, ("gaussian", "sphere", "rademacher", "coordinate"),
                         allow_callable=True)
    _checks.check_choice("scheme", scheme, SCHEMES)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)


def two_point_estimate(fun: Callable, key, params, *, smoothing, num_directions: int,
                       sample: Sampler, scheme: str, chunk_size: int | None):
    """Returns ``(value, grads, finite)`` of the two-point estimator for ``fun(params)``.

    ``finite`` is a boolean scalar: every objective evaluation was finite.
    """
    _checks.check_float_params(params)
    fun = _checks.scalar_fun(fun)

    def perturbed(sign, directions):
        def one(u):
            return fun(jax.tree.map(
                lambda x, v: x + jnp.asarray(sign * smoothing, x.dtype) * v, params, u))
        return jax.vmap(one)(directions)

    if scheme == "central":
        def coefficients(directions):
            values = jax.vmap(perturbed, (0, None))(jnp.array([1, -1]), directions)  # (2, n)
            values = values.astype(_accumulator_dtype(values.dtype))
            return (values[0] - values[1]) / (2 * smoothing), values.T
        grads, values = directional_estimate(coefficients, sample, key, params, num_directions,
                                             chunk_size)
        value = jnp.mean(values)
    else:
        value = fun(params)
        base = value.astype(_accumulator_dtype(value.dtype))

        def coefficients(directions):
            values = perturbed(1, directions).astype(base.dtype)
            return (values - base) / smoothing, values[:, None]
        grads, values = directional_estimate(coefficients, sample, key, params, num_directions,
                                             chunk_size)
        value = base
        values = jnp.append(values, base)
    return value, grads, jnp.all(jnp.isfinite(values))


def zo_value_and_grad(fun: Callable, *, smoothing, num_directions: int = 1,
                      direction: str | Sampler = "gaussian", scheme: str = "central",
                      chunk_size: int | None = None):
    r"""Two-point zeroth-order value and gradient estimator.

    Args:
        fun: objective ``fun(params, *args, **kwargs) -> scalar``; only evaluated.
        smoothing: perturbation size :math:`\lambda > 0` (numeric, may be traced).
        num_directions: number ``q`` of directions averaged (static).
        direction: ``"gaussian"``, ``"sphere"``, ``"rademacher"``, ``"coordinate"`` or a sampler
            ``sample(key, params)`` (static); see :mod:`zojax.directions`.
        scheme: ``"central"`` (2q evaluations) or ``"forward"`` (q + 1 evaluations, one shared
            ``f(x)``).
        chunk_size: evaluate this many directions at a time in a ``lax.scan`` (static); ``None``
            evaluates all of them in one vmapped batch.

    Returns:
        ``value_and_grad_fn(key, params, *args, **kwargs) -> (value, grads)``; ``value`` is
        ``f(params)`` for the forward scheme and the mean of the ``f(x ± λu)`` for the central
        one; ``grads`` has the structure, shapes and dtypes of ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> vg = zo_value_and_grad(lambda p: jnp.sum(p ** 2), smoothing=1e-3, num_directions=8)
        >>> value, g = vg(jax.random.key(0), jnp.ones(3))
        >>> g.shape
        (3,)
    """
    _validate(smoothing, num_directions, direction, scheme, chunk_size)
    sample = get_sampler(direction)

    def value_and_grad_fn(key, params, *args, **kwargs):
        value, grads, _ = two_point_estimate(
            lambda p: fun(p, *args, **kwargs), key, params, smoothing=smoothing,
            num_directions=num_directions, sample=sample, scheme=scheme, chunk_size=chunk_size)
        return value, grads

    return value_and_grad_fn


def zo_grad(fun: Callable, *, smoothing, num_directions: int = 1,
            direction: str | Sampler = "gaussian", scheme: str = "central",
            chunk_size: int | None = None):
    r"""Two-point zeroth-order gradient estimator, :math:`\hat g \approx \nabla f_\lambda(x)`.

    Same arguments as :func:`zo_value_and_grad`; returns ``grad_fn(key, params, *args, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> grad_fn = zo_grad(lambda p, a: jnp.sum(a * p ** 2), smoothing=0.1, num_directions=4)
        >>> grad_fn(jax.random.key(0), jnp.ones(3), 2.0).shape
        (3,)
    """
    value_and_grad_fn = zo_value_and_grad(
        fun, smoothing=smoothing, num_directions=num_directions, direction=direction,
        scheme=scheme, chunk_size=chunk_size)

    def grad_fn(key, params, *args, **kwargs):
        return value_and_grad_fn(key, params, *args, **kwargs)[1]

    return grad_fn


def forward_grad_estimate(fun: Callable, key, params, *, num_directions: int, sample: Sampler,
                          chunk_size: int | None = None):
    """Returns ``(value, grads, finite)`` of the forward gradient ``mean_i (u_iᵀ∇f) u_i``."""
    _checks.check_float_params(params)
    fun = _checks.scalar_fun(fun)

    def coefficients(directions):
        value, slopes = jax.vmap(lambda u: jax.jvp(fun, (params,), (u,)))(directions)
        return slopes.astype(_accumulator_dtype(slopes.dtype)), jnp.stack([value, slopes], 1)

    grads, values = directional_estimate(coefficients, sample, key, params, num_directions,
                                         chunk_size)
    return values[0, 0], grads, jnp.all(jnp.isfinite(values))


def forward_grad(fun: Callable, *, num_directions: int = 1, direction: str | Sampler = "gaussian"):
    r"""The λ → 0 limit of the two-point estimator: :math:`\frac1q\sum_i (u_i^\top\nabla f)\,u_i`.

    The "forward gradient" of ZO-Bench, computed with ``jax.jvp``: unlike :func:`zo_grad` it
    *does* differentiate ``fun`` (one jvp per direction). Returns
    ``grad_fn(key, params, *args, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> grad_fn = forward_grad(lambda p: jnp.sum(p ** 2), num_directions=2)
        >>> grad_fn(jax.random.key(0), jnp.ones(3)).shape
        (3,)
    """
    _checks.check_positive_int("num_directions", num_directions)
    _checks.check_choice("direction", direction, ("gaussian", "sphere", "rademacher", "coordinate"),
                         allow_callable=True)
    sample = get_sampler(direction)

    def grad_fn(key, params, *args, **kwargs):
        return forward_grad_estimate(lambda p: fun(p, *args, **kwargs), key, params,
                                     num_directions=num_directions, sample=sample)[1]

    return grad_fn
