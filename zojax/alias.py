"""Optimizers: an estimator and the optax transforms that take the step, in a :func:`chain` that
leaves them untouched on a skipped step (optax's ``alias.py`` beside its ``transform.py``)."""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks
from zojax.directions import Perturbation, Sampler
from zojax.methods.tilted import tilted
from zojax.methods.two_point import two_point
from zojax.transform import EstimatorState, _where


def _estimator_states(state) -> list:
    return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, EstimatorState))
            if isinstance(s, EstimatorState)]


def chain(estimator: optax.GradientTransformation, *transforms: optax.GradientTransformation
          ) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(estimator, *transforms)``, except that a step the estimator skipped
    changes nothing after it.

    A zojax estimator returns a zero update on a step whose loss was not finite and counts it
    in ``num_nonfinite``; in a plain ``optax.chain`` the transforms after it would still move
    (Adam's momentum, weight decay, a schedule's count). Here, on such a step, the update is
    zero and the state of ``transforms`` is kept as it was: the params and the optimizer are
    untouched, and only the estimator's own state records the step (its ``count``, ``key``,
    ``num_nonfinite`` and ``num_queries`` move on; its perturbation state is kept but for its
    step counters). The aliases (:func:`zo_sgd`, :func:`zo_adam`, :func:`zo_sign_sgd`,
    :func:`zest`) are such chains.

    The transforms after the estimator also receive the step's loss as the extra argument
    ``value`` (the estimator's ``state.value``; a ``value`` given to ``update`` wins), so
    ``optax.contrib.reduce_on_plateau`` placed after the estimator sees the loss of every step.

    The state is ``optax.chain``'s: a tuple whose first entry is the estimator's state (a
    :class:`EstimatorState`, possibly inside a wrapper's state), then one state per transform.

    Args:
        estimator: a zojax transform, alone or inside optax wrappers (``inject_hyperparams``,
            ``masked``, ``multi_transform``): its state must hold a :class:`EstimatorState`.
        *transforms: the optax transforms that turn the estimate into an update.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = chain(two_point(1e-3, 4), optax.adam(0.1))
        >>> params = jnp.ones(2)
        >>> state = opt.init(params)
        >>> nan_loss = lambda p: jnp.sum(p ** 2) * jnp.nan
        >>> updates, new_state = opt.update(None, state, params, value_fn=nan_loss)
        >>> updates.tolist(), int(new_state[0].num_nonfinite), int(new_state[1][0].count)
        ([0.0, 0.0], 1, 0)
    """
    stages = tuple(optax.with_extra_args_support(t) for t in (estimator, *transforms))

    def init_fn(params):
        state = tuple(t.init(params) for t in stages)
        if not _estimator_states(state[0]):
            raise ValueError(
                "zojax.chain's first transform must be a zojax estimator (e.g. "
                "zojax.two_point(...)), alone or inside optax wrappers; its state holds no "
                "zojax.EstimatorState. For first-order chains use optax.chain.")
        return state

    def update_fn(updates, state, params=None, **extra_args):
        updates, first = stages[0].update(updates, state[0], params, **extra_args)
        pairs = list(zip(_estimator_states(state[0]), _estimator_states(first)))
        skipped = functools.reduce(jnp.logical_or, [new.num_nonfinite != old.num_nonfinite
                                                    for old, new in pairs])
        extra_args = {"value": pairs[0][1].value, **extra_args}
        rest = []
        for stage, old in zip(stages[1:], state[1:]):
            updates, new = stage.update(updates, old, params, **extra_args)
            rest.append(jax.tree.map(functools.partial(_where, skipped), old, new))
        updates = jax.tree.map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u), updates)
        return updates, (first, *rest)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_learning_rate(learning_rate) -> None:
    if not callable(learning_rate):  # schedules are checked by optax
        _checks.check_positive_finite("learning_rate", learning_rate)


def zo_sgd(learning_rate, smoothing, num_directions: int = 1, *,
           direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
           chunk_size: int | None = None, seed=0,
           directions_sharding: NamedSharding | None = None, low_memory: bool = False,
           stream: str = "jax") -> optax.GradientTransformationExtraArgs:
    """ZO-SGD: ``zojax.chain(two_point(smoothing, num_directions, ...), sgd(learning_rate))``.

    The keyword arguments are those of :func:`two_point` (explicit, so that
    ``optax.inject_hyperparams(zo_sgd, static_args=("num_directions",))`` works).

    Example:
        >>> import jax.numpy as jnp
        >>> opt = zo_sgd(learning_rate=0.1, smoothing=0.01)
        >>> state = opt.init(jnp.ones(2))
    """
    _check_learning_rate(learning_rate)
    return chain(
        two_point(smoothing, num_directions, direction=direction, scheme=scheme,
                  chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding,
                  low_memory=low_memory, stream=stream),
        optax.sgd(learning_rate))


def zo_adam(learning_rate, smoothing, num_directions: int = 1, *, b1=0.9, b2=0.999, eps=1e-8,
            direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
            chunk_size: int | None = None, seed=0,
            directions_sharding: NamedSharding | None = None, low_memory: bool = False,
            stream: str = "jax") -> optax.GradientTransformationExtraArgs:
    """ZO-Adam: ``zojax.chain(two_point(...), adam(learning_rate, b1, b2, eps))``: a skipped
    (non-finite) step leaves Adam's moments and count as they were (see :func:`chain`)."""
    _check_learning_rate(learning_rate)
    return chain(
        two_point(smoothing, num_directions, direction=direction, scheme=scheme,
                  chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding,
                  low_memory=low_memory, stream=stream),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def zo_sign_sgd(learning_rate, smoothing, num_directions: int = 1, *,
                direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
                chunk_size: int | None = None, seed=0,
                directions_sharding: NamedSharding | None = None, low_memory: bool = False,
                stream: str = "jax") -> optax.GradientTransformationExtraArgs:
    """ZO-signSGD: steps of ``-learning_rate · sign(ĝ)``."""
    _check_learning_rate(learning_rate)
    return chain(
        two_point(smoothing, num_directions, direction=direction, scheme=scheme,
                  chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding,
                  low_memory=low_memory, stream=stream),
        optax.scale_by_sign(), optax.scale_by_learning_rate(learning_rate))


def zest(learning_rate, smoothing, tilt, num_directions: int, *, direction: str = "gaussian",
         antithetic: bool = True, chunk_size: int | None = None, seed=0,
         directions_sharding: NamedSharding | None = None
         ) -> optax.GradientTransformationExtraArgs:
    """ZEST: ``zojax.chain(tilted(smoothing, tilt, num_directions, ...), sgd(learning_rate))``.

    The keyword arguments are those of :func:`tilted`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = zest(learning_rate=0.1, smoothing=0.01, tilt=1.0, num_directions=4)
        >>> state = opt.init(jnp.ones(2))
    """
    _check_learning_rate(learning_rate)
    return chain(
        tilted(smoothing, tilt, num_directions, direction=direction, antithetic=antithetic,
               chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding),
        optax.sgd(learning_rate))
