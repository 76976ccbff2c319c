r"""Curvature of an objective: Hessian traces, diagonals, :math:`\operatorname{tr}H^2` and spectrum.

Every function is called directly, ``fun`` first: ``hessian_trace(fun, params, *args)`` with
``fun(params, *args, **kwargs) -> scalar``; the random ones take a PRNG key after ``fun``,
``hutchinson_trace(fun, key, params, *args, ...)``, and raise a TypeError showing that signature
when the key is left out (:func:`zojax._checks.check_prng_key`). Hessian-vector
products are jvp-of-grad, :math:`H v = \partial_t \nabla f(x + t v)|_{t=0}`, so the
:math:`d\times d` Hessian is never formed.

- Exact, over the basis vectors (chunked): :func:`hessian_trace`, :func:`hessian_diagonal`,
  :func:`hessian_square_trace` with ``exact=True``.
- Monte Carlo with standard errors, through the estimators' loop and
  :func:`zojax.weightings.mean_and_sem`: :func:`hutchinson_trace`, :func:`hutchinson_diagonal`,
  :func:`hessian_square_trace`; zeroth-order: :func:`zo_trace`.
- Lanczos (:mod:`zojax.spectrum`, re-exported here): :func:`hessian_top_eigenvalue`, and
  stochastic Lanczos quadrature :func:`hessian_spectrum` with :func:`spectral_density`.

Example:
    >>> import jax.numpy as jnp
    >>> f = lambda p: jnp.sum(jnp.arange(3.0) * p ** 2)
    >>> float(hessian_trace(f, jnp.ones(3)))
    6.0
"""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from zojax import _checks, pipeline, weightings
from zojax.directions import as_perturbation
from zojax.objective import as_objective, bind

DEFAULT_CHUNK_SIZE = 256


def flat_objective(fun, params, args, kwargs):
    _checks.check_float_params(params)
    flat, unravel = ravel_pytree(params)
    fun = as_objective(fun)
    return (lambda x: fun.value(unravel(x), *args, **kwargs)), flat


def hessian_vector_product(fun):
    grad = jax.grad(fun)
    return lambda x, v: jax.jvp(grad, (x,), (v,))[1]


def _over_basis(f, x, chunk_size, read):
    r"""``[read(i, H e_i)]_i`` over the basis vectors :math:`e_i` of the flat ``x``, by
    jvp-of-grad, ``chunk_size`` at a time (vmapped inside ``jax.lax.map``; default 256)."""
    hvp = hessian_vector_product(f)
    dim = x.size

    def entry(i):
        return read(i, hvp(x, jax.nn.one_hot(i, dim, dtype=x.dtype)))

    size = min(chunk_size or DEFAULT_CHUNK_SIZE, dim)
    return jax.lax.map(entry, jnp.arange(dim), batch_size=size)


def _flat_diagonal(fun, params, args, kwargs, chunk_size):
    """The flat Hessian diagonal :math:`(e_i^\top H e_i)_i` and the unravel of ``params``."""
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    f, x = flat_objective(fun, params, args, kwargs)
    _, unravel = ravel_pytree(params)
    return _over_basis(f, x, chunk_size, lambda i, column: column[i]), unravel


