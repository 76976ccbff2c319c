r"""Curvature of an objective: exact and stochastic Hessian traces, top eigenvalue.

Every function is called directly, ``fun`` first: ``hessian_trace(fun, params, *args)`` with
``fun(params, *args, **kwargs) -> scalar``. Hessian-vector products are jvp-of-grad,
:math:`H v = \partial_t \nabla f(x + t v)|_{t=0}`, so the :math:`d\times d` Hessian is never formed.

Example:
    >>> import jax.numpy as jnp
    >>> f = lambda p: jnp.sum(jnp.arange(3.0) * p ** 2)
    >>> float(hessian_trace(f, jnp.ones(3)))
    6.0
"""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from zojax import _backend, _checks, estimators, weightings
from zojax.directions import as_perturbation

DEFAULT_CHUNK_SIZE = 256


def _flat_objective(fun, params, args, kwargs):
    _checks.check_float_params(params)
    flat, unravel = ravel_pytree(params)
    fun = estimators.as_objective(fun)
    return (lambda x: fun.value(unravel(x), *args, **kwargs)), flat


def _hvp(fun):
    grad = jax.grad(fun)
    return lambda x, v: jax.jvp(grad, (x,), (v,))[1]


def hessian_trace(fun, params, *args, chunk_size: int | None = None, **kwargs):
    r"""Exact :math:`\operatorname{tr}\nabla^2 f = \sum_i e_i^\top H e_i` by jvp-of-grad.

    The basis vectors of the flattened pytree are pushed through ``chunk_size`` at a time
    (vmapped inside ``jax.lax.map``; default 256), so memory is ``O(chunk_size · d)``.

    Args:
        fun: ``fun(params, *args, **kwargs) -> scalar``, twice differentiable.
        params: pytree of floating-point arrays.
        *args, **kwargs: passed to ``fun``.
        chunk_size: number of basis vectors per batch.

    Returns:
        The trace, a scalar.
    """
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    f, x = _flat_objective(fun, params, args, kwargs)
    hvp = _hvp(f)
    dim = x.size

    def diagonal_entry(i):
        return hvp(x, jax.nn.one_hot(i, dim, dtype=x.dtype))[i]

    size = min(chunk_size or DEFAULT_CHUNK_SIZE, dim)
    return jnp.sum(jax.lax.map(diagonal_entry, jnp.arange(dim), batch_size=size))


def _trace_samples(make_evaluate, samples, key, params, perturbation, num_samples, chunk_size):
    """Mean and SEM of one scalar ``samples(values)`` per probe, through the estimators' loop.

    ``make_evaluate(weighting) -> evaluate(acc, probes) -> (acc, values)``; probe ``k`` is
    ``fold_in(key, k)``; ``chunk_size`` probes at a time (None: one at a time).
    """
    weighting = weightings.mean_and_sem(samples)
    acc, _ = estimators._directional_loop(make_evaluate(weighting), weighting, key, params,
                                          perturbation, perturbation.init(params), 0,
                                          num_samples, chunk_size or 1)
    return weighting.finalize(acc)


def hutchinson_trace(fun, key, params, *args, num_samples: int, chunk_size: int | None = None,
                     direction="rademacher", **kwargs):
    r"""Hutchinson's estimate :math:`\frac1n\sum_k v_k^\top H v_k` with its standard error.

    Probes come from a sampler with :math:`\mathbb{E}[v v^\top] = I` (Rademacher by default; any
    name or sampler of :mod:`zojax.directions`), probe ``k`` from ``fold_in(key, k)``;
    ``chunk_size`` probes are vmapped at a time (default one).

    Returns:
        ``(estimate, stderr)``.
    """
    _checks.check_positive_int("num_samples", num_samples)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    perturbation = as_perturbation(direction)
    _checks.check_float_params(params)
    f = estimators.as_objective(estimators.bind(fun, *args, **kwargs))
    hvp = _hvp(f.value)

    def quadratic_form(v):
        hv = hvp(params, v)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv)))

    def make_evaluate(weighting):
        def evaluate(acc, probes):
            values = jax.vmap(quadratic_form)(probes)[:, None]  # (n, 1): vᵀHv
            return weighting.add(acc, values, probes), values
        return evaluate

    return _trace_samples(make_evaluate, lambda values: values[:, 0], key, params, perturbation,
                          num_samples, chunk_size)


