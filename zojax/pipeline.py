r"""The loop every estimator shares: directions ``[start, start + n)`` in chunks, a weighting.

Two-point estimates with ``q`` directions :math:`u_i` (see :mod:`zojax.directions`):

.. math::

    \text{central: }\hat g = \frac1q \sum_i \frac{f(x+\lambda u_i)-f(x-\lambda u_i)}{2\lambda}u_i,
    \qquad
    \text{forward: } \hat g = \frac1q \sum_i \frac{f(x+\lambda u_i) - f(x)}{\lambda} u_i

Every estimator of zojax is one pass of this loop (docs/guides/architecture.md): a
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

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from zojax import _checks, _cpu, weightings
from zojax._sharding import check_directions_sharding, sharded_loop
from zojax.directions import Perturbation, Sampler, as_perturbation, check_direction, is_stateful
from zojax.objective import Objective, as_objective

SCHEMES = ("central", "forward")

# Steps t_k = sign_k · λ of each scheme; "plus" (private): the values f(x + λu_i) alone, no
# f(x) (tilted estimators without antithetic pairs, tilted_value).
_SIGNS = {"central": (1, -1), "forward": (1,), "plus": (1,)}


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


class Estimate(NamedTuple):
    """What one step of an estimator returns to :func:`zojax.estimator_transform`."""

    value: jax.Array  # the loss the step computed (the mean of its evaluations, or f(x)).
    grads: Any  # the estimate, the structure and dtypes of params.
    finite: jax.Array  # bool scalar: every evaluation finite (else the step is skipped).
    num_queries: jax.Array  # int32 scalar: objective evaluations made.
    perturbation_state: Any  # the perturbation's state after the step.
    # True when the estimate already kept its perturbation state on a non-finite step (it
    # writes a large state in place: a select against the old state would copy all of it).
    nonfinite_handled: bool = False


def directional_loop(evaluate, weighting, key, params, perturbation: Perturbation, state,
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
        directions = _cpu.draw(sample_one, idx, dim, regenerate=chunk_size is not None)
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


def perturbed_evaluation(objective: Objective, params, steps, weighting, chunked: bool):
    """``evaluate(acc, U)`` of :func:`directional_loop` for the values f(x + t_k u_i).

    The line form when the objective has one; else perturbed copies of the parameters: all
    steps in one vmapped batch when unchunked; chunked, one step after the other in a loop
    whose second perturbed copy reuses the first one's buffer, the accumulator updated inside
    it (outside, XLA keeps the directions and what they were computed from alive until the
    update: one more parameter-sized buffer). Half-precision leaves are perturbed and weighted
    as :func:`_perturb` and :func:`_applied` say (a line form perturbs on its own: its
    directions are weighted as they are).
    """
    num_steps = steps.shape[0]

    def perturbed(step, directions):  # (n,) values f(x + step u_i)
        def one(u):
            return objective.value(jax.tree.map(lambda x, v: _perturb(x, step, v), params, u))

        if chunked and jax.tree.leaves(directions)[0].shape[0] == 1:
            # One direction: no unit batch axis, so the objective compiles as a plain forward
            # pass (activations updated in place). Unchunked, the unit axis is kept: under the
            # vmap over ± it gives linear models the faster X·[x+λu, x−λu] matmul layout.
            return one(jax.tree.map(lambda u: u[0], directions))[None]
        return jax.vmap(one)(directions)

    def evaluate(acc, directions):
        if objective.along is not None:
            values = jax.vmap(lambda u: objective.along(params, u, steps))(directions)
            values = values.astype(weightings.accumulator_dtype(values.dtype))
            return weighting.add(acc, values, directions), values
        directions = _widened(params, directions)
        if num_steps == 1:
            values = perturbed(steps[0], directions)[:, None]
        elif not chunked:
            values = jax.vmap(perturbed, (0, None))(steps, directions).T
        else:
            return in_sequence(perturbed, steps, weighting, acc, directions,
                                lambda u: _applied(params, u, steps))
        values = values.astype(weightings.accumulator_dtype(values.dtype))
        return weighting.add(acc, values, _applied(params, directions, steps)), values

    return evaluate


def in_sequence(perturbed, steps, weighting, acc, directions, applied):
    """The chunked evaluation: one step after the other, the weighting given
    ``applied(directions)`` after the last (formed there, fused into the accumulator update)."""
    n = jax.tree.leaves(directions)[0].shape[0]
    last = steps.shape[0] - 1
    value = jax.eval_shape(lambda: perturbed(steps[0], directions))
    dtype = weightings.accumulator_dtype(value.dtype)

    def step(carry, k):
        acc, values = carry
        values = values.at[:, k].set(perturbed(steps[k], directions).astype(dtype))
        acc = jax.lax.cond(k == last, lambda: weighting.add(acc, values, applied(directions)),
                           lambda: acc)
        return (acc, values), None

    (acc, values), _ = jax.lax.scan(step, (acc, jnp.zeros((n, last + 1), dtype)),
                                    jnp.arange(last + 1))
    return acc, values


def scheme_coefficients(scheme: str, smoothing, base):
    """``values (n, k) -> c (n,)``: each direction's finite difference, the weight of its
    direction in the mean (``base`` = f(x), forward)."""
    if scheme == "central":
        return lambda values: (values[:, 0] - values[:, 1]) / (2 * smoothing)
    return lambda values: (values[:, 0] - base) / smoothing


def scheme_weighting(scheme: str, smoothing, base):
    return weightings.mean(scheme_coefficients(scheme, smoothing, base))


def scheme_steps(scheme: str, smoothing, params):
    """The steps ``[s_k λ]`` in the parameters' dtype, float32 or wider (a half-precision λ
    would be rounded to 8 or 11 bits)."""
    _check_resolution(smoothing, params)
    dtype = weightings.accumulator_dtype(jnp.result_type(*jax.tree.leaves(params)))
    return (jnp.asarray(_SIGNS[scheme], dtype) * smoothing).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Half-precision parameters (float16, bfloat16). An entry x of such a leaf moves only by
# multiples of its spacing, about 2⁻ᵐ|x| (m = 7 bfloat16, 10 float16: finfo.nmant): the point
# x + λu rounds to x wherever λ|u| is below half of it, i.e. where |x| ≳ 2^(m+1) λ|u|. So the
# step is formed in float32 and rounded once (a half-precision λu would be rounded too), and
# the weighting sees the perturbation actually applied, (p₊ − p₋)/2λ, instead of the ideal u:
# an entry the step does not move gets no estimate instead of one of pure noise (the mean of
# Σ c_i u_i over directions that never moved it: either sign). Float32 and float64 leaves go
# through the same code as before, bit for bit. The price, on CPU: a chunk_size=1 step of
# half-precision parameters holds a float32 copy of them and float32 directions (XLA keeps
# both between the two perturbed points), one or two more float32 parameter-sized buffers.

# The smallest λ whose mean estimate (4096 Gaussian directions, central) keeps a cosine ≥ 0.9
# with ∇f on a small tanh MLP with N(0, 1/fan_in) weights (|x| up to ~0.5), the loss computed
# in the parameters' dtype (tests/test_half_precision.py): 2^(m+1) λ ≈ 0.25.
HALF_PRECISION_SMOOTHING = {"bfloat16": 1e-3, "float16": 1e-4}


def _is_half(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _perturb(x, step, v):
    """``x + step · v`` in the dtype of ``x``; for a half-precision leaf computed in float32 and
    rounded once (an explicit rounding, which XLA keeps: bfloat16 arithmetic may otherwise keep
    float32 precision where a float32 consumer follows, and the weights would then not be the
    step the objective saw)."""
    if not _is_half(x.dtype):
        return x + step.astype(x.dtype) * v
    dtype = weightings.accumulator_dtype(x.dtype)
    point = x.astype(dtype) + step.astype(dtype) * v.astype(dtype)
    info = jnp.finfo(x.dtype)
    if info.nexp == jnp.finfo(dtype).nexp:  # bfloat16: the same rounding as the cast alone,
        # and on CPU a faster chunk_size=1 step (benchmarks/README.md).
        point = jax.lax.reduce_precision(point, exponent_bits=info.nexp,
                                         mantissa_bits=info.nmant)
    return point.astype(x.dtype)


def _widened(params, directions):
    """The directions of half-precision leaves in float32 (the others as they are): converted
    once where they are drawn, not in each consumer (on CPU, a float16 chunk_size=1 step was
    slower and held one more buffer when each consumer converted them: benchmarks/README.md)."""
    return jax.tree.map(lambda x, u: u.astype(weightings.accumulator_dtype(u.dtype))
                        if _is_half(x.dtype) else u, params, directions)


def _applied(params, directions, steps):
    r"""The directions the weighting sees: ``u`` itself for float32 and wider leaves; for
    half-precision ones (float32) the step actually applied per unit of λ, :math:`(p_+ - p_-) /
    2\lambda` (central, :math:`p_\pm` the rounded :math:`x \pm \lambda u`) or :math:`(p_+ - x)
    / \lambda` (one step)."""
    def leaf(x, u):
        if not _is_half(x.dtype):
            return u
        dtype = weightings.accumulator_dtype(x.dtype)
        points = [_perturb(x, step, u).astype(dtype) for step in steps]
        if len(points) == 1:
            return (points[0] - x.astype(dtype)) / steps[0].astype(dtype)
        (plus, minus), (t_plus, t_minus) = points, steps.astype(dtype)
        return (plus - minus) / (t_plus - t_minus)

    return jax.tree.map(leaf, params, directions)


def _check_resolution(smoothing, params) -> None:
    """Warns (at trace time, when λ is a number) where λ is below what a half-precision leaf
    resolves, per :data:`HALF_PRECISION_SMOOTHING`."""
    number = _checks.concrete_value(smoothing)
    if number is None:
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = jnp.result_type(leaf)
        smallest = HALF_PRECISION_SMOOTHING.get(dtype.name)
        if smallest is not None and number < smallest:
            name, where = dtype.name, "params" + jax.tree_util.keystr(path)
            reach = 2.0 ** (jnp.finfo(dtype).nmant + 1) * number
            warnings.warn(
                f"smoothing λ = {number:g} is below what {name} parameters resolve ({where}): "
                f"x + λu is rounded to {name}, so entries larger than about {reach:.2g} in "
                f"magnitude hardly move and the estimate misses them. Use λ ≥ {smallest:g} "
                f"for {name} parameters of magnitude up to ~0.5 (zojax.pipeline."
                "HALF_PRECISION_SMOOTHING, measured on a tanh MLP), more for larger entries, "
                "or float32 parameters.", UserWarning, stacklevel=3)
            return


def state_or_init(perturbation: Perturbation, params, perturbation_state, name: str):
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
    state = state_or_init(perturbation, params, perturbation_state, "partial_estimate")
    steps = scheme_steps(scheme, smoothing, params)
    if scheme == "forward":
        base = objective.value(params)
        base = base.astype(weightings.accumulator_dtype(base.dtype))
    else:
        base = None
    if weighting is None:
        weighting = scheme_weighting(scheme, smoothing, base)

    def loop(start, num, key, params, state):
        evaluate = perturbed_evaluation(objective, params, steps, weighting,
                                         chunk_size is not None)
        return directional_loop(evaluate, weighting, key, params, perturbation, state, start,
                                 num, chunk_size)

    if directions_sharding is None:
        acc, values = loop(start, num_directions, key, params, state)
    else:
        acc, values = sharded_loop(loop, weighting, start, num_directions, directions_sharding,
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


def validate(smoothing, num_directions: int, *, chunk_size: int | None = None,
             directions_sharding: NamedSharding | None = None, num_name: str = "num_directions",
             shared: int | None = None, shared_name: str | None = None) -> None:
    """Checks the arguments every estimator shares, once, at construction (its factory calls
    this): ``smoothing`` positive and finite (skipped when traced: ``inject_hyperparams``),
    ``num_directions`` (named ``num_name``) and ``chunk_size`` static ints ≥ 1, and the
    directions splitting evenly over ``directions_sharding`` (``shared`` of them, named
    ``shared_name``, when the split is of something else, e.g. the ± pairs of a tilted
    estimate).

    Raises:
        ValueError: naming the argument.
    """
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int(num_name, num_directions)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_directions_sharding(directions_sharding, num_directions if shared is None else shared,
                              shared_name or num_name)