def hessian_diagonal(fun, params, *args, chunk_size: int | None = None, **kwargs):
    r"""Exact Hessian diagonal :math:`(e_i^\top \nabla^2 f\, e_i)_i`, a pytree like ``params``.

    Every basis vector of the flattened pytree is pushed through one HVP, ``chunk_size`` at a
    time (default 256; memory ``O(chunk_size · d)``), as in :func:`hessian_trace`, which is the
    sum of this diagonal. The trace of each layer (leaf) is ``jax.tree.map(jnp.sum, diag)``.

    Args:
        fun: ``fun(params, *args, **kwargs) -> scalar``, twice differentiable.
        params: pytree of floating-point arrays.
        *args: passed to ``fun``.
        **kwargs: passed to ``fun``.
        chunk_size: number of basis vectors per batch.

    Returns:
        The diagonal, with the structure, shapes and dtypes of ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda p: jnp.sum(p["a"] ** 2) + p["a"][0] * p["b"] ** 3
        >>> diag = hessian_diagonal(f, {"a": jnp.ones(2), "b": jnp.array(1.0)})
        >>> diag["a"].tolist(), float(diag["b"])
        ([2.0, 2.0], 6.0)
        >>> {name: float(t) for name, t in jax.tree.map(jnp.sum, diag).items()}
        {'a': 4.0, 'b': 6.0}
    """
    flat, unravel = _flat_diagonal(fun, params, args, kwargs, chunk_size)
    return unravel(flat)


def hessian_trace(fun, params, *args, chunk_size: int | None = None, **kwargs):
    r"""Exact :math:`\operatorname{tr}\nabla^2 f = \sum_i e_i^\top H e_i` by jvp-of-grad.

    The sum of :func:`hessian_diagonal`: the basis vectors of the flattened pytree are pushed
    through ``chunk_size`` at a time (vmapped inside ``jax.lax.map``; default 256), so memory
    is ``O(chunk_size · d)``.

    Args:
        fun: ``fun(params, *args, **kwargs) -> scalar``, twice differentiable.
        params: pytree of floating-point arrays.
        *args: passed to ``fun``.
        **kwargs: passed to ``fun``.
        chunk_size: number of basis vectors per batch.

    Returns:
        The trace, a scalar.
    """
    flat, _ = _flat_diagonal(fun, params, args, kwargs, chunk_size)
    return jnp.sum(flat)


def _trace_samples(make_evaluate, samples, key, params, perturbation, num_samples, chunk_size,
                   per_coordinate=False):
    """Mean and SEM of ``samples(values)`` per probe, through the estimators' loop.

    ``make_evaluate(weighting) -> evaluate(acc, probes) -> (acc, values)``; probe ``k`` is
    ``fold_in(key, k)``; ``chunk_size`` probes at a time (None: one at a time). One scalar
    sample per probe, or with ``per_coordinate`` one pytree like ``params``.
    """
    weighting = weightings.mean_and_sem(samples, per_coordinate)
    acc, _ = pipeline.directional_loop(make_evaluate(weighting), weighting, key, params,
                                          perturbation, perturbation.init(params), 0,
                                          num_samples, chunk_size or 1)
    return weighting.finalize(acc)


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _hvp_samples(fun, key, params, args, kwargs, sample, *, num_samples, chunk_size, direction,
                 per_coordinate=False):
    r"""Mean and SEM of ``sample(v, H v)`` over probes :math:`v_k` (see :func:`hutchinson_trace`).

    ``sample`` returns a scalar, or with ``per_coordinate`` a pytree like ``params``.
    """
    _checks.check_positive_int("num_samples", num_samples)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    perturbation = as_perturbation(direction)
    _checks.check_float_params(params)
    f = as_objective(bind(fun, *args, **kwargs))
    hvp = hessian_vector_product(f.value)

    def make_evaluate(weighting):
        def evaluate(acc, probes):
            samples = jax.vmap(lambda v: sample(v, hvp(params, v)))(probes)
            num = jax.tree.leaves(probes)[0].shape[0]
            return weighting.add(acc, samples, probes), jnp.zeros((num, 0))  # none kept
        return evaluate

    return _trace_samples(make_evaluate, lambda samples: samples, key, params, perturbation,
                          num_samples, chunk_size, per_coordinate)