def zo_trace(fun, key, params, *args, delta, num_samples: int, chunk_size: int | None = None,
             direction="gaussian", **kwargs):
    r"""Zeroth-order "expected sharpness" :math:`2(\overline{f(x+\delta z)} - f(x))/\delta^2`.

    Averages over antithetic pairs :math:`\pm z_k` (Gaussian by default; any name, sampler or
    perturbation of :mod:`zojax.directions`), so each sample
    :math:`(f(x+\delta z_k) + f(x-\delta z_k) - 2f(x))/\delta^2` is exactly :math:`z_k^\top H z_k`
    on quadratics (bias :math:`O(\delta^2)` otherwise) and the gradient term cancels. Needs only
    ``2 · num_samples + 1`` evaluations (through the objective's line form when it has one, see
    :func:`zojax.estimators.bind`): for models whose HVPs are too costly. ``chunk_size`` probes
    are evaluated at a time (default one). Mind the precision: use float64 or a ``delta`` large
    enough that ``f`` differences are resolved.

    Returns:
        ``(estimate, stderr)``.
    """
    _checks.check_positive_finite("delta", delta)
    _checks.check_positive_int("num_samples", num_samples)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    perturbation = as_perturbation(direction)
    _checks.check_float_params(params)
    f = estimators.as_objective(estimators.bind(fun, *args, **kwargs))
    base = f.value(params)
    base = base.astype(_backend.accumulator_dtype(base.dtype))
    steps = estimators._steps("central", delta, params)

    def second_differences(values):
        return (values[:, 0] + values[:, 1] - 2 * base) / delta**2

    def make_evaluate(weighting):
        return estimators._perturbed_evaluation(f, params, steps, weighting, chunked=True)

    return _trace_samples(make_evaluate, second_differences, key, params, perturbation,
                          num_samples, chunk_size)


def hessian_top_eigenvalue(fun, key, params, *args, num_iters: int = 100, **kwargs):
    r"""Largest algebraic eigenvalue of :math:`\nabla^2 f` by Lanczos on HVPs.

    ``min(num_iters, d)`` Lanczos steps with full reorthogonalization from a random start
    (``key``); an exhausted Krylov space restarts from a fresh orthogonal vector, so the Ritz
    values stay eigenvalues of the Hessian. Returns the largest Ritz value.
    """
    _checks.check_positive_int("num_iters", num_iters)
    f, x = _flat_objective(fun, params, args, kwargs)
    hvp = _hvp(f)
    dim = x.size
    steps = min(num_iters, dim)
    tiny = jnp.sqrt(jnp.finfo(x.dtype).eps)

    def orthogonalize(w, basis):
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(carry, j):
        basis, v, v_prev, beta_prev = carry
        w = hvp(x, v)
        scale = jnp.linalg.norm(w)
        alpha = jnp.vdot(w, v)
        w = orthogonalize(w - alpha * v - beta_prev * v_prev, basis)
        beta = jnp.linalg.norm(w)
        broke = beta <= tiny * jnp.maximum(scale, tiny)
        fresh = orthogonalize(jax.random.normal(jax.random.fold_in(key, j + 1), (dim,), x.dtype),
                              basis)
        w = jnp.where(broke, fresh, w)
        beta = jnp.where(broke, 0.0, beta)
        v_next = w / jnp.linalg.norm(w)
        basis = basis.at[j + 1].set(v_next, mode="drop")
        return (basis, v_next, v, beta), (alpha, beta)

    v0 = jax.random.normal(key, (dim,), x.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((steps, dim), x.dtype).at[0].set(v0)
    _, (alphas, betas) = jax.lax.scan(step, (basis, v0, jnp.zeros_like(v0), jnp.zeros((), x.dtype)),
                                      jnp.arange(steps))
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return jnp.max(jnp.linalg.eigvalsh(tridiagonal))
