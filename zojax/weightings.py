r"""Weightings: how an estimator reduces the objective values of its directions.

A :class:`Weighting` is a monoid over accumulators, called inside the estimators' loop over
chunks of directions: ``init(params) -> acc``; ``add(acc, values, directions) -> acc`` for a
chunk (``values`` (n, k): the k objective values the scheme evaluated per direction;
``directions``: the chunk's n directions, a pytree batched on axis 0); ``combine(acc_a, acc_b)
-> acc``; ``finalize(acc) -> estimate``. Since ``add`` only ever sees one chunk and ``combine``
is exact, a chunked, scanned or sharded estimate equals the unchunked one (up to rounding).
Across devices (inside ``shard_map``), :func:`all_reduce` combines the accumulators of every
device with the weighting's ``reduce``: collectives whose operands are one accumulator each
(a ``psum``), never one per device.

- :func:`mean`: :math:`\frac1q \sum_i c_i u_i` with coefficients :math:`c_i` from each
  direction's values (the two-point estimators: central, forward).
- :func:`softmax`: :math:`\sum_{i,k} w_{ik}\, s_k u_i` with :math:`w = \operatorname{softmax}
  (t\, f_{ik})` over every value of every direction, through a running log-sum-exp (a tilted,
  soft-max objective's self-normalized estimate).
- :func:`log_mean_exp`: :math:`\frac1t\log\frac1n\sum_i e^{t f_i}` and its standard error by
  the delta method (a tilted objective's value).
- :func:`tilted`: the softmax scaled by :math:`1/(t\lambda)`, the estimate of
  :func:`zojax.tilted_grad`.
- :func:`mean_and_sem`: the mean and standard error of one sample per direction, a scalar
  (trace estimators) or a pytree like params (diagonal estimators), by Chan's parallel update
  of (count, mean, M₂).

A weighting that needs every value before it can weight any (rank-based shaping) is two passes:
a first :func:`zojax.pipeline.partial_estimate` collects the values, a second weights them.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zojax import _cpu


def accumulator_dtype(dtype):
    """The dtype sums of directions are accumulated in: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


class Weighting(NamedTuple):
    """A weighting stage: ``init``, ``add``, ``combine``, ``finalize`` (see the module doc).

    ``reduce(acc, axis_name) -> acc`` (optional) is ``combine`` over the devices of a mesh axis
    by collectives; None: :func:`all_reduce` gathers the accumulators and folds ``combine``.
    """

    init: Callable[[Any], Any]
    add: Callable[[Any, jax.Array, Any], Any]
    combine: Callable[[Any, Any], Any]
    finalize: Callable[[Any], Any]
    reduce: Callable[[Any, Any], Any] | None = None


def all_reduce(weighting: Weighting, acc, axis_name):
    """The combination of every device's ``acc`` along ``axis_name`` (inside ``shard_map``),
    in device order, on every device: the weighting's ``reduce``, or an ``all_gather`` of the
    accumulators folded by ``combine`` (for scalar accumulators)."""
    if weighting.reduce is not None:
        return weighting.reduce(acc, axis_name)
    gathered = jax.lax.all_gather(acc, axis_name)
    num = jax.tree.leaves(gathered)[0].shape[0]
    parts = [jax.tree.map(lambda x, i=i: x[i], gathered) for i in range(num)]
    out = parts[0]
    for part in parts[1:]:
        out = weighting.combine(out, part)
    return out


def _zeros_like_params(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, accumulator_dtype(p.dtype)),
                        params)


def _scalar_dtype(params):
    return accumulator_dtype(jnp.result_type(*(p.dtype for p in jax.tree.leaves(params))))


class MeanState(NamedTuple):
    """Accumulator of :func:`mean`."""

    total: Any  # Σ c_i u_i, the structure of params in float32 or wider.
    count: jax.Array  # int32 scalar: directions added.


