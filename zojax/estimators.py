r"""Pure zeroth-order gradient estimators (matfree-style closures, key first), and their stages.

Two-point estimates with ``q`` directions :math:`u_i` (see :mod:`zojax.directions`):

.. math::

    \text{central: }\hat g = \frac1q \sum_i \frac{f(x+\lambda u_i)-f(x-\lambda u_i)}{2\lambda}u_i,
    \qquad
    \text{forward: } \hat g = \frac1q \sum_i \frac{f(x+\lambda u_i) - f(x)}{\lambda} u_i

Every estimator of zojax is one pass of the same loop (the README's Architecture): a
*perturbation* (:class:`zojax.directions.Perturbation`) samples direction ``i`` from
``jax.random.fold_in(key, i)``; an *evaluation* computes the objective values the scheme needs,
:math:`f(x + t_k u_i)` for the steps :math:`t_k` (``[λ, −λ]`` central, ``[λ]`` forward); a
*weighting* (:mod:`zojax.weightings`) accumulates them chunk by chunk. The same key gives the
same estimate whatever ``chunk_size`` is, and directions ``[start, start + n)`` form a
:func:`partial_estimate` whose accumulators :func:`combine` exactly.

Sharded directions: with ``directions_sharding=NamedSharding(mesh, P("directions"))`` the
estimate runs in a ``shard_map`` over that mesh axis (the first one the sharding partitions):
device ``j`` of ``n`` evaluates directions ``[j q/n, (j+1) q/n)`` (chunked by ``chunk_size`` if
given) and the devices then reduce their accumulators (a ``psum`` of one gradient-sized array)
and gather their ``q/n`` values: the same estimate as on one device, up to rounding. The other
mesh axes stay automatic: parameters sharded over them stay sharded, and so are the directions
drawn for them.

With ``chunk_size=None`` all directions (and the ± pair of each) are evaluated as one vmapped
batch; with ``chunk_size=c`` a ``lax.scan`` evaluates ``c`` at a time (first
:math:`x + \lambda u`, then :math:`x - \lambda u` in the same buffer) and accumulates on the
fly, so each direction is generated, used and dropped (MeZO style) and memory does not grow with
``q``: a ``chunk_size=1`` step holds the accumulator, one direction and one perturbed copy of
the parameters (3 parameter-sized buffers beyond the forward pass, at every ``q``).

The objective is only ever *evaluated*: it is never differentiated (except by
:func:`forward_grad`, the λ → 0 reference, which says so). An :class:`Objective` may also
evaluate itself along lines, :math:`t \mapsto f(x + t u)` (its *line form*, see :func:`bind`);
the evaluation then uses that instead of perturbed copies of the parameters.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from zojax import _backend, _checks, weightings
from zojax.directions import Perturbation, Sampler, as_perturbation, check_direction, is_stateful

SCHEMES = ("central", "forward")
# Steps t_k = sign_k · λ of each scheme; "points" (private): the values f(x + λu_i) alone, no
# f(x) (tilted estimators without antithetic pairs, tilted_value).
_SIGNS = {"central": (1, -1), "forward": (1,), "points": (1,)}


# ---------------------------------------------------------------------------------------------
# Objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    r"""An objective ``value(params) -> scalar`` and, optionally, its line form.

    The *line form* ``along(params, direction, steps) -> [f(x + t_k u)]_k`` (one value per
    entry of the 1-D ``steps``, up to rounding) is evaluated by the estimators instead of
    ``value`` at perturbed copies of ``params``. For a model linear in its first stage,
    :math:`f(x) = h(Ax)`, it computes :math:`Ax` and :math:`Au` once and :math:`h(Ax + t\,Au)`
    for each step: ``q`` directions cost ``q + 1`` products with :math:`A` instead of ``2q``.
    An Objective is called like its ``value``; build one with :func:`bind` to fix data
    arguments. A function with an ``along`` attribute is read as an Objective with that line
    form; a plain callable has none. (A dataclass, not a NamedTuple: ``jax.jit`` takes it, and
    pytree functions see it as a leaf.)
    """

    value: Callable[..., jax.Array]
    along: Callable[..., jax.Array] | None = None

    def __call__(self, params, *args, **kwargs):
        return self.value(params, *args, **kwargs)


def as_objective(fun: Callable, name: str = "fun") -> Objective:
    """``fun`` as an :class:`Objective` whose value and line form check their output shapes.

    Raises (when called):
        ValueError: the value is not a scalar (a ``(loss, aux)`` pair included), or the line
            form does not return one value per step (the message names ``name`` and the
            shapes).
    """
    value = fun.value if isinstance(fun, Objective) else fun
    along = fun.along if isinstance(fun, Objective) else getattr(fun, "along", None)

    def checked_value(*args, **kwargs):
        out = value(*args, **kwargs)
        if isinstance(out, tuple | list | dict):
            raise ValueError(
                f"{name} must return a scalar loss, got a {type(out).__name__} (a (loss, aux) "
                "pair?). zojax's estimators only evaluate the loss and have no has_aux: pass "
                f"{name}=lambda p: loss_and_aux(p)[0], and compute aux apart from the step.")
        if jnp.shape(out) != ():
            raise ValueError(f"{name} must return a scalar, got an output of shape "
                             f"{jnp.shape(out)}.")
        return out

    def checked_along(params, direction, steps, *args, **kwargs):
        out = along(params, direction, steps, *args, **kwargs)
        if jnp.shape(out) != jnp.shape(steps):
            raise ValueError(f"{name}.along must return one value per step, shape "
                             f"{jnp.shape(steps)}; got {jnp.shape(out)}.")
        return out

    return Objective(checked_value, None if along is None else checked_along)


def bind(fun: Callable, *args, **kwargs) -> Objective:
    r"""Returns the :class:`Objective` ``params ↦ fun(params, *args, **kwargs)``, keeping
    ``fun``'s line form (``fun.along(params, direction, steps, *args, **kwargs)``).

    Use it for ``value_fn`` of the transforms: a ``lambda`` drops the line form. The losses of
    :mod:`zojax.problems.linear` have one; under a ``vmap`` over parameters that share their
    directions (a sweep with one seed) their :math:`Au` is then computed once for all members.

    Example:
        >>> import jax.numpy as jnp
        >>> def loss(w, a):
        ...     return jnp.sum((a @ w) ** 2)
        >>> def loss_along(w, u, steps, a):  # h(Aw + t Au) for every step t
        ...     return jnp.sum((a @ w + steps[:, None] * (a @ u)) ** 2, axis=1)
        >>> value_fn = bind(Objective(loss, loss_along), 2 * jnp.eye(2))
        >>> float(value_fn(jnp.ones(2)))
        8.0
        >>> value_fn.along(jnp.ones(2), jnp.ones(2), jnp.array([0.0, 1.0])).tolist()
        [8.0, 32.0]
    """
    value = fun.value if isinstance(fun, Objective) else fun
    along = fun.along if isinstance(fun, Objective) else getattr(fun, "along", None)

    def bound(params):
        return value(params, *args, **kwargs)

    def bound_along(params, direction, steps):
        return along(params, direction, steps, *args, **kwargs)

    return Objective(bound, None if along is None else bound_along)


# ---------------------------------------------------------------------------------------------
# The loop every estimator shares: directions [start, start + num) in chunks, a weighting.


class PartialEstimate(NamedTuple):
    """The accumulated evaluations of directions ``[start, start + num)``; see :func:`combine`.

    ``finalize`` turns one (or a combination of several) into an estimate.
    """

    acc: Any  # the weighting's accumulator.
    value_sum: jax.Array  # Σ of the values the reported loss averages (f(x) alone: forward).
    value_count: jax.Array  # int32 scalar: how many values value_sum holds.
    finite: jax.Array  # bool scalar: every objective evaluation was finite.
    num_queries: jax.Array  # int32 scalar: objective evaluations made.
    values: jax.Array  # (num, k): the objective values of each direction, in index order.


def _directional_loop(evaluate, weighting, key, params, perturbation: Perturbation, state,
                      start, num: int, chunk_size: int | None):
    """``(acc, values)`` of ``evaluate(acc, U) -> (acc, values)`` over chunks of directions.

    Direction ``i ∈ [start, start + num)`` is ``perturbation.sample(fold_in(key, i), ...)``.
    Vmapped at once (``chunk_size`` None or ≥ num), or chunked in a ``lax.scan`` whose carry is
    the accumulator, so that each direction is generated, used and dropped.
    """
    context = perturbation.prepare(key, params, state)

    def sample_one(i):
        return perturbation.sample(jax.random.fold_in(key, i), params, state, context)

    check_direction(jax.eval_shape(sample_one, jnp.zeros((), jnp.uint32)), params)
    dim = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    if isinstance(start, int):
        indices = jnp.arange(start, start + num, dtype=jnp.uint32)
    else:  # traced (a device's share of the directions)
        indices = jnp.asarray(start, jnp.uint32) + jnp.arange(num, dtype=jnp.uint32)

    def chunk(acc, idx):
        directions = _backend.draw(sample_one, idx, dim, regenerate=chunk_size is not None)
        return evaluate(acc, directions)

    acc = weighting.init(params)
    if chunk_size is None or chunk_size >= num:
        return chunk(acc, indices)
    num_chunks, remainder = divmod(num, chunk_size)
    main = indices[: num_chunks * chunk_size].reshape(num_chunks, chunk_size)
    acc, values = jax.lax.scan(chunk, acc, main)
    values = values.reshape(num_chunks * chunk_size, *values.shape[2:])
    if remainder:
        acc, rest = chunk(acc, indices[num_chunks * chunk_size:])
        values = jnp.concatenate([values, rest])
    return acc, values


def _perturbed_evaluation(objective: Objective, params, steps, weighting, chunked: bool):
    """``evaluate(acc, U)`` of :func:`_directional_loop` for the values f(x + t_k u_i).

    The line form when the objective has one; else perturbed copies of the parameters: all
    steps in one vmapped batch when unchunked; chunked, one step after the other in a loop
    whose second perturbed copy reuses the first one's buffer, the accumulator updated inside
    it (outside, XLA keeps the directions and what they were computed from alive until the
    update: one more parameter-sized buffer).
    """
    num_steps = steps.shape[0]

    def perturbed(step, directions):  # (n,) values f(x + step u_i)
        def one(u):
            return objective.value(jax.tree.map(lambda x, v: x + step.astype(x.dtype) * v,
                                                params, u))

        if chunked and jax.tree.leaves(directions)[0].shape[0] == 1:
            # One direction: no unit batch axis, so the objective compiles as a plain forward
            # pass (activations updated in place). Unchunked, the unit axis is kept: under the
            # vmap over ± it gives linear models the faster X·[x+λu, x−λu] matmul layout.
            return one(jax.tree.map(lambda u: u[0], directions))[None]
        return jax.vmap(one)(directions)

    def evaluate(acc, directions):
        if objective.along is not None:
            values = jax.vmap(lambda u: objective.along(params, u, steps))(directions)
        elif num_steps == 1:
            values = perturbed(steps[0], directions)[:, None]
        elif not chunked:
            values = jax.vmap(perturbed, (0, None))(steps, directions).T
        else:
            return _in_sequence(perturbed, steps, weighting, acc, directions)
        values = values.astype(_backend.accumulator_dtype(values.dtype))
        return weighting.add(acc, values, directions), values

    return evaluate


def _in_sequence(perturbed, steps, weighting, acc, directions):
    n = jax.tree.leaves(directions)[0].shape[0]
    last = steps.shape[0] - 1
    value = jax.eval_shape(lambda: perturbed(steps[0], directions))
    dtype = _backend.accumulator_dtype(value.dtype)

    def step(carry, k):
        acc, values = carry
        values = values.at[:, k].set(perturbed(steps[k], directions).astype(dtype))
        acc = jax.lax.cond(k == last, lambda: weighting.add(acc, values, directions),
                           lambda: acc)
        return (acc, values), None

    (acc, values), _ = jax.lax.scan(step, (acc, jnp.zeros((n, last + 1), dtype)),
                                    jnp.arange(last + 1))
    return acc, values


def _two_point_weighting(scheme: str, smoothing, base):
    if scheme == "central":
        return weightings.mean(lambda values: (values[:, 0] - values[:, 1]) / (2 * smoothing))
    return weightings.mean(lambda values: (values[:, 0] - base) / smoothing)


def _steps(scheme: str, smoothing, params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return (jnp.asarray(_SIGNS[scheme], dtype) * smoothing).astype(dtype)


def _state_or_init(perturbation: Perturbation, params, perturbation_state, name: str):
    if perturbation_state is not None:
        return perturbation_state
    if is_stateful(perturbation, params):
        raise ValueError(
            f"{name}: direction is a stateful Perturbation and no perturbation_state was "
            "given. Pass it, estimate_fn(key, params, *args, "
            "perturbation_state=perturbation.init(params)), and update it with "
            "perturbation.update after each step; or use zojax.two_point, which keeps it in its "
            "optax state.")
    return perturbation.init(params)


def directions_axes(directions_sharding: NamedSharding) -> tuple[tuple[str, ...], int]:
    """The mesh axes that split the directions (the sharding's first partitioned entry) and the
    number of devices along them.

    Raises:
        ValueError: not a ``NamedSharding``, or one that partitions no axis.
    """
    if not isinstance(directions_sharding, NamedSharding):
        raise ValueError("directions_sharding must be a jax.sharding.NamedSharding, e.g. "
                         "NamedSharding(mesh, PartitionSpec('directions')), or None; got "
                         f"{directions_sharding!r}.")
    for entry in directions_sharding.spec:
        if entry is not None and entry != PartitionSpec.UNCONSTRAINED:
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            shape = directions_sharding.mesh.shape
            return axes, math.prod(shape[a] for a in axes)
    raise ValueError(f"directions_sharding {directions_sharding.spec} partitions no mesh axis; "
                     "name the axis that splits the directions, e.g. PartitionSpec("
                     f"{directions_sharding.mesh.axis_names[0]!r}) (mesh axes: "
                     f"{directions_sharding.mesh.axis_names}).")


def check_directions_sharding(directions_sharding, count: int,
                              name: str = "num_directions") -> None:
    """Raises ValueError unless ``count`` directions split evenly over ``directions_sharding``
    (None: nothing to check). No padding: a step never evaluates other than ``count``."""
    if directions_sharding is None:
        return
    axes, devices = directions_axes(directions_sharding)
    if count % devices:
        raise ValueError(
            f"{name}={count} does not split evenly over the {devices} devices of mesh axes "
            f"{axes}: choose a multiple of {devices} (directions are never padded).")


def _sharded_loop(loop, weighting: weightings.Weighting, start, num: int,
                  directions_sharding: NamedSharding, *operands):
    """``loop(start, num, *operands) -> (acc, values)`` split over the devices of the
    directions axes.

    Each device runs ``loop`` on its ``num / n`` directions; the accumulators are combined
    (:func:`zojax.weightings.all_reduce`) and the values gathered in index order, so every
    device holds the whole ``(acc, values)``. The operands (key, params, state) enter
    replicated over the directions axes, keeping their sharding over the others.
    """
    axes, devices = directions_axes(directions_sharding)
    check_directions_sharding(directions_sharding, num)
    share = num // devices
    key = operands[0]
    if (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            and "philox" in str(jax.random.key_impl(key))):
        raise ValueError("directions_sharding needs threefry2x32 (JAX's default) or rbg keys: "
                         "philox4x32 draws do not compile inside shard_map in this JAX (their "
                         "mulhi has no StableHLO form).")

    def local(start, *operands):
        first = start + jax.lax.axis_index(axes).astype(jnp.uint32) * share
        acc, values = loop(first, share, *operands)
        return (weightings.all_reduce(weighting, acc, axes),
                jax.lax.all_gather(values, axes, tiled=True))

    mesh = directions_sharding.mesh
    # shard_map's other axes must be automatic: explicit ones are made so within, and the
    # outputs replicated (sharded parameters and their directions stay sharded inside).
    explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                     if t == AxisType.Explicit and a not in axes)
    if explicit:
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=tuple(
            AxisType.Auto if a in explicit else t for a, t in zip(mesh.axis_names,
                                                                   mesh.axis_types)))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(),
                           out_specs=PartitionSpec(), axis_names=frozenset(axes),
                           check_vma=False)
    if explicit:
        mapped = jax.sharding.auto_axes(
            mapped, axes=explicit,
            out_sharding=NamedSharding(directions_sharding.mesh, PartitionSpec()))
    return mapped(jnp.asarray(start, jnp.uint32), *operands)


def partial_estimate(fun: Callable, key, params, *, smoothing, start=0, num_directions: int,
                     direction: str | Sampler | Perturbation = "gaussian",
                     scheme: str = "central", chunk_size: int | None = None,
                     weighting: weightings.Weighting | None = None,
                     perturbation_state=None,
                     directions_sharding: NamedSharding | None = None) -> PartialEstimate:
    r"""The two-point evaluations of directions ``i ∈ [start, start + num_directions)``.

    Direction ``i`` is drawn from ``fold_in(key, i)`` whatever the range, so partial estimates
    of disjoint ranges :func:`combine` into the estimate of their union: two halves combined
    give the whole (the multi-device estimators shard over this). ``start`` may be traced.

    Args:
        fun: objective ``fun(params) -> scalar`` (or an :class:`Objective`); only evaluated.
        key: typed PRNG key of the step.
        params: pytree of floating-point arrays.
        smoothing, num_directions, direction, scheme, chunk_size: as :func:`zo_value_and_grad`.
        start: the first direction index.
        weighting: a :class:`zojax.weightings.Weighting` of the values (``(n, 2)`` for central
            differences, ``f(x ± λu)``; ``(n, 1)`` forward); default the scheme's mean.
        perturbation_state: the state of a stateful perturbation.
        directions_sharding: split the directions over a mesh axis (see the module doc);
            ``num_directions`` must be a multiple of its size.

    Returns:
        A :class:`PartialEstimate`; :func:`finalize` gives ``(value, grads, finite)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f, key, x = (lambda p: jnp.sum(p ** 2)), jax.random.key(0), jnp.ones(3)
        >>> halves = [partial_estimate(f, key, x, smoothing=0.1, start=s, num_directions=2)
        ...           for s in (0, 2)]
        >>> whole = partial_estimate(f, key, x, smoothing=0.1, num_directions=4)
        >>> bool(jnp.allclose(finalize(combine(*halves), x)[1], finalize(whole, x)[1]))
        True
    """
    _checks.check_float_params(params)
    objective = as_objective(fun)
    perturbation = as_perturbation(direction)
    state = _state_or_init(perturbation, params, perturbation_state, "partial_estimate")
    steps = _steps(scheme, smoothing, params)
    if scheme == "forward":
        base = objective.value(params)
        base = base.astype(_backend.accumulator_dtype(base.dtype))
    else:
        base = None
    if weighting is None:
        weighting = _two_point_weighting(scheme, smoothing, base)

    def loop(start, num, key, params, state):
        evaluate = _perturbed_evaluation(objective, params, steps, weighting,
                                         chunk_size is not None)
        return _directional_loop(evaluate, weighting, key, params, perturbation, state, start,
                                 num, chunk_size)

    if directions_sharding is None:
        acc, values = loop(start, num_directions, key, params, state)
    else:
        acc, values = _sharded_loop(loop, weighting, start, num_directions, directions_sharding,
                                    key, params, state)
    finite = jnp.all(jnp.isfinite(values)) & jnp.isfinite(smoothing) & (smoothing > 0)
    if base is None:
        value_sum, value_count, queries = jnp.sum(values), values.size, values.size
    else:
        finite &= jnp.isfinite(base)
        value_sum, value_count, queries = base, 1, values.size + 1
    return PartialEstimate(acc, value_sum, jnp.asarray(value_count, jnp.int32), finite,
                           jnp.asarray(queries, jnp.int32), values)


def combine(a: PartialEstimate, b: PartialEstimate,
            weighting: weightings.Weighting | None = None) -> PartialEstimate:
    """The partial estimate of the union of two disjoint direction ranges (``a``'s first).

    ``weighting`` is the one both were made with (default: a mean, whatever its coefficients).
    """
    weighting = weighting or weightings.mean(None)
    return PartialEstimate(weighting.combine(a.acc, b.acc), a.value_sum + b.value_sum,
                           a.value_count + b.value_count, a.finite & b.finite,
                           a.num_queries + b.num_queries, jnp.concatenate([a.values, b.values]))


def finalize(partial: PartialEstimate, params,
             weighting: weightings.Weighting | None = None):
    """``(value, grads, finite)`` of a partial estimate; ``grads`` in the dtypes of ``params``.

    ``value`` is ``f(x)`` for the forward scheme and the mean of the ``f(x ± λu)`` for the
    central one.
    """
    weighting = weighting or weightings.mean(None)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), weighting.finalize(partial.acc), params)
    return partial.value_sum / partial.value_count, grads, partial.finite


class Estimate(NamedTuple):
    """What one step of an estimator returns to :func:`zojax.transforms.estimator_transform`."""

    value: jax.Array  # the loss the step computed (the mean of its evaluations, or f(x)).
    grads: Any  # the estimate, the structure and dtypes of params.
    finite: jax.Array  # bool scalar: every evaluation finite (else the step is skipped).
    num_queries: jax.Array  # int32 scalar: objective evaluations made.
    perturbation_state: Any  # the perturbation's state after the step.
    # True when the estimate already kept its perturbation state on a non-finite step (it
    # writes a large state in place: a select against the old state would copy all of it).
    guarded: bool = False


def two_point_estimate(fun: Callable, key, params, *, smoothing, num_directions: int,
                       direction: str | Sampler | Perturbation = "gaussian",
                       scheme: str = "central", chunk_size: int | None = None,
                       weighting: weightings.Weighting | None = None,
                       perturbation_state=None,
                       directions_sharding: NamedSharding | None = None,
                       **extra_args) -> Estimate:
    """One step of the two-point estimator: the :class:`Estimate` for ``fun(params)``.

    The perturbation's ``update`` receives the step's key, params, values and ``extra_args``.
    """
    perturbation = as_perturbation(direction)
    state = _state_or_init(perturbation, params, perturbation_state, "two_point_estimate")
    partial = partial_estimate(fun, key, params, smoothing=smoothing,
                               num_directions=num_directions, direction=perturbation,
                               scheme=scheme, chunk_size=chunk_size, weighting=weighting,
                               perturbation_state=state,
                               directions_sharding=directions_sharding)
    value, grads, finite = finalize(partial, params, weighting)
    state = perturbation.update(state, key, params, partial.values, **extra_args)
    return Estimate(value, grads, finite, partial.num_queries, state)


def _validate(smoothing, num_directions, direction, scheme, chunk_size,
              directions_sharding=None):
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    as_perturbation(direction)
    _checks.check_choice("scheme", scheme, SCHEMES)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_directions_sharding(directions_sharding, num_directions)


def zo_value_and_grad(fun: Callable, *, smoothing, num_directions: int = 1,
                      direction: str | Sampler | Perturbation = "gaussian",
                      scheme: str = "central", chunk_size: int | None = None,
                      directions_sharding: NamedSharding | None = None):
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
    _validate(smoothing, num_directions, direction, scheme, chunk_size, directions_sharding)
    perturbation = as_perturbation(direction)

    def value_and_grad_fn(key, params, *args, perturbation_state=None, **kwargs):
        state = _state_or_init(perturbation, params, perturbation_state, "zo_value_and_grad")
        partial = partial_estimate(bind(fun, *args, **kwargs), key, params, smoothing=smoothing,
                                   num_directions=num_directions, direction=perturbation,
                                   scheme=scheme, chunk_size=chunk_size,
                                   perturbation_state=state,
                                   directions_sharding=directions_sharding)
        value, grads, _ = finalize(partial, params)
        return value, grads

    return value_and_grad_fn


def zo_grad(fun: Callable, *, smoothing, num_directions: int = 1,
            direction: str | Sampler | Perturbation = "gaussian", scheme: str = "central",
            chunk_size: int | None = None, directions_sharding: NamedSharding | None = None):
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
        scheme=scheme, chunk_size=chunk_size, directions_sharding=directions_sharding)

    def grad_fn(key, params, *args, **kwargs):
        return value_and_grad_fn(key, params, *args, **kwargs)[1]

    return grad_fn


def forward_grad_estimate(fun: Callable, key, params, *, num_directions: int,
                          direction: str | Sampler | Perturbation = "gaussian",
                          chunk_size: int | None = None, perturbation_state=None,
                          **extra_args) -> Estimate:
    """One step of the forward gradient ``mean_i (u_iᵀ∇f) u_i`` (one jvp per direction)."""
    _checks.check_float_params(params)
    objective = as_objective(fun)
    perturbation = as_perturbation(direction)
    state = _state_or_init(perturbation, params, perturbation_state, "forward_grad")
    weighting = weightings.mean(lambda values: values[:, 1])

    def evaluate(acc, directions):
        value, slopes = jax.vmap(lambda u: jax.jvp(objective.value, (params,), (u,)))(directions)
        values = jnp.stack([value, slopes], 1)
        values = values.astype(_backend.accumulator_dtype(values.dtype))
        return weighting.add(acc, values, directions), values

    acc, values = _directional_loop(evaluate, weighting, key, params, perturbation, state, 0,
                                    num_directions, chunk_size)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), weighting.finalize(acc), params)
    state = perturbation.update(state, key, params, values, **extra_args)
    return Estimate(values[0, 0], grads, jnp.all(jnp.isfinite(values)),
                    jnp.asarray(num_directions, jnp.int32), state)


def forward_grad(fun: Callable, *, num_directions: int = 1,
                 direction: str | Sampler | Perturbation = "gaussian"):
    r"""The λ → 0 limit of the two-point estimator: :math:`\frac1q\sum_i (u_i^\top\nabla f)\,u_i`.

    The "forward gradient" of ZO-Bench, computed with ``jax.jvp``: unlike :func:`zo_grad` it
    *does* differentiate ``fun`` (one jvp per direction). Returns
    ``grad_fn(key, params, *args, perturbation_state=None, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> grad_fn = forward_grad(lambda p: jnp.sum(p ** 2), num_directions=2)
        >>> grad_fn(jax.random.key(0), jnp.ones(3)).shape
        (3,)
    """
    _checks.check_positive_int("num_directions", num_directions)
    perturbation = as_perturbation(direction)

    def grad_fn(key, params, *args, perturbation_state=None, **kwargs):
        return forward_grad_estimate(bind(fun, *args, **kwargs), key, params,
                                     num_directions=num_directions, direction=perturbation,
                                     perturbation_state=perturbation_state).grads

    return grad_fn


# ---------------------------------------------------------------------------------------------
# Tilted (soft-SAM, ZEST) estimators: the same loop, a softmax weighting.

TILTED_DIRECTIONS = ("gaussian", "sphere")


def _validate_tilted(smoothing, tilt, num_directions, direction, antithetic, chunk_size,
                     directions_sharding=None):
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_finite("tilt", tilt)
    _checks.check_positive_int("num_directions", num_directions)
    if num_directions < 2:
        raise ValueError("num_directions must be >= 2 (a self-normalized estimate of one point "
                         f"is pure noise), got {num_directions!r}.")
    if antithetic and num_directions % 2:
        raise ValueError("num_directions counts points; with antithetic=True it must be even "
                         f"(k pairs x ± λu), got {num_directions!r}.")
    _checks.check_choice("direction", direction, TILTED_DIRECTIONS)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    if antithetic:
        check_directions_sharding(directions_sharding, num_directions // 2,
                                  f"num_directions // 2 (the ± pairs of {num_directions} points)")
    else:
        check_directions_sharding(directions_sharding, num_directions)


def tilted_weighting(smoothing, tilt, antithetic: bool = True) -> weightings.Weighting:
    r"""The weighting of :func:`tilted_grad`: :math:`\frac{1}{t\lambda}\sum_{ik} w_{ik} s_k u_i`.

    A :func:`zojax.weightings.softmax` over the values (``(n, 2)``, ``f(x ± λu)``, antithetic;
    ``(n, 1)``, ``f(x + λu)``, otherwise), scaled by :math:`1/(t\lambda)` before the cast to the
    parameters' dtype.
    """
    softmax = weightings.softmax(tilt, (1.0, -1.0) if antithetic else (1.0,))

    def finalize(acc):
        return jax.tree.map(lambda g: g / (tilt * smoothing), softmax.finalize(acc))

    return softmax._replace(finalize=finalize)


def tilted_estimate(fun: Callable, key, params, *, smoothing, tilt, num_directions: int,
                    direction: str = "gaussian", antithetic: bool = True,
                    chunk_size: int | None = None,
                    directions_sharding: NamedSharding | None = None,
                    **extra_args) -> Estimate:
    """One step of the tilted estimator: the :class:`Estimate` for ``fun(params)``.

    ``value`` is the mean of the evaluated losses; a step whose tilt or smoothing is not
    positive and finite (traced hyperparameters) is reported as not finite.
    """
    del extra_args
    weighting = tilted_weighting(smoothing, tilt, antithetic)
    partial = partial_estimate(
        fun, key, params, smoothing=smoothing,
        num_directions=num_directions // 2 if antithetic else num_directions,
        direction=direction, scheme="central" if antithetic else "points",
        chunk_size=chunk_size, weighting=weighting, directions_sharding=directions_sharding)
    value, grads, finite = finalize(partial, params, weighting)
    finite &= jnp.isfinite(tilt) & (tilt > 0)
    return Estimate(value, grads, finite, partial.num_queries, ())


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
    _validate_tilted(smoothing, tilt, num_directions, direction, antithetic, chunk_size,
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
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_finite("tilt", tilt)
    _checks.check_positive_int("num_samples", num_samples)
    _checks.check_choice("direction", direction, TILTED_DIRECTIONS)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    weighting = weightings.log_mean_exp(tilt)
    partial = partial_estimate(bind(fun, *args, **kwargs), key, params, smoothing=smoothing,
                               num_directions=num_samples, direction=direction, scheme="points",
                               chunk_size=chunk_size, weighting=weighting)
    return weighting.finalize(partial.acc)
