r"""ZO-SVRG / MeZO-SVRG (Gautam et al. 2024): minibatch estimates corrected by a control
variate from a periodic large-batch estimate at a snapshot."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zojax import _checks, _cpu, pipeline, weightings
from zojax.objective import as_objective
from zojax.transform import estimator_transform


class SvrgState(NamedTuple):
    """State of :func:`zo_svrg`: the snapshot, its large-batch estimate and the step count."""

    snapshot: Any  # x̃, the params at the last snapshot step.
    snapshot_grads: Any  # ĝ_full(x̃), the large-batch estimate there.
    count: jax.Array  # int32 scalar: steps taken; a snapshot when count % snapshot_every == 0.


def _values_only() -> weightings.Weighting:
    """A weighting that keeps nothing: the loop's values alone (``PartialEstimate.values``)."""
    return weightings.Weighting(lambda params: (), lambda acc, values, directions: acc,
                                lambda a, b: a, lambda acc: ())


def _central_minus(smoothing, reference) -> weightings.Weighting:
    r""":math:`\frac1q\sum_i (c_i - r_i)\,u_i`, :math:`c_i` the central coefficient of
    direction i and :math:`r` (q,) a reference's (chunks arrive in index order: the running
    count indexes r). One accumulator for a difference of two estimates along the same u_i."""
    def central(values):
        return (values[:, 0] - values[:, 1]) / (2 * smoothing)

    def add(acc, values, directions):
        n = values.shape[0]
        coefficients = central(values) - jax.lax.dynamic_slice_in_dim(reference, acc.count, n)
        return weightings.MeanState(_cpu.weighted_sum(coefficients, directions, acc.total),
                                    acc.count + n)

    return weightings.mean(central)._replace(add=add, reduce=None)


def zo_svrg(smoothing, num_directions: int = 1, *, snapshot_every: int,
            chunk_size: int | None = None, seed=0) -> optax.GradientTransformationExtraArgs:
    r"""ZO-SVRG / MeZO-SVRG (Gautam et al. 2024): two-point estimates with a control variate.

    Every ``snapshot_every`` steps (the first included) the step is the large-batch estimate
    :math:`\tilde g = \hat g_{\mathcal D}(x)`, and :math:`\tilde x = x` and :math:`\tilde g` are
    kept; the steps between return

    .. math:: \hat g = \hat g_B(x; u) - \hat g_B(\tilde x; u) + \tilde g,

    the minibatch estimates at :math:`x` and :math:`\tilde x` taken with the same directions
    :math:`u_i`. On a quadratic the difference is :math:`\frac1q\sum_i u_i u_i^\top
    \nabla^2 f_B\,(x - \tilde x)` exactly: its mean is :math:`\nabla f_B(x) - \nabla f_B(\tilde
    x)` and its variance vanishes as :math:`x \to \tilde x`, so the estimate's noise is
    :math:`\tilde g`'s, set once per snapshot. The update takes the minibatch objective as
    ``value_fn`` and the large-batch one as ``full_value_fn`` (evaluated on snapshot steps
    only; under ``jax.vmap`` both branches run). Central differences; queries: 2q on a snapshot
    step (large batch), 4q between. A minibatch step first evaluates the directions at
    :math:`\tilde x` (values only), then accumulates :math:`\sum_i (c_i(x) - c_i(\tilde x))
    u_i` in one pass at :math:`x`: one gradient-sized accumulator, as a two-point step. State:
    the snapshot and its estimate, 2× the params. Unlike the reference code, the snapshot is
    a copy and both minibatch estimates share their directions (the control variate needs
    both). Chain with ``optax.sgd(η)``; MeZO-SVRG's two learning rates (large-batch and
    minibatch steps) are an ``optax.inject_hyperparams`` schedule on the same period.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        num_directions: ``q`` (static), on both kinds of step.
        snapshot_every: the snapshot period ``≥ 1`` (an int, may be injected; MeZO-SVRG's q).
        chunk_size, seed: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = zo_svrg(0.01, snapshot_every=5)
        >>> w = jnp.ones(3)
        >>> g, state = opt.update(None, opt.init(w), w, value_fn=lambda w: jnp.sum(w ** 2),
        ...                       full_value_fn=lambda w: jnp.sum(w ** 2))
        >>> int(state.num_queries), int(state.perturbation_state.count)
        (2, 1)
    """
    pipeline.validate(smoothing, num_directions, chunk_size=chunk_size)
    _checks.check_int_like("snapshot_every", snapshot_every)
    options = dict(smoothing=smoothing, num_directions=num_directions, chunk_size=chunk_size)

    def init(params):
        return SvrgState(jax.tree.map(jnp.zeros_like, params),
                         jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def estimate(key, value_fn, params, state, *, full_value_fn=None, **extra_args):
        del extra_args
        if full_value_fn is None:
            raise ValueError("zo_svrg.update needs the large-batch objective as a keyword "
                             "argument: opt.update(None, state, params, value_fn=...,"
                             " full_value_fn=lambda p: loss(p, large_batch)).")
        full_value_fn = as_objective(full_value_fn, "full_value_fn")

        def snapshot_step():
            value, grads, finite = pipeline.finalize(
                pipeline.partial_estimate(full_value_fn, key, params, **options), params)
            return value, grads, finite

        def inner_step():
            at_snapshot = pipeline.partial_estimate(value_fn, key, state.snapshot,
                                                      weighting=_values_only(), **options)
            reference = (at_snapshot.values[:, 0] - at_snapshot.values[:, 1]) / (2 * smoothing)
            weighting = _central_minus(smoothing, reference)
            at_x = pipeline.partial_estimate(value_fn, key, params, weighting=weighting,
                                               **options)
            value, grads, finite = pipeline.finalize(at_x, params, weighting)
            grads = jax.tree.map(lambda g, s: g + s.astype(g.dtype), grads,
                                 state.snapshot_grads)
            return value, grads, finite & at_snapshot.finite

        due = state.count % snapshot_every == 0
        value, grads, finite = jax.lax.cond(due, snapshot_step, inner_step)
        # The state outside the cond: selects that XLA does in place in the donated state.
        new_state = SvrgState(*(jax.tree.map(lambda new, old: jnp.where(due, new, old), new, old)
                                for new, old in ((params, state.snapshot),
                                                 (grads, state.snapshot_grads))),
                              state.count + 1)
        queries = 2 * num_directions
        return pipeline.Estimate(value, grads, finite,
                                   jnp.where(due, queries, 2 * queries).astype(jnp.int32),
                                   new_state)

    return estimator_transform(estimate, seed, init_perturbation=init,
                                          name="zo_svrg")
