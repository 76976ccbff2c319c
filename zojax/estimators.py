r"""Pure zeroth-order gradient estimators (matfree-style closures, key first).

Two-point estimates with ``q`` directions :math:`u_i` (see :mod:`zojax.directions`):

.. math::

    \text{central: }\hat g = \frac1q \sum_i \frac{f(x+\lambda u_i)-f(x-\lambda u_i)}{2\lambda}u_i,
    \qquad
    \text{forward: } \hat g = \frac1q \sum_i \frac{f(x+\lambda u_i) - f(x)}{\lambda} u_i

Direction ``i`` is drawn from ``jax.random.fold_in(key, i)``, so the same key gives the same
estimate whatever ``chunk_size`` is. With ``chunk_size=None`` all directions (and the ± pair of
each) are evaluated as one vmapped batch; with ``chunk_size=c`` a ``lax.scan`` evaluates ``c``
at a time (first :math:`x + \lambda u`, then :math:`x - \lambda u` in the same buffer) and
accumulates :math:`\sum_i c_i u_i` on the fly, so each direction is generated, used and dropped
(MeZO style) and memory does not grow with ``q``: a ``chunk_size=1`` step holds the
accumulator, one direction and one perturbed copy of the parameters (3 parameter-sized
buffers beyond the forward pass, at every ``q``).

The objective is only ever *evaluated*: it is never differentiated (except by
:func:`forward_grad`, the λ → 0 reference, which says so). An objective may also evaluate itself
along lines, :math:`t \mapsto f(x + t u)` (its *line form*, see :func:`bind`); the two-point
estimators then use that instead of perturbed copies of the parameters.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zojax import _checks
from zojax.directions import Sampler, get_sampler

SCHEMES = ("central", "forward")
_ELEMENTWISE_SUM_MAX = 8  # chunks up to this size accumulate Σ c_j u_j elementwise, not by a dot


def _accumulator_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _weighted_sum(coeffs, directions, acc=None):
    """Returns ``acc + Σ_j c_j u_j`` (or the bare sum when ``acc`` is None), in float32 or wider.

    ``directions`` is a pytree batch (leading axis ``n``), ``coeffs`` has shape (n,). Small
    batches (``chunk_size=1`` above all) are summed elementwise, so the whole update is one fused
    in-place pass over the accumulator; large ones use a dot.
    """
    def leaf(u, a):
        dtype = _accumulator_dtype(u.dtype)
        c, u = coeffs.astype(dtype), u.astype(dtype)
        if u.shape[0] <= _ELEMENTWISE_SUM_MAX:
            part = sum((c[j] * u[j] for j in range(1, u.shape[0])), c[0] * u[0])
        else:
            part = jnp.tensordot(c, u, axes=1)
        return part if a is None else a + part

    if acc is None:
        return jax.tree.map(lambda u: leaf(u, None), directions)
    return jax.tree.map(leaf, directions, acc)


def bind(fun: Callable, *args, **kwargs) -> Callable:
    r"""Returns ``params ↦ fun(params, *args, **kwargs)``, keeping ``fun``'s line form.

    A *line form* is an optional attribute of an objective,
    ``fun.along(params, direction, steps, *args, **kwargs)``, that returns
    :math:`[f(x + t_k u)]_k` for a 1-D array of steps :math:`t_k` (up to rounding). The two-point
    estimators evaluate it, when present, instead of ``fun`` at perturbed copies of ``params``.
    For a model linear in its first stage, :math:`f(x) = h(Ax)`, it computes :math:`Ax` and
    :math:`Au` once and evaluates :math:`h(Ax + t\,Au)` for each step: ``q`` directions cost
    ``q + 1`` products with :math:`A` instead of ``2q``, and under a ``vmap`` over parameters
    that share their directions (a sweep with one seed), :math:`Au` is computed once for all of
    them. The losses of :mod:`zojax.problems.linear` have one. A ``lambda`` drops the line form;
    ``bind`` keeps it (use it for ``value_fn`` of the transforms).

    Example:
        >>> import jax.numpy as jnp
        >>> def loss(w, a):
        ...     return jnp.sum((a @ w) ** 2)
        >>> def loss_along(w, u, steps, a):  # h(Aw + t Au) for every step t
        ...     return jnp.sum((a @ w + steps[:, None] * (a @ u)) ** 2, axis=1)
        >>> loss.along = loss_along
        >>> value_fn = bind(loss, 2 * jnp.eye(2))
        >>> float(value_fn(jnp.ones(2)))
        8.0
        >>> value_fn.along(jnp.ones(2), jnp.ones(2), jnp.array([0.0, 1.0])).tolist()
        [8.0, 32.0]
    """

    def bound(params):
        return fun(params, *args, **kwargs)

    along = getattr(fun, "along", None)
    if along is not None:
        bound.along = lambda params, direction, steps: along(params, direction, steps, *args,
                                                             **kwargs)
    return bound


def _computed_once(fn: Callable):
    """``fn()`` in a two-trip loop whose second trip keeps the first one's result.

    XLA inlines a one-trip loop, and then fuses an elementwise generator (a random direction)
    into every consumer of its result, recomputing it in each. It cannot inline this loop, so
    the result is computed once and stored.
    """
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn))
    return jax.lax.fori_loop(0, 2, lambda i, out: jax.lax.cond(i == 0, fn, lambda: out), init)


def directional_estimate(estimate_chunk, sample: Sampler, key, params, num_directions: int,
                         chunk_size: int | None):
    """Returns ``(mean_i c_i u_i, values)`` for ``q`` directions ``u_i = sample(fold_in(key, i))``.

    ``estimate_chunk(U, acc) -> (acc + Σ_j c_j u_j, values)`` evaluates the objective for a batch
    of directions (leading axis ``n``), adds their weighted sum to ``acc`` (with
    :func:`_weighted_sum`; ``acc`` is None for a single chunk) and returns the objective values it
    evaluated (n, k). This is the one loop every estimator in zojax shares: vmapped at once, or
    chunked in a ``lax.scan`` whose carry is the running sum, so that each direction is
    generated, used and dropped.
    """

    dim = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))

    def draw(indices):
        # A loop (over batches of about 2¹⁶ random numbers) rather than one vmap: each direction
        # is generated by one kernel and stored once. Vmapped, XLA fuses the generator into every
        # consumer of the directions (the perturbed points and the weighted sum) and computes the
        # random numbers again in each, in code whose last bits can differ from program to
        # program; under a vmap over parameters that share the directions, once per member. A
        # one-trip loop is inlined, so a single batch is stored by `_computed_once`, except when
        # chunked: there each consumer regenerates the directions (MeZO style, no stored copy).
        n = indices.shape[0]
        batch = max(b for b in range(1, max(1, min(2**16 // max(dim, 1), n // 2)) + 1)
                    if n % b == 0)

        def directions():
            return jax.lax.map(lambda i: sample(jax.random.fold_in(key, i), params), indices,
                               batch_size=batch)

        return directions() if n > batch or chunk_size else _computed_once(directions)

    indices = jnp.arange(num_directions, dtype=jnp.uint32)
    if chunk_size is None or chunk_size >= num_directions:
        total, values = estimate_chunk(draw(indices), None)
    else:
        num_chunks, remainder = divmod(num_directions, chunk_size)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _accumulator_dtype(p.dtype)), params)
        main = indices[: num_chunks * chunk_size].reshape(num_chunks, chunk_size)
        total, values = jax.lax.scan(lambda acc, idx: estimate_chunk(draw(idx), acc), zeros, main)
        values = values.reshape(num_chunks * chunk_size, *values.shape[2:])
        if remainder:
            total, rest = estimate_chunk(draw(indices[num_chunks * chunk_size:]), total)
            values = jnp.concatenate([values, rest])
    grads = jax.tree.map(lambda g, p: (g / num_directions).astype(p.dtype), total, params)
    return grads, values


def _validate(smoothing, num_directions, direction, scheme, chunk_size):
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    _checks.check_choice("direction", direction, ("gaussian", "sphere", "rademacher", "coordinate"),
                         allow_callable=True)
    _checks.check_choice("scheme", scheme, SCHEMES)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)


def _central_in_sequence(perturbed, smoothing, directions, acc):
    """Central differences of a chunk with ``x + λU`` and ``x − λU`` evaluated one after the other.

    A two-step loop: the second perturbed copy of the parameters reuses the first one's buffer,
    and the accumulator is updated inside the loop (a no-op ``+ 0 · U`` on the first step), so
    that the directions feed a single consumer and are stored once. Outside it, XLA keeps both
    ``U`` and the ``erf_inv`` it was computed from alive until the update: one more
    parameter-sized buffer, and a loop over ``q`` directions would then need 4 instead of 3.
    """
    n = jax.tree.leaves(directions)[0].shape[0]

    def step(carry, sign):
        acc, plus = carry
        value = perturbed(sign, directions)
        value = value.astype(_accumulator_dtype(value.dtype))
        if acc is not None:
            coeffs = jnp.where(sign < 0, (plus - value) / (2 * smoothing), 0.0)
            acc = _weighted_sum(coeffs, directions, acc)
        return (acc, value), value

    dtype = _accumulator_dtype(jax.eval_shape(lambda: perturbed(1, directions)).dtype)
    (acc_out, _), values = jax.lax.scan(step, (acc, jnp.zeros(n, dtype)), jnp.array([1, -1]))
    if acc is None:
        acc_out = _weighted_sum((values[0] - values[1]) / (2 * smoothing), directions)
    return acc_out, values.T


def two_point_estimate(fun: Callable, key, params, *, smoothing, num_directions: int,
                       sample: Sampler, scheme: str, chunk_size: int | None):
    """Returns ``(value, grads, finite)`` of the two-point estimator for ``fun(params)``.

    ``finite`` is a boolean scalar: every objective evaluation was finite.
    """
    _checks.check_float_params(params)
    fun = _checks.scalar_fun(fun)
    along = getattr(fun, "along", None)

    def along_lines(directions, signs):
        """(n, k) values f(x + sign_k λ u_i) from the line form: no perturbed parameters."""
        dtype = jnp.result_type(*jax.tree.leaves(params))
        steps = (jnp.asarray(signs, dtype) * smoothing).astype(dtype)
        return jax.vmap(lambda u: along(params, u, steps))(directions)

    def perturbed(sign, directions):
        def one(u):
            return fun(jax.tree.map(
                lambda x, v: x + jnp.asarray(sign * smoothing, x.dtype) * v, params, u))
        if chunk_size is not None and jax.tree.leaves(directions)[0].shape[0] == 1:
            # chunk_size=1: no unit batch axis, so the objective compiles as a plain forward pass
            # (activations updated in place). Unchunked, the unit axis is kept: under the vmap
            # over ± it gives linear models the faster X·[x+λu, x−λu] matmul layout.
            return one(jax.tree.map(lambda u: u[0], directions))[None]
        return jax.vmap(one)(directions)

    if scheme == "central":
        def estimate_chunk(directions, acc):
            if along is not None:
                values = along_lines(directions, [1, -1])
                values = values.astype(_accumulator_dtype(values.dtype))  # (n, 2)
                coeffs = (values[:, 0] - values[:, 1]) / (2 * smoothing)
                return _weighted_sum(coeffs, directions, acc), values
            if chunk_size is None:  # the ± pair of every direction in one vmapped batch
                values = jax.vmap(perturbed, (0, None))(jnp.array([1, -1]), directions)
                values = values.astype(_accumulator_dtype(values.dtype))  # (2, n)
                coeffs = (values[0] - values[1]) / (2 * smoothing)
                return _weighted_sum(coeffs, directions, acc), values.T
            return _central_in_sequence(perturbed, smoothing, directions, acc)

        grads, values = directional_estimate(estimate_chunk, sample, key, params, num_directions,
                                             chunk_size)
        value = jnp.mean(values)
    else:
        value = fun(params)
        base = value.astype(_accumulator_dtype(value.dtype))

        def estimate_chunk(directions, acc):
            values = (along_lines(directions, [1])[:, 0] if along is not None
                      else perturbed(1, directions)).astype(base.dtype)
            return _weighted_sum((values - base) / smoothing, directions, acc), values[:, None]

        grads, values = directional_estimate(estimate_chunk, sample, key, params, num_directions,
                                             chunk_size)
        value = base
        values = jnp.append(values, base)
    return value, grads, jnp.all(jnp.isfinite(values))


def zo_value_and_grad(fun: Callable, *, smoothing, num_directions: int = 1,
                      direction: str | Sampler = "gaussian", scheme: str = "central",
                      chunk_size: int | None = None):
    r"""Two-point zeroth-order value and gradient estimator.

    Args:
        fun: objective ``fun(params, *args, **kwargs) -> scalar``; only evaluated (through its
            line form ``fun.along`` when it has one, see :func:`bind`).
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
            bind(fun, *args, **kwargs), key, params, smoothing=smoothing,
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

    def estimate_chunk(directions, acc):
        value, slopes = jax.vmap(lambda u: jax.jvp(fun, (params,), (u,)))(directions)
        coeffs = slopes.astype(_accumulator_dtype(slopes.dtype))
        return _weighted_sum(coeffs, directions, acc), jnp.stack([value, slopes], 1)

    grads, values = directional_estimate(estimate_chunk, sample, key, params, num_directions,
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