def mean(coefficients: Callable[[jax.Array], jax.Array]) -> Weighting:
    r"""The mean :math:`\frac1q\sum_i c_i u_i`, ``c = coefficients(values)`` of shape (n,).

    Example:
        >>> import jax.numpy as jnp
        >>> central = mean(lambda values: (values[:, 0] - values[:, 1]) / 2.0)
        >>> acc = central.add(central.init(jnp.zeros(2)), jnp.array([[3.0, 1.0]]),
        ...                   jnp.array([[1.0, 2.0]]))
        >>> central.finalize(acc).tolist()
        [1.0, 2.0]
    """

    def init(params):
        return MeanState(_zeros_like_params(params), jnp.zeros((), jnp.int32))

    def add(acc, values, directions):
        total = _cpu.weighted_sum(coefficients(values), directions, acc.total)
        return MeanState(total, acc.count + values.shape[0])

    def combine(a, b):
        return MeanState(jax.tree.map(jnp.add, a.total, b.total), a.count + b.count)

    def finalize(acc):
        return jax.tree.map(lambda total: total / acc.count, acc.total)

    def reduce(acc, axis_name):
        return jax.lax.psum(acc, axis_name)

    return Weighting(init, add, combine, finalize, reduce)


class SoftmaxState(NamedTuple):
    """Accumulator of :func:`softmax`: sums scaled by ``exp(-max)``."""

    max: jax.Array  # scalar: the largest score t·f so far (-inf before any).
    total: Any  # Σ_i (Σ_k s_k exp(t f_ik − max)) u_i, the structure of params.
    norm: jax.Array  # scalar: Σ exp(t f_ik − max).


def softmax(tilt, signs=(1.0, -1.0)) -> Weighting:
    r""":math:`\sum_{i,k} w_{ik}\, s_k u_i`, :math:`w_{ik} = e^{t f_{ik}} / \sum_{jl} e^{t f_{jl}}`.

    Args:
        tilt: :math:`t` (numeric, may be traced).
        signs: :math:`s_k`, the side of direction ``u_i`` that value column ``k`` was evaluated
            at (``(1, -1)`` for the points :math:`x \pm \lambda u_i` of the central scheme).

    Chunks are merged through a running log-sum-exp, so the result does not depend on how the
    directions are chunked or split; a larger tilt weights the largest values more. Each
    direction's coefficient :math:`\sum_k s_k e^{a_{ik}}` (:math:`a = t f - \max`) is computed as
    :math:`\sum_k s_k \operatorname{expm1}(a_{ik}) + \sum_k s_k`: with signs that sum to zero
    (antithetic pairs) it is a difference of ``expm1``, free of the cancellation that
    :math:`e^{a_+} - e^{a_-}` suffers when :math:`t \to 0` (both near 1), so the result divided by
    :math:`t` keeps its relative precision for any small tilt.
    """
    signs = jnp.asarray(signs)

    def rescale(acc, new_max):
        factor = jnp.where(jnp.isneginf(acc.max), 0.0, jnp.exp(acc.max - new_max))
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), acc.total), acc.norm * factor

    def init(params):
        dtype = _scalar_dtype(params)
        return SoftmaxState(jnp.full((), -jnp.inf, dtype), _zeros_like_params(params),
                            jnp.zeros((), dtype))

    def add(acc, values, directions):
        scores = (tilt * values).astype(acc.norm.dtype)
        new_max = jnp.maximum(acc.max, jnp.max(scores))
        shifted = scores - new_max  # (n, k), <= 0
        s = signs.astype(shifted.dtype)
        coefficients = jnp.expm1(shifted) @ s + jnp.sum(s)
        total, norm = rescale(acc, new_max)
        total = _cpu.weighted_sum(coefficients, directions, total)
        return SoftmaxState(new_max, total, norm + jnp.sum(jnp.exp(shifted)))

    def combine(a, b):
        new_max = jnp.maximum(a.max, b.max)
        (total_a, norm_a), (total_b, norm_b) = rescale(a, new_max), rescale(b, new_max)
        return SoftmaxState(new_max, jax.tree.map(jnp.add, total_a, total_b), norm_a + norm_b)

    def finalize(acc):
        return jax.tree.map(lambda total: total / acc.norm.astype(total.dtype), acc.total)

    def reduce(acc, axis_name):
        new_max = jax.lax.pmax(acc.max, axis_name)
        total, norm = jax.lax.psum(rescale(acc, new_max), axis_name)
        return SoftmaxState(new_max, total, norm)

    return Weighting(init, add, combine, finalize, reduce)