def hutchinson_trace(fun, key, params, *args, num_samples: int, chunk_size: int | None = None,
                     direction="rademacher", **kwargs):
    r"""Hutchinson's estimate :math:`\frac1n\sum_k v_k^\top H v_k` with its standard error.

    Probes come from a sampler with :math:`\mathbb{E}[v v^\top] = I` (Rademacher by default; any
    name or sampler of :mod:`zojax.directions`), probe ``k`` from ``fold_in(key, k)``;
    ``chunk_size`` probes are vmapped at a time (default one).

    Returns:
        ``(estimate, stderr)``.
    """
    _checks.check_prng_key(key, hutchinson_trace)
    return _hvp_samples(fun, key, params, args, kwargs, _tree_vdot, num_samples=num_samples,
                        chunk_size=chunk_size, direction=direction)


def hutchinson_diagonal(fun, key, params, *args, num_samples: int,
                        chunk_size: int | None = None, direction="rademacher", **kwargs):
    r"""Hutchinson's diagonal :math:`\frac1n\sum_k v_k \odot H v_k`, with its standard error.

    Unbiased for :math:`\operatorname{diag}\nabla^2 f` when :math:`\mathbb{E}[v v^\top] = I`;
    Rademacher probes (the default) have the least variance, :math:`\sum_{j\ne i} H_{ij}^2`
    for coordinate :math:`i`. Probe ``k`` comes from ``fold_in(key, k)`` as in
    :func:`hutchinson_trace` (the same key gives probes whose trace estimate is the sum of
    this one); ``chunk_size`` probes are vmapped at a time (default one). The exact diagonal
    is :func:`hessian_diagonal`.

    Args:
        fun: ``fun(params, *args, **kwargs) -> scalar``, twice differentiable.
        key: typed PRNG key.
        params: pytree of floating-point arrays.
        *args: passed to ``fun``.
        **kwargs: passed to ``fun``.
        num_samples: number of probes (static).
        chunk_size: probes per vmapped batch (static).
        direction: a name, sampler or perturbation of :mod:`zojax.directions`.

    Returns:
        ``(estimate, stderr)``, each with the structure, shapes and dtypes of ``params``
        (stderr coordinate by coordinate; NaN for one sample).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * p ** 2)  # H diagonal
        >>> estimate, stderr = hutchinson_diagonal(f, jax.random.key(0), jnp.ones(3),
        ...                                        num_samples=8)
        >>> estimate.tolist(), stderr.tolist()
        ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    """
    _checks.check_prng_key(key, hutchinson_diagonal)
    estimate, stderr = _hvp_samples(fun, key, params, args, kwargs,
                                    lambda v, hv: jax.tree.map(jnp.multiply, v, hv),
                                    num_samples=num_samples, chunk_size=chunk_size,
                                    direction=direction, per_coordinate=True)
    like = lambda tree: jax.tree.map(lambda t, p: t.astype(p.dtype), tree, params)
    return like(estimate), like(stderr)


