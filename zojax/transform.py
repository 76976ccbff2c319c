"""The one builder of zojax's optax transforms from an estimator step: the state, the key and the
non-finite policy (:func:`estimator_transform`)."""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax import _checks, compose
from zojax.objective import as_objective


class EstimatorState(NamedTuple):
    """State of :func:`estimator_transform` (so of :func:`two_point`, :func:`forward_gradient`).

    Built from the first three fields alone, the others take their defaults.
    """

    count: jax.Array  # int32 scalar: number of updates made.
    key: jax.Array  # typed PRNG key, split once per update.
    num_nonfinite: jax.Array  # int32 scalar: updates skipped for non-finite loss evaluations.
    # float32 scalar: the loss the last update computed, at the params it was given (free: the
    # estimator's own evaluations; the field optax.value_and_grad_from_state reads).
    value: jax.Array = np.zeros((), np.float32)
    perturbation_state: Any = ()  # the perturbation's state (``()`` when stateless).
    num_queries: jax.Array = np.zeros((), np.int32)  # int32 scalar: objective evaluations so far.

# The name of the state before every estimator shared it (kept: it is public).
TwoPointState = EstimatorState


def _as_key(seed) -> jax.Array:
    """A typed PRNG key from an int seed (possibly a traced array), a typed key or raw key data."""
    if isinstance(seed, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
            seed.dtype, jax.dtypes.prng_key):
        return seed
    seed = jnp.asarray(seed)
    if seed.shape == (2,) and seed.dtype == jnp.uint32:
        return jax.random.wrap_key_data(seed)
    if seed.shape != () or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise ValueError(f"seed must be an int or a PRNG key, got {seed!r}.")
    return jax.random.key(seed)


def _check_seed(seed) -> None:
    """Raises ValueError unless ``seed`` is one int seed or one PRNG key (from shapes and dtypes
    alone: under ``inject_hyperparams`` it is traced)."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return
    dtype, shape = getattr(seed, "dtype", None), getattr(seed, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        ok = shape == ()
    elif dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        ok = shape == () or (shape == (2,) and dtype == jnp.uint32)  # an int, raw key data
    else:
        ok = False
    if not ok:
        what = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else repr(seed)
        raise ValueError(
            f"seed must be one int or one PRNG key (e.g. jax.random.key(0)), got {what}. For "
            "one optimizer per key, vmap over the construction: jax.vmap(lambda key: "
            "zojax.zo_sgd(..., seed=key).init(params))(keys).")


def _where(pred, new, old):
    if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(
            jnp.where(pred, jax.random.key_data(new), jax.random.key_data(old)),
            impl=jax.random.key_impl(new))
    return jnp.where(pred, new, old)


def _kept(finite, path, new, old):
    """A perturbation-state leaf after a step: ``new`` when it was finite, else ``old``; step
    counters (integer scalars named ``count``) always move on, as ``TwoPointState.count``
    does, so a schedule on them (a refresh every k steps) is the same for every member."""
    name = getattr(path[-1], "name", None) if path else None
    if name == "count" and jnp.ndim(new) == 0 and jnp.issubdtype(new.dtype, jnp.integer):
        return new
    return _where(finite, new, old)


def estimator_transform(estimate: Callable, seed=0, *,
                        init_perturbation: Callable[[Any], Any] | None = None,
                        name: str = "estimator") -> optax.GradientTransformationExtraArgs:
    """An optax transform from one step of a zeroth-order estimator.

    The one place that handles the optax state and the non-finite policy: each update splits the
    state's key, calls ``estimate`` and, when an evaluation was not finite, returns a zero update,
    keeps the perturbation state (but its step counters, leaves named ``count``; or leaves all
    of it to an estimate whose ``Estimate.nonfinite_handled`` is True) and counts the step in
    ``num_nonfinite``.

    Args:
        estimate: ``estimate(key, value_fn, params, perturbation_state, **extra_args) ->
            zojax.pipeline.Estimate`` (``value_fn`` is an :class:`zojax.objective.Objective`
            that checks its outputs).
        seed: int seed or typed PRNG key.
        init_perturbation: ``init(params) -> perturbation_state`` (default: no state).
        name: the transform's name in error messages.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with a :class:`TwoPointState`, whose
        ``update(updates, state, params, *, value_fn, **extra_args)`` ignores ``updates``.

    Example:
        >>> import jax.numpy as jnp
        >>> from zojax.methods.two_point import two_point_estimate
        >>> def estimate(key, value_fn, params, state, **extra_args):
        ...     return two_point_estimate(value_fn, key, params, smoothing=0.01,
        ...                               num_directions=2, perturbation_state=state)
        >>> opt = estimator_transform(estimate, seed=0)
        >>> g, state = opt.update(None, opt.init(jnp.ones(2)), jnp.ones(2),
        ...                       value_fn=lambda p: jnp.sum(p ** 2))
        >>> int(state.num_queries)
        4
    """

    _check_seed(seed)

    def init_fn(params):
        _checks.check_float_params(params)
        perturbation_state = () if init_perturbation is None else init_perturbation(params)
        return EstimatorState(count=jnp.zeros([], jnp.int32), key=_as_key(seed),
                             num_nonfinite=jnp.zeros([], jnp.int32),
                             value=jnp.zeros([], jnp.float32),
                             perturbation_state=perturbation_state,
                             num_queries=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        compose.check_updates(updates, name)
        if value_fn is None:
            given = (f" It was given the keyword arguments {sorted(extra_args)}, which it "
                     "passes on and does not evaluate: is one of them the objective?"
                     if extra_args else "")
            raise ValueError(
                f"{name}.update needs the objective as the keyword argument value_fn: "
                f"opt.update(None, state, params, value_fn=lambda p: loss(p, batch)).{given}")
        if params is None:
            raise ValueError(f"{name}.update needs params: opt.update(None, state, params, "
                             "value_fn=...).")
        compose.check_masked_objective(params, value_fn, name)
        key, step_key = jax.random.split(state.key)
        out = estimate(step_key, as_objective(value_fn, "value_fn"), params,
                       state.perturbation_state, **extra_args)
        finite = out.finite
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), out.grads)
        perturbation_state = out.perturbation_state if out.nonfinite_handled else (
            jax.tree_util.tree_map_with_path(functools.partial(_kept, finite),
                                             out.perturbation_state, state.perturbation_state))
        return grads, TwoPointState(
            count=optax.safe_increment(state.count), key=key,
            num_nonfinite=state.num_nonfinite + jnp.logical_not(finite).astype(jnp.int32),
            value=jnp.asarray(out.value, jnp.float32), perturbation_state=perturbation_state,
            num_queries=state.num_queries + out.num_queries)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