class LogMeanExpState(NamedTuple):
    """Accumulator of :func:`log_mean_exp`: moments of ``expm1(t f − max)``."""

    max: jax.Array  # scalar: the largest score t·f so far (-inf before any).
    count: jax.Array  # scalar: samples added (float).
    mean: jax.Array  # scalar: mean of expm1(t f_i − max).
    m2: jax.Array  # scalar: Σ (expm1(t f_i − max) − mean)².


def log_mean_exp(tilt) -> Weighting:
    r""":math:`\frac1t \log \frac1n \sum_i e^{t f_i}` of one value per direction, and its
    standard error.

    ``finalize`` returns ``(estimate, stderr)``; by the delta method
    :math:`\operatorname{se} = \frac{s_Y}{t\,\bar Y\sqrt n}` with :math:`Y_i = e^{t f_i}` and
    :math:`s_Y` their standard deviation (NaN for one sample). The moments are those of
    :math:`\operatorname{expm1}(t f_i - \max)`, merged exactly when the max moves
    (:math:`y' = \phi\,y + \operatorname{expm1}(\delta)`, :math:`\phi = e^{\delta}`), so
    :math:`t \to 0` gives the mean of :math:`f` and its standard error without cancellation.
    """

    def init(params):
        zero = jnp.zeros((), _scalar_dtype(params))
        return LogMeanExpState(jnp.full((), -jnp.inf, zero.dtype), zero, zero, zero)

    def shift(acc, new_max):
        delta = jnp.where(jnp.isneginf(acc.max), 0.0, acc.max - new_max)
        factor = jnp.exp(delta)
        return acc._replace(max=new_max, mean=factor * acc.mean + jnp.expm1(delta),
                            m2=jnp.square(factor) * acc.m2)

    def combine(a, b):
        new_max = jnp.maximum(a.max, b.max)
        a, b = shift(a, new_max), shift(b, new_max)
        count = a.count + b.count
        share = jnp.where(count > 0, b.count / jnp.maximum(count, 1), 0.0)
        delta = b.mean - a.mean
        return LogMeanExpState(new_max, count, a.mean + delta * share,
                               a.m2 + b.m2 + jnp.square(delta) * a.count * share)

    def add(acc, values, directions):
        del directions
        scores = (tilt * values[:, 0]).astype(acc.mean.dtype)
        chunk_max = jnp.max(scores)
        y = jnp.expm1(scores - chunk_max)
        chunk_mean = jnp.mean(y)
        chunk = LogMeanExpState(chunk_max, jnp.asarray(y.shape[0], y.dtype), chunk_mean,
                                jnp.sum(jnp.square(y - chunk_mean)))
        return combine(acc, chunk)

    def finalize(acc):
        estimate = (acc.max + jnp.log1p(acc.mean)) / tilt
        variance = acc.m2 / (acc.count - 1)
        stderr = jnp.sqrt(variance / acc.count) / (tilt * (1 + acc.mean))
        return estimate, jnp.where(acc.count > 1, stderr, jnp.nan)

    return Weighting(init, add, combine, finalize)