def hessian_square_trace(fun, key, params, *args, num_samples: int, exact: bool = False,
                         chunk_size: int | None = None, direction="rademacher", **kwargs):
    r""":math:`\operatorname{tr} H^2 = \|H\|_F^2 = \mathbb{E}\,\|H v\|^2`, with its standard error.

    Monte Carlo: the mean of :math:`\|H v_k\|^2` over probes with
    :math:`\mathbb{E}[v v^\top] = I` (Rademacher by default), probe ``k`` from
    ``fold_in(key, k)``, ``chunk_size`` vmapped at a time (default one). With ``exact=True``:
    :math:`\sum_i \|H e_i\|^2` over the basis, chunked as :func:`hessian_trace` (default 256),
    and stderr 0 (``key`` and ``num_samples`` unused). With :func:`hessian_trace`,
    :math:`\operatorname{tr}H^2 / \operatorname{tr}H` is a scale of the curvature that large
    eigenvalues dominate.

    Args:
        fun: ``fun(params, *args, **kwargs) -> scalar``, twice differentiable.
        key: typed PRNG key.
        params: pytree of floating-point arrays.
        *args: passed to ``fun``.
        **kwargs: passed to ``fun``.
        num_samples: number of probes (static).
        exact: sum over the basis instead (static).
        chunk_size: probes (or basis vectors, when exact) per vmapped batch (static).
        direction: a name, sampler or perturbation of :mod:`zojax.directions`.

    Returns:
        ``(estimate, stderr)``, scalars.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * p ** 2)  # eigenvalues 1, 2, 3
        >>> [float(x) for x in hessian_square_trace(f, None, jnp.ones(3), num_samples=1,
        ...                                         exact=True)]
        [14.0, 0.0]
        >>> [float(x) for x in hessian_square_trace(f, jax.random.key(0), jnp.ones(3),
        ...                                         num_samples=4)]  # Rademacher: exact here
        [14.0, 0.0]
    """
    _checks.check_prng_key(key, hessian_square_trace, allow_none=exact)
    _checks.check_positive_int("num_samples", num_samples)
    if exact:
        _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
        f, x = flat_objective(fun, params, args, kwargs)
        estimate = jnp.sum(_over_basis(f, x, chunk_size, lambda i, column: jnp.vdot(column,
                                                                                   column)))
        estimate = estimate.astype(weightings.accumulator_dtype(estimate.dtype))
        return estimate, jnp.zeros_like(estimate)
    return _hvp_samples(fun, key, params, args, kwargs, lambda v, hv: _tree_vdot(hv, hv),
                        num_samples=num_samples, chunk_size=chunk_size, direction=direction)


def zo_trace(fun, key, params, *args, delta, num_samples: int, chunk_size: int | None = None,
             direction="gaussian", **kwargs):
    r"""Zeroth-order "expected sharpness" :math:`2(\overline{f(x+\delta z)} - f(x))/\delta^2`.

    Averages over antithetic pairs :math:`\pm z_k` (Gaussian by default; any name, sampler or
    perturbation of :mod:`zojax.directions`), so each sample
    :math:`(f(x+\delta z_k) + f(x-\delta z_k) - 2f(x))/\delta^2` is exactly :math:`z_k^\top H z_k`
    on quadratics (bias :math:`O(\delta^2)` otherwise) and the gradient term cancels. Needs only
    ``2 · num_samples + 1`` evaluations (through the objective's line form when it has one, see
    :func:`zojax.objective.bind`): for models whose HVPs are too costly. ``chunk_size`` probes
    are evaluated at a time (default one). Mind the precision: use float64 or a ``delta`` large
    enough that ``f`` differences are resolved.

    Returns:
        ``(estimate, stderr)``.
    """
    _checks.check_prng_key(key, zo_trace)
    _checks.check_positive_finite("delta", delta)
    _checks.check_positive_int("num_samples", num_samples)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    perturbation = as_perturbation(direction)
    _checks.check_float_params(params)
    f = as_objective(bind(fun, *args, **kwargs))
    base = f.value(params)
    base = base.astype(weightings.accumulator_dtype(base.dtype))
    steps = pipeline.scheme_steps("central", delta, params)

    def second_differences(values):
        return (values[:, 0] + values[:, 1] - 2 * base) / delta**2

    def make_evaluate(weighting):
        return pipeline.perturbed_evaluation(f, params, steps, weighting, chunked=True)

    return _trace_samples(make_evaluate, second_differences, key, params, perturbation,
                          num_samples, chunk_size)


def __getattr__(name):
    """The Lanczos functions live in :mod:`zojax.spectrum` (which builds on this module)."""
    if name in ("hessian_spectrum", "hessian_top_eigenvalue", "spectral_density"):
        from zojax import spectrum

        return getattr(spectrum, name)
    raise AttributeError(f"module 'zojax.curvature' has no attribute {name!r}")

__all__ = [
    "flat_objective", "hessian_diagonal", "hessian_square_trace", "hessian_trace",
    "hessian_vector_product", "hutchinson_diagonal", "hutchinson_trace", "zo_trace",
]
