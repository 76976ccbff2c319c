r"""Zeroth-order estimators as optax gradient transformations, and their aliases.

:func:`two_point` returns a gradient *estimate*; aliases add the step
(``zo_sgd = chain(two_point(...), sgd(lr))``), and users chain clipping, Adam or
``optax.MultiSteps`` themselves. The objective arrives at update time as the keyword-only extra
argument ``value_fn`` (as in optax's line searches)::

    updates, state = opt.update(None, state, params, value_fn=lambda p: loss(p, batch))

(``value_fn=zojax.estimators.bind(loss, batch)`` keeps the line form of an objective that has
one, e.g. the linear models of :mod:`zojax.problems.linear`: see :func:`zojax.estimators.bind`.)

Static and traced arguments: ``smoothing`` (and ``learning_rate`` of the aliases) are used only
in traced arithmetic, so ``optax.inject_hyperparams`` can lift them into the state and
``jax.vmap`` can sweep them in one compiled program. ``num_directions``, ``direction``,
``scheme`` and ``chunk_size`` change shapes or the program itself and are static: give
``num_directions`` (and a callable ``direction``) in ``static_args`` of ``inject_hyperparams``.

Non-finite losses: when any objective evaluation of a step is ``nan``/``inf``, the estimator
returns a zero update and increments ``state.num_nonfinite``; :func:`chain` (which the aliases
are) then also keeps the state of the transforms after the estimator, so the params and the
optimizer's state are untouched and a diverging run never silently corrupts its parameters
(in a plain ``optax.chain``, Adam's momentum would still move them). Watch that counter.

Incoming updates: an estimator computes its estimate from ``value_fn`` alone, so ``update``
refuses array ``updates`` (None and ``optax.MaskedNode`` leaves pass): wrappers that feed it
updates (``optax.MultiSteps`` or ``optax.apply_if_finite`` around it, a transform chained
before it) would be silently ignored. The error says what to do instead; see
:mod:`zojax.compose`. A transform before the estimator that passes ``None`` through unchanged
cannot be detected: put every transform after the estimator.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from zojax import _checks, blocks, compose, estimators
from zojax.directions import Perturbation, Sampler, as_perturbation


class TwoPointState(NamedTuple):
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
    of it to an estimate whose ``Estimate.guarded`` is True) and counts the step in
    ``num_nonfinite``.

    Args:
        estimate: ``estimate(key, value_fn, params, perturbation_state, **extra_args) ->
            zojax.estimators.Estimate`` (``value_fn`` is an :class:`zojax.estimators.Objective`
            that checks its outputs).
        seed: int seed or typed PRNG key.
        init_perturbation: ``init(params) -> perturbation_state`` (default: no state).
        name: the transform's name in error messages.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with a :class:`TwoPointState`, whose
        ``update(updates, state, params, *, value_fn, **extra_args)`` ignores ``updates``.

    Example:
        >>> import jax.numpy as jnp
        >>> from zojax import estimators
        >>> def estimate(key, value_fn, params, state, **extra_args):
        ...     return estimators.two_point_estimate(value_fn, key, params, smoothing=0.01,
        ...                                          num_directions=2, perturbation_state=state)
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
        return TwoPointState(count=jnp.zeros([], jnp.int32), key=_as_key(seed),
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
        out = estimate(step_key, estimators.as_objective(value_fn, "value_fn"), params,
                       state.perturbation_state, **extra_args)
        finite = out.finite
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), out.grads)
        perturbation_state = out.perturbation_state if out.guarded else (
            jax.tree_util.tree_map_with_path(functools.partial(_kept, finite),
                                             out.perturbation_state, state.perturbation_state))
        return grads, TwoPointState(
            count=optax.safe_increment(state.count), key=key,
            num_nonfinite=state.num_nonfinite + jnp.logical_not(finite).astype(jnp.int32),
            value=jnp.asarray(out.value, jnp.float32), perturbation_state=perturbation_state,
            num_queries=state.num_queries + out.num_queries)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def two_point(smoothing, num_directions: int = 1, *,
              direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
              chunk_size: int | None = None, seed=0,
              directions_sharding: NamedSharding | None = None
              ) -> optax.GradientTransformationExtraArgs:
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
            that mesh axis (see :mod:`zojax.estimators`); None: one device.

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
    estimators._validate(smoothing, num_directions, direction, scheme, chunk_size,
                         directions_sharding)
    perturbation = as_perturbation(direction)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return estimators.two_point_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, scheme=scheme, chunk_size=chunk_size,
            perturbation_state=perturbation_state, directions_sharding=directions_sharding,
            **extra_args)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="two_point")


def forward_gradient(num_directions: int = 1, *,
                     direction: str | Sampler | Perturbation = "gaussian", seed=0,
                     chunk_size: int | None = None) -> optax.GradientTransformationExtraArgs:
    r"""The λ → 0 limit of :func:`two_point`: :math:`\frac1q\sum_i (u_i^\top\nabla f)\,u_i` by jvp.

    Differentiates ``value_fn`` (forward mode, one jvp per direction); a reference for what
    :func:`two_point` does without its smoothing bias. Same state and ``update`` as
    :func:`two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = forward_gradient(num_directions=2)
        >>> state = opt.init(jnp.ones(3))
        >>> g, state = opt.update(None, state, jnp.ones(3), value_fn=lambda p: jnp.sum(p ** 2))
    """
    _checks.check_positive_int("num_directions", num_directions)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    perturbation = as_perturbation(direction)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return estimators.forward_grad_estimate(
            value_fn, key, params, num_directions=num_directions, direction=perturbation,
            chunk_size=chunk_size, perturbation_state=perturbation_state, **extra_args)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="forward_gradient")


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
    estimators._validate_tilted(smoothing, tilt, num_directions, direction, antithetic,
                                chunk_size, directions_sharding)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        del perturbation_state
        return estimators.tilted_estimate(
            value_fn, key, params, smoothing=smoothing, tilt=tilt,
            num_directions=num_directions, direction=direction, antithetic=antithetic,
            chunk_size=chunk_size, directions_sharding=directions_sharding, **extra_args)

    return estimator_transform(estimate, seed, name="tilted")


def block_two_point(smoothing, num_directions: int = 1, *, max_block_size: int,
                    direction: str = "gaussian", block_coordinate: bool = True,
                    seed=0, directions_sharding: NamedSharding | None = None
                    ) -> optax.GradientTransformationExtraArgs:
    r"""ZO-I (``"gaussian"``) and ZO-coordinate (``"coordinate"``) on the blocks of
    :func:`zojax.partition_blocks`: the baselines of :func:`natural`, with the same blocks,
    block sampling and one-sided differences from one shared :math:`f(x)` per step.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda u_i) - f(x)}{\lambda}\,u_i

    with :math:`u_i \sim N(0, I)` on the step's block (:math:`\sqrt{N_b}\,e_j` for
    ``"coordinate"``), zero elsewhere (:func:`zojax.blocks.block_perturbation`). Same
    :class:`TwoPointState`, ``value_fn`` contract and non-finite policy as :func:`two_point`;
    ``q + 1`` queries per step.

    Args:
        smoothing: :math:`\lambda > 0`; numeric, may be injected/vmapped.
        num_directions: ``q`` (static).
        max_block_size: :math:`N` (static).
        direction: ``"gaussian"`` or ``"coordinate"`` (static).
        block_coordinate: perturb one uniformly sampled block per step (else all at once).
        seed: int seed or typed PRNG key.
        directions_sharding: split the directions over a mesh axis, as in :func:`two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = block_two_point(0.01, 4, max_block_size=2)
        >>> g, state = opt.update(None, opt.init(jnp.ones(5)), jnp.ones(5),
        ...                       value_fn=lambda p: jnp.sum(p ** 2))
        >>> int(state.num_queries), int(jnp.sum(g != 0)) <= 2
        (5, True)
    """
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    estimators.check_directions_sharding(directions_sharding, num_directions)
    perturbation = blocks.block_perturbation(max_block_size, direction,
                                                  block_coordinate=block_coordinate)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        return estimators.two_point_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, scheme="forward", perturbation_state=perturbation_state,
            directions_sharding=directions_sharding, **extra_args)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="block_two_point")


def natural(smoothing, num_directions: int = 1, *, max_block_size: int, fisher: str = "softmax",
            damping=0.1, ema=0.01, update_every=100, num_fisher_inputs=100,
            jacobian: str = "zeroth_order", block_coordinate: bool = True,
            max_fisher_blocks: int | None = None, seed=0,
            directions_sharding: NamedSharding | None = None
            ) -> optax.GradientTransformationExtraArgs:
    r"""ZO-NP: zeroth-order estimates from natural (Fisher-shaped, block-diagonal) perturbations.

    .. math::

        \hat g = \frac1q\sum_i \frac{f(x + \lambda\,\delta\theta_i) - f(x)}{\lambda}\,
        \delta\theta_i, \qquad \delta\theta_i = L_b r_i,\; r_i \sim N(0, I),\quad
        L_b L_b^\top = \Sigma_b = (1 + \rho)(F_b + \rho I)^{-1}

    on the step's block :math:`b` (zero elsewhere), so :math:`\mathbb{E}[\hat g \mid b] =
    \Sigma_b \nabla_b f` on a quadratic. :math:`F_b` is the block's Fisher
    :math:`\mathbb{E}_x[J_b^\top G J_b]` of the model outputs, started at :math:`I` and
    refreshed every ``update_every`` steps with EMA weight ``ema``; see :mod:`zojax.blocks` for
    the forms, the Jacobian estimates, the storage and the slot policy of
    ``max_fisher_blocks``. The state is a :class:`TwoPointState` whose ``perturbation_state``
    is a :class:`zojax.blocks.NaturalState`; ``num_queries`` counts the ``q + 1`` loss queries
    of every step and the output rows of every Fisher refresh (Jacobian probes included).

    The update takes the loss and the model outputs, at every step::

        updates, state = opt.update(None, state, params, value_fn=lambda p: loss(p, batch),
                                    output_fn=lambda p: model.apply(p, batch_x))

    ``output_fn(params)`` returns outputs with a leading axis of inputs (logits ``(n, classes)``
    for ``fisher="softmax"``); the Fisher uses the first ``num_fisher_inputs`` rows. Donate the
    optimizer state to a jitted step (``jax.jit(step, donate_argnums=...)``, or run the steps in
    a ``lax.scan``): the :math:`2MN^2` floats of F and L are then updated in place.
    Non-finite losses or outputs: a zero update, counted in ``num_nonfinite``; the Fisher is not
    updated from them.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        num_directions: ``q`` (static).
        max_block_size: :math:`N`, entries per block (static).
        fisher: ``"softmax"`` (:math:`G = \operatorname{diag}(p) - pp^\top`) or ``"gaussian"``
            (:math:`G = I`).
        damping: :math:`\rho > 0`.
        ema: :math:`\alpha \in (0, 1]`.
        update_every: steps between Fisher refreshes.
        num_fisher_inputs: the rows of the outputs the Fisher averages over.
        jacobian: ``"zeroth_order"`` (forward differences from output queries) or
            ``"autodiff"`` (``jax.jvp``, white-box models).
        block_coordinate: perturb and refresh one sampled block per step (else all blocks).
        max_fisher_blocks: keep at most this many blocks' matrices (static; None: all, i.e.
            :math:`2BN^2` float32 numbers).
        seed: int seed or typed PRNG key.
        directions_sharding: split the directions over a mesh axis, as in :func:`two_point`
            (the Fisher refresh is not split).

    Raises:
        ValueError: an invalid argument, named (at construction); ``update`` without
            ``output_fn`` (the message shows how to pass it).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.zeros((3, 2))
        >>> logits = lambda p: jnp.array([[1.0, 2.0, 0.5]]) @ p
        >>> loss = lambda p: -jax.nn.log_softmax(logits(p))[0, 0]
        >>> opt = natural(0.01, 4, max_block_size=4, update_every=1)
        >>> g, state = opt.update(None, opt.init(w), w, value_fn=loss, output_fn=logits)
        >>> int(state.perturbation_state.num_refreshes)
        1
    """
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    estimators.check_directions_sharding(directions_sharding, num_directions)
    opts = blocks.NaturalOptions(max_block_size, fisher, damping, ema, update_every,
                                      num_fisher_inputs, jacobian, block_coordinate,
                                      max_fisher_blocks)
    perturbation = blocks.natural_perturbation(**opts._asdict())

    def estimate(key, value_fn, params, perturbation_state, *, output_fn=None, **extra_args):
        del extra_args
        partial = estimators.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, scheme="forward", perturbation_state=perturbation_state,
            directions_sharding=directions_sharding)
        value, grads, finite = estimators.finalize(partial, params)
        state, refreshed, queries = blocks.refresh(opts, perturbation_state, key, params,
                                                        output_fn, finite)
        return estimators.Estimate(value, grads, finite & refreshed,
                                   partial.num_queries + queries, state, guarded=True)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="natural")


def _estimator_states(state) -> list:
    return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, TwoPointState))
            if isinstance(s, TwoPointState)]


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
    :class:`TwoPointState`, possibly inside a wrapper's state), then one state per transform.

    Args:
        estimator: a zojax transform, alone or inside optax wrappers (``inject_hyperparams``,
            ``masked``, ``multi_transform``): its state must hold a :class:`TwoPointState`.
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
                "zojax.TwoPointState. For first-order chains use optax.chain.")
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
           directions_sharding: NamedSharding | None = None
           ) -> optax.GradientTransformationExtraArgs:
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
                  chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding),
        optax.sgd(learning_rate))


def zo_adam(learning_rate, smoothing, num_directions: int = 1, *, b1=0.9, b2=0.999, eps=1e-8,
            direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
            chunk_size: int | None = None, seed=0,
            directions_sharding: NamedSharding | None = None
            ) -> optax.GradientTransformationExtraArgs:
    """ZO-Adam: ``zojax.chain(two_point(...), adam(learning_rate, b1, b2, eps))``: a skipped
    (non-finite) step leaves Adam's moments and count as they were (see :func:`chain`)."""
    _check_learning_rate(learning_rate)
    return chain(
        two_point(smoothing, num_directions, direction=direction, scheme=scheme,
                  chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def zo_sign_sgd(learning_rate, smoothing, num_directions: int = 1, *,
                direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
                chunk_size: int | None = None, seed=0,
                directions_sharding: NamedSharding | None = None
                ) -> optax.GradientTransformationExtraArgs:
    """ZO-signSGD: steps of ``-learning_rate · sign(ĝ)``."""
    _check_learning_rate(learning_rate)
    return chain(
        two_point(smoothing, num_directions, direction=direction, scheme=scheme,
                  chunk_size=chunk_size, seed=seed, directions_sharding=directions_sharding),
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