class MomentsState(NamedTuple):
    """Accumulator of :func:`mean_and_sem`."""

    count: jax.Array  # scalar: samples added (float, for the update's arithmetic).
    mean: Any  # their mean: a scalar, or (per_coordinate) the structure of params.
    m2: Any  # Σ (x − mean)², the structure of mean.


def mean_and_sem(samples: Callable[[Any], Any], per_coordinate: bool = False) -> Weighting:
    r"""The mean of ``samples(values)`` over directions and its standard error.

    ``samples(values)`` gives one sample per direction: an (n,) array, or with
    ``per_coordinate`` a pytree with the structure of params whose leaves are batched on axis 0
    (``values`` is then whatever pytree the estimator's evaluation passes to ``add``, e.g. the
    products :math:`v \odot Hv` of a Hessian diagonal). Chunks are merged by Chan's parallel
    update of (count, mean, M₂), coordinate by coordinate. ``finalize`` returns
    ``(mean, sem)``, ``sem = std(ddof=1) / √n`` (NaN for one sample), both with the structure
    of one sample, in float32 or wider.

    Example:
        >>> import jax.numpy as jnp
        >>> moments = mean_and_sem(lambda values: values[:, 0])
        >>> acc = moments.add(moments.init(jnp.zeros(2)), jnp.array([[1.0], [3.0]]), None)
        >>> [float(x) for x in moments.finalize(acc)]
        [2.0, 1.0]
    """

    def init(params):
        count = jnp.zeros((), _scalar_dtype(params))
        zeros = _zeros_like_params(params) if per_coordinate else count
        return MomentsState(count, zeros, zeros)

    def add(acc, values, directions):
        del directions
        x = jax.tree.map(lambda s, m: s.astype(m.dtype), samples(values), acc.mean)
        n = jax.tree.leaves(x)[0].shape[0]
        chunk_mean = jax.tree.map(lambda s: jnp.mean(s, axis=0), x)
        chunk_m2 = jax.tree.map(lambda s, m: jnp.sum(jnp.square(s - m), axis=0), x, chunk_mean)
        return combine(acc, MomentsState(jnp.asarray(n, acc.count.dtype), chunk_mean, chunk_m2))

    def combine(a, b):
        count = a.count + b.count
        share = jnp.where(count > 0, b.count / jnp.maximum(count, 1), 0.0)

        def merged_mean(mean_a, mean_b):
            return mean_a + (mean_b - mean_a) * share.astype(mean_a.dtype)

        def merged_m2(m2_a, m2_b, mean_a, mean_b):
            dtype = m2_a.dtype
            return (m2_a + m2_b + jnp.square(mean_b - mean_a) * a.count.astype(dtype)
                    * share.astype(dtype))

        return MomentsState(count, jax.tree.map(merged_mean, a.mean, b.mean),
                            jax.tree.map(merged_m2, a.m2, b.m2, a.mean, b.mean))

    def finalize(acc):
        def sem(m2):
            count = acc.count.astype(m2.dtype)
            return jnp.where(count > 1, jnp.sqrt(m2 / (count - 1) / count), jnp.nan)

        return acc.mean, jax.tree.map(sem, acc.m2)

    return Weighting(init, add, combine, finalize)


def tilted(smoothing, tilt, antithetic: bool = True) -> Weighting:
    r"""The weighting of :func:`zojax.tilted_grad`,
    :math:`\frac{1}{t\lambda}\sum_{ik} w_{ik} s_k u_i`.

    A :func:`zojax.weightings.softmax` over the values (``(n, 2)``, ``f(x ± λu)``, antithetic;
    ``(n, 1)``, ``f(x + λu)``, otherwise), scaled by :math:`1/(t\lambda)` before the cast to the
    parameters' dtype.
    """
    softmax_ = softmax(tilt, (1.0, -1.0) if antithetic else (1.0,))

    def finalize(acc):
        return jax.tree.map(lambda g: g / (tilt * smoothing), softmax_.finalize(acc))

    return softmax_._replace(finalize=finalize)
