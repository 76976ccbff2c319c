r"""Two-point estimates (MeZO, ZO-SGD), central and forward, and their λ → 0 limit, the forward
gradient."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks, pipeline, weightings
from zojax import low_memory as _low_memory
from zojax.directions import Perturbation, Sampler, as_perturbation
from zojax.objective import as_objective, bind
from zojax.transform import estimator_transform


def two_point_estimate(fun: Callable, key, params, *, smoothing, num_directions: int,
                       direction: str | Sampler | Perturbation = "gaussian",
                       scheme: str = "central", chunk_size: int | None = None,
                       weighting: weightings.Weighting | None = None,
                       perturbation_state=None,
                       directions_sharding: NamedSharding | None = None,
                       low_memory: bool = False, stream: str = "jax",
                       **extra_args) -> pipeline.Estimate:
    """One step of the two-point estimator: the :class:`Estimate` for ``fun(params)``.

    The perturbation's ``update`` receives the step's key, params, values and ``extra_args``.
    ``low_memory``: see :mod:`zojax.low_memory` (no ``weighting``, ``perturbation_state``);
    ``stream``: see :mod:`zojax.directions`.
    """
    perturbation = as_perturbation(direction, stream)
    if low_memory:
        if weighting is not None:
            raise ValueError("two_point_estimate: low_memory=True weights the directions by "
                             "the scheme's finite differences; it takes no weighting.")
        _checks.check_float_params(params)
        return _low_memory.estimate(as_objective(fun), key, params, smoothing=smoothing,
                                    num_directions=num_directions, perturbation=perturbation,
                                    scheme=scheme)
    state = pipeline.state_or_init(perturbation, params, perturbation_state, "two_point_estimate")
    partial = pipeline.partial_estimate(fun, key, params, smoothing=smoothing,
                               num_directions=num_directions, direction=perturbation,
                               scheme=scheme, chunk_size=chunk_size, weighting=weighting,
                               perturbation_state=state,
                               directions_sharding=directions_sharding)
    value, grads, finite = pipeline.finalize(partial, params, weighting)
    state = perturbation.update(state, key, params, partial.values, **extra_args)
    return pipeline.Estimate(value, grads, finite, partial.num_queries, state)


def _validate(smoothing, num_directions, direction, scheme, chunk_size,
              directions_sharding=None, low_memory=False, name="two_point", stream="jax"):
    pipeline.validate(smoothing, num_directions, chunk_size=chunk_size,
                      directions_sharding=directions_sharding)
    perturbation = as_perturbation(direction, stream)
    _checks.check_choice("scheme", scheme, pipeline.SCHEMES)
    if not isinstance(low_memory, bool):
        raise ValueError(
            f"low_memory must be True or False, got {low_memory!r} (a static option: under "
            "optax.inject_hyperparams, name it in static_args).")
    if low_memory:
        _low_memory.check(perturbation, name)
        if directions_sharding is not None:
            raise ValueError(f"{name}(low_memory=True) evaluates the directions one after the "
                             "other on one device; it takes no directions_sharding.")
        if chunk_size not in (None, 1):
            raise ValueError(f"chunk_size: {name}(low_memory=True) evaluates one direction at "
                             f"a time; chunk_size must be None or 1, got {chunk_size!r}.")


def zo_value_and_grad(fun: Callable, *, smoothing, num_directions: int = 1,
                      direction: str | Sampler | Perturbation = "gaussian",
                      scheme: str = "central", chunk_size: int | None = None,
                      directions_sharding: NamedSharding | None = None,
                      low_memory: bool = False, stream: str = "jax"):
    r"""Two-point zeroth-order value and gradient estimator.

    Args:
        fun: objective ``fun(params, *args, **kwargs) -> scalar``, or an :class:`Objective`;
            only evaluated (through its line form when it has one, see :func:`bind`).
        smoothing: perturbation size :math:`\lambda > 0` (numeric, may be traced).
        num_directions: number ``q`` of directions averaged (static).
        direction: ``"gaussian"``, ``"sphere"``, ``"rademacher"``, ``"coordinate"``, a sampler
            ``sample(key, params)`` or a :class:`zojax.directions.Perturbation` (static); see
            :mod:`zojax.directions`. A stateful perturbation's state is passed to the returned
            function as ``perturbation_state=``.
        scheme: ``"central"`` (2q evaluations) or ``"forward"`` (q + 1 evaluations, one shared
            ``f(x)``).
        chunk_size: evaluate this many directions at a time in a ``lax.scan`` (static); ``None``
            evaluates all of them in one vmapped batch.
        directions_sharding: ``NamedSharding(mesh, P("directions"))`` splits the directions
            over that mesh axis, ``num_directions / n`` per device (each chunked by
            ``chunk_size``); None: one device. See the module doc.
        low_memory: regenerate every direction where it is used instead of storing it
            (:mod:`zojax.low_memory`); the same estimate. Needs a stateless direction.
        stream: ``"jax"`` (``jax.random``'s numbers, bit for bit) or ``"fast"`` (cheaper
            numbers for ``"gaussian"`` and ``"rademacher"``; see :mod:`zojax.directions`)
            (static).

    Returns:
        ``value_and_grad_fn(key, params, *args, perturbation_state=None, **kwargs) -> (value,
        grads)``; ``value`` is ``f(params)`` for the forward scheme and the mean of the
        ``f(x ± λu)`` for the central one; ``grads`` has the structure, shapes and dtypes of
        ``params``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> vg = zo_value_and_grad(lambda p: jnp.sum(p ** 2), smoothing=1e-3, num_directions=8)
        >>> value, g = vg(jax.random.key(0), jnp.ones(3))
        >>> g.shape
        (3,)
    """
    _validate(smoothing, num_directions, direction, scheme, chunk_size, directions_sharding,
              low_memory, "zo_value_and_grad", stream)
    perturbation = as_perturbation(direction, stream)

    def value_and_grad_fn(key, params, *args, perturbation_state=None, **kwargs):
        if low_memory:
            out = two_point_estimate(bind(fun, *args, **kwargs), key, params,
                                     smoothing=smoothing, num_directions=num_directions,
                                     direction=perturbation, scheme=scheme, low_memory=True)
            return out.value, out.grads
        state = pipeline.state_or_init(perturbation, params, perturbation_state,
                                       "zo_value_and_grad")
        partial = pipeline.partial_estimate(
            bind(fun, *args, **kwargs), key, params, smoothing=smoothing,
            num_directions=num_directions, direction=perturbation, scheme=scheme,
            chunk_size=chunk_size, perturbation_state=state,
            directions_sharding=directions_sharding)
        value, grads, _ = pipeline.finalize(partial, params)
        return value, grads

    return value_and_grad_fn


def zo_grad(fun: Callable, *, smoothing, num_directions: int = 1,
            direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
            chunk_size: int | None = None, directions_sharding: NamedSharding | None = None,
            low_memory: bool = False, stream: str = "jax"):
    r"""Two-point zeroth-order gradient estimator, :math:`\hat g \approx \nabla f_\lambda(x)`.

    Same arguments as :func:`zo_value_and_grad`; returns ``grad_fn(key, params, *args,
    perturbation_state=None, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> grad_fn = zo_grad(lambda p, a: jnp.sum(a * p ** 2), smoothing=0.1, num_directions=4)
        >>> grad_fn(jax.random.key(0), jnp.ones(3), 2.0).shape
        (3,)
    """
    value_and_grad_fn = zo_value_and_grad(
        fun, smoothing=smoothing, num_directions=num_directions, direction=direction,
        scheme=scheme, chunk_size=chunk_size, directions_sharding=directions_sharding,
        low_memory=low_memory, stream=stream)

    def grad_fn(key, params, *args, **kwargs):
        return value_and_grad_fn(key, params, *args, **kwargs)[1]

    return grad_fn


def forward_grad_estimate(fun: Callable, key, params, *, num_directions: int,
                          direction: str | Sampler | Perturbation = "gaussian",
                          chunk_size: int | None = None, perturbation_state=None,
                          stream: str = "jax", **extra_args) -> pipeline.Estimate:
    """One step of the forward gradient ``mean_i (u_iᵀ∇f) u_i`` (one jvp per direction)."""
    _checks.check_float_params(params)
    objective = as_objective(fun)
    perturbation = as_perturbation(direction, stream)
    state = pipeline.state_or_init(perturbation, params, perturbation_state, "forward_grad")
    weighting = weightings.mean(lambda values: values[:, 1])

    def evaluate(acc, directions):
        value, slopes = jax.vmap(lambda u: jax.jvp(objective.value, (params,), (u,)))(directions)
        values = jnp.stack([value, slopes], 1)
        values = values.astype(weightings.accumulator_dtype(values.dtype))
        return weighting.add(acc, values, directions), values

    acc, values = pipeline.directional_loop(evaluate, weighting, key, params, perturbation,
                                            state, 0, num_directions, chunk_size)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), weighting.finalize(acc), params)
    state = perturbation.update(state, key, params, values, **extra_args)
    return pipeline.Estimate(values[0, 0], grads, jnp.all(jnp.isfinite(values)),
                    jnp.asarray(num_directions, jnp.int32), state)


def forward_grad(fun: Callable, *, num_directions: int = 1,
                 direction: str | Sampler | Perturbation = "gaussian", stream: str = "jax"):
    r"""The λ → 0 limit of the two-point estimator: :math:`\frac1q\sum_i (u_i^\top\nabla f)\,u_i`.

    The "forward gradient" of ZO-Bench, computed with ``jax.jvp``: unlike :func:`zo_grad` it
    *does* differentiate ``fun`` (one jvp per direction); ``stream`` as :func:`zo_grad`. Returns
    ``grad_fn(key, params, *args, perturbation_state=None, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> grad_fn = forward_grad(lambda p: jnp.sum(p ** 2), num_directions=2)
        >>> grad_fn(jax.random.key(0), jnp.ones(3)).shape
        (3,)
    """
    _checks.check_positive_int("num_directions", num_directions)
    perturbation = as_perturbation(direction, stream)

    def grad_fn(key, params, *args, perturbation_state=None, **kwargs):
        return forward_grad_estimate(bind(fun, *args, **kwargs), key, params,
                                     num_directions=num_directions, direction=perturbation,
                                     perturbation_state=perturbation_state).grads

    return grad_fn


def two_point(smoothing, num_directions: int = 1, *,
              direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
              chunk_size: int | None = None, seed=0,
              directions_sharding: NamedSharding | None = None, low_memory: bool = False,
              stream: str = "jax") -> optax.GradientTransformationExtraArgs:
    r"""Two-point zeroth-order gradient estimate as an optax transformation.

    .. math:: \hat g = \frac1q\sum_{i=1}^q \frac{f(x+\lambda u_i)-f(x-\lambda u_i)}{2\lambda}\,u_i

    (central; forward uses :math:`(f(x+\lambda u_i)-f(x))/\lambda`). With Gaussian directions
    :math:`\mathbb{E}\hat g = \nabla f_\lambda`, :math:`f_\lambda = f + \frac{\lambda^2}{2}
    \operatorname{tr}\nabla^2 f + o(\lambda^2)`: ZO descent is biased toward flat minima.

    Args:
        smoothing: :math:`\lambda > 0`; numeric, may be injected/vmapped.
        num_directions: ``q`` (static).
        direction: a name in :mod:`zojax.directions` or a sampler ``sample(key, params)`` (static).
        scheme: ``"central"`` or ``"forward"`` (static).
        chunk_size: directions evaluated at a time (static); see :func:`zojax.zo_grad`.
        seed: int seed or typed PRNG key of the directions.
        directions_sharding: ``NamedSharding(mesh, P("directions"))`` splits the directions over
            that mesh axis (see :mod:`zojax.pipeline`); None: one device.
        low_memory: regenerate every direction where it is used (MeZO; see
            :mod:`zojax.low_memory`): the same estimate, and in a jitted step with donated
            params about one parameter size above the forward pass, or less with a per-layer
            objective (:func:`zojax.layerwise`). Needs a stateless direction; no
            ``directions_sharding``.
        stream: ``"jax"`` (the default: ``jax.random``'s numbers, bit for bit) or ``"fast"``
            (cheaper numbers for ``"gaussian"`` and ``"rademacher"``, see
            :mod:`zojax.directions`) (static).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
        value_fn)`` ignores ``updates`` and returns the estimate of ``∇ value_fn(params)``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.chain(two_point(0.01, num_directions=4), optax.sgd(0.1))
        >>> params = jnp.ones(3)
        >>> state = opt.init(params)
        >>> updates, state = opt.update(None, state, params, value_fn=lambda p: jnp.sum(p ** 2))
        >>> params = optax.apply_updates(params, updates)
    """
    _validate(smoothing, num_directions, direction, scheme, chunk_size, directions_sharding,
              low_memory, stream=stream)
    perturbation = as_perturbation(direction, stream)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return two_point_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, scheme=scheme, chunk_size=chunk_size,
            perturbation_state=perturbation_state, directions_sharding=directions_sharding,
            low_memory=low_memory, **extra_args)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="two_point")


def forward_gradient(num_directions: int = 1, *,
                     direction: str | Sampler | Perturbation = "gaussian", seed=0,
                     chunk_size: int | None = None, stream: str = "jax"
                     ) -> optax.GradientTransformationExtraArgs:
    r"""The λ → 0 limit of :func:`two_point`: :math:`\frac1q\sum_i (u_i^\top\nabla f)\,u_i` by jvp.

    Differentiates ``value_fn`` (forward mode, one jvp per direction); a reference for what
    :func:`two_point` does without its smoothing bias. Same state and ``update`` as
    :func:`two_point`; ``stream`` as there.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = forward_gradient(num_directions=2)
        >>> state = opt.init(jnp.ones(3))
        >>> g, state = opt.update(None, state, jnp.ones(3), value_fn=lambda p: jnp.sum(p ** 2))
    """
    _checks.check_positive_int("num_directions", num_directions)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    perturbation = as_perturbation(direction, stream)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return forward_grad_estimate(
            value_fn, key, params, num_directions=num_directions, direction=perturbation,
            chunk_size=chunk_size, perturbation_state=perturbation_state, **extra_args)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="forward_gradient")
