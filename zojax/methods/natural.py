r"""ZO-NP: natural (Fisher-shaped, block-diagonal) perturbations, their Fisher refresh and the
transform (the forms: :mod:`zojax.blocks`)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding

from zojax import _checks, pipeline, weightings
from zojax.blocks import (
    FISHERS,
    JACOBIANS,
    Layout,
    block_fisher,
    block_index,
    block_normal,
    covariance_factor,
    embed,
    flat_dtype,
    layout,
    pad_blocks,
    to_flat,
    to_tree,
)
from zojax.directions import Perturbation
from zojax.transform import estimator_transform


class NaturalState(NamedTuple):
    """State of :func:`natural_perturbation` (``M`` slots of blocks, ``B`` blocks, ``N`` size).

    ``fisher`` and ``factor`` are views of ``matrices``: a refresh writes a block's F and L in one
    in-place update (written separately, the second write's inputs would read the first array
    after it was overwritten, and XLA copies the whole array to keep them apart).
    """

    # (M, 2, N, N) float32: per slot, F_b (I when never set) and L_b (Σ_b = L_b L_bᵀ).
    matrices: jax.Array
    slot_of_block: jax.Array  # (B,) int32: each block's slot, -1 for none (Σ = I).
    block_of_slot: jax.Array  # (M,) int32: each slot's block, -1 when free.
    refreshed_at: jax.Array  # (M,) int32: the step of each slot's last refresh (-1: never).
    count: jax.Array  # int32 scalar: steps seen (a refresh when count % update_every == 0).
    num_refreshes: jax.Array  # int32 scalar: blocks refreshed so far.

    @property
    def fisher(self) -> jax.Array:
        """(M, N, N): the Fisher F_b of the block in each slot."""
        return self.matrices[:, 0]

    @property
    def factor(self) -> jax.Array:
        """(M, N, N): the factor L_b of the block in each slot."""
        return self.matrices[:, 1]


def validate_natural(max_block_size, fisher, damping, ema, update_every, num_fisher_inputs,
                     jacobian, block_coordinate, max_fisher_blocks):
    """Raises ValueError naming the first invalid argument of :func:`natural_perturbation`."""
    _checks.check_positive_int("max_block_size", max_block_size)
    _checks.check_choice("fisher", fisher, FISHERS)
    _checks.check_positive_finite("damping", damping)
    number = _checks.concrete_value(ema)
    if not isinstance(ema, jax.core.Tracer) and (number is None or not 0 < number <= 1):
        raise ValueError(f"ema must be a number in (0, 1], got {ema!r}.")
    _checks.check_int_like("update_every", update_every)
    _checks.check_int_like("num_fisher_inputs", num_fisher_inputs)
    _checks.check_choice("jacobian", jacobian, JACOBIANS)
    _checks.check_bool("block_coordinate", block_coordinate)
    _checks.check_positive_int("max_fisher_blocks", max_fisher_blocks, allow_none=True)


class NaturalOptions(NamedTuple):
    """The options of :func:`natural_perturbation` (validated by :func:`validate_natural`)."""

    max_block_size: int
    fisher: str = "softmax"
    damping: object = 0.1
    ema: object = 0.01
    update_every: object = 100
    num_fisher_inputs: object = 100
    jacobian: str = "zeroth_order"
    block_coordinate: bool = True
    max_fisher_blocks: int | None = None


def _num_slots(opts: NaturalOptions, lay: Layout) -> int:
    if opts.max_fisher_blocks is None:
        return lay.num_blocks
    slots = min(opts.max_fisher_blocks, lay.num_blocks)
    if slots < lay.num_blocks and not opts.block_coordinate:
        raise ValueError(
            f"max_fisher_blocks={opts.max_fisher_blocks} is below the {lay.num_blocks} blocks of "
            "params: keeping only some blocks' matrices needs block_coordinate=True (with "
            "block_coordinate=False every block is perturbed and refreshed each time).")
    return slots


def _refresh_block(opts: NaturalOptions, state, params, output_fn, b, due, enabled):
    """Refresh block ``b`` when ``due``, keeping it unless ``enabled``: ``(state, finite,
    queries)``.

    One ``lax.cond`` holds all of it, the writes included, so a step without a refresh touches
    none of the (M, N, N) arrays (they pass through the branch in place). ``due`` only depends
    on the step count: under a ``vmap`` over seeds it stays unbatched and the branch a real one
    (a batched predicate would compute both branches at every step). ``enabled`` only gates
    the write.
    """
    lay = layout(params, opts.max_block_size)

    def fresh(state):
        current = state.slot_of_block[b]
        has_slot = current >= 0
        # A block without a slot takes a free one, else the least recently refreshed one.
        free_first = jnp.where(state.block_of_slot < 0, -2, state.refreshed_at)
        slot = jnp.where(has_slot, current, jnp.argmin(free_first)).astype(jnp.int32)
        old = state.matrices[slot]
        old_fisher = old[0]
        new, finite, queries = block_fisher(output_fn, params, b, opts.max_block_size,
                                            fisher=opts.fisher, jacobian=opts.jacobian,
                                            num_fisher_inputs=opts.num_fisher_inputs)
        previous = jnp.where(has_slot, old_fisher, jnp.eye(lay.size, dtype=old_fisher.dtype))
        mixed = jnp.where(finite, opts.ema * new + (1 - opts.ema) * previous, previous)
        write = enabled & finite
        evicted = state.block_of_slot[slot]
        slot_of_block = state.slot_of_block.at[
            jnp.where(evicted >= 0, evicted, lay.num_blocks)].set(-1, mode="drop").at[b].set(slot)
        state = state._replace(
            matrices=state.matrices.at[slot].set(jnp.where(
                write, jnp.stack([mixed, covariance_factor(mixed, opts.damping)]), old)),
            slot_of_block=jnp.where(write, slot_of_block, state.slot_of_block),
            block_of_slot=jnp.where(write, state.block_of_slot.at[slot].set(b),
                                    state.block_of_slot),
            refreshed_at=jnp.where(write, state.refreshed_at.at[slot].set(state.count),
                                   state.refreshed_at),
            num_refreshes=state.num_refreshes + write.astype(jnp.int32))
        return state, finite, queries

    def skip(state):
        return state, jnp.array(True), jnp.zeros((), jnp.int32)

    return lax.cond(due, fresh, skip, state)


def refresh(opts: NaturalOptions, state: NaturalState, key, params, output_fn, enabled=True):
    """``(state, finite, num_queries)`` after a step of :func:`natural_perturbation`.

    At steps ``count % update_every == 0`` the Fisher of the step's block (of every block, with
    ``block_coordinate=False``) is computed (its queries counted) and, when ``enabled`` (the
    step's losses were finite) and finite itself, written; ``count`` advances by one.
    ``finite`` is False when a refresh met non-finite outputs.

    Raises:
        ValueError: ``output_fn`` is None (the message shows how to pass it).
    """
    if output_fn is None:
        raise ValueError(
            "natural needs the model outputs for its Fisher: pass output_fn at every update, "
            "opt.update(None, state, params, value_fn=lambda p: loss(p, batch), "
            "output_fn=lambda p: model.apply(p, batch_x)) (logits (n, classes) for "
            "fisher='softmax').")
    lay = layout(params, opts.max_block_size)
    due = state.count % opts.update_every == 0
    no_queries = jnp.zeros((), jnp.int32)
    if opts.block_coordinate:
        state, finite, queries = _refresh_block(opts, state, params, output_fn,
                                                block_index(key, lay), due, enabled)
    else:
        def every_block(state):
            def body(b, carry):
                state, ok, q = _refresh_block(opts, carry[0], params, output_fn, b, True,
                                              enabled)
                return state, carry[1] & ok, carry[2] + q

            return lax.fori_loop(0, lay.num_blocks, body, (state, jnp.array(True), no_queries))

        state, finite, queries = lax.cond(
            due, every_block, lambda state: (state, jnp.array(True), no_queries), state)
    return state._replace(count=state.count + 1), finite, queries


def natural_perturbation(max_block_size: int, *, fisher: str = "softmax", damping=0.1,
                         ema=0.01, update_every=100, num_fisher_inputs=100,
                         jacobian: str = "zeroth_order", block_coordinate: bool = True,
                         max_fisher_blocks: int | None = None) -> Perturbation:
    r"""The natural (Fisher-shaped, block-diagonal) perturbation of ZO-NP; see the module doc.

    Its state is a :class:`NaturalState`. ``update(state, key, params, values, *, output_fn)``
    is :func:`refresh` (``output_fn(params) -> outputs``, e.g. logits (n, classes); give it at
    every step: the refresh is a traced branch); a step whose ``values`` are not finite
    refreshes nothing.

    Args:
        max_block_size: :math:`N`, at most this many entries per block (static).
        fisher: ``"softmax"`` or ``"gaussian"``, the output-space Fisher :math:`G`.
        damping: :math:`\rho > 0` (may be traced).
        ema: :math:`\alpha \in (0, 1]`, the weight of a new Fisher (may be traced).
        update_every: steps between refreshes (an int, may be traced).
        num_fisher_inputs: the rows of the outputs the Fisher averages over (may be traced).
        jacobian: ``"zeroth_order"`` (output queries) or ``"autodiff"`` (``jax.jvp``).
        block_coordinate: perturb one sampled block per step (else every block at once).
        max_fisher_blocks: keep at most this many blocks' matrices (static; None: all); fewer
            than the blocks of the parameters needs ``block_coordinate=True``.

    Raises:
        ValueError: an invalid argument, named (at construction); ``max_fisher_blocks`` below
            the number of blocks with ``block_coordinate=False`` (at ``init``).
    """
    validate_natural(max_block_size, fisher, damping, ema, update_every, num_fisher_inputs,
                     jacobian, block_coordinate, max_fisher_blocks)
    opts = NaturalOptions(max_block_size, fisher, damping, ema, update_every,
                          num_fisher_inputs, jacobian, block_coordinate, max_fisher_blocks)

    def init(params):
        lay = layout(params, max_block_size)
        slots = _num_slots(opts, lay)
        dtype = weightings.accumulator_dtype(flat_dtype(params))
        eye = jnp.broadcast_to(jnp.eye(lay.size, dtype=dtype), (slots, 2, lay.size, lay.size))
        full = slots == lay.num_blocks  # then slot b holds block b, always
        block_ids = jnp.arange(lay.num_blocks, dtype=jnp.int32)
        return NaturalState(
            matrices=eye,
            slot_of_block=block_ids if full else jnp.full(lay.num_blocks, -1, jnp.int32),
            block_of_slot=block_ids if full else jnp.full(slots, -1, jnp.int32),
            refreshed_at=jnp.full(slots, -1, jnp.int32),
            count=jnp.zeros((), jnp.int32), num_refreshes=jnp.zeros((), jnp.int32))

    def prepare(key, params, state):
        if not block_coordinate:
            return ()
        lay = layout(params, max_block_size)
        b = block_index(key, lay)
        return b, state.slot_of_block[b]

    def sample(key, params, state, context):
        lay = layout(params, max_block_size)
        dtype = flat_dtype(params)
        if block_coordinate:
            b, slot = context
            r = block_normal(key, params, (lay.size,)).astype(state.matrices.dtype)
            shaped = state.matrices[jnp.maximum(slot, 0), 1] @ r
            if state.matrices.shape[0] < lay.num_blocks:  # a block without a slot: Σ = I
                shaped = jnp.where(slot >= 0, shaped, r)
            return embed(shaped.astype(dtype), b, params, lay)
        r = block_normal(key, params, (lay.num_blocks * lay.size,))
        r = r.reshape(lay.num_blocks, lay.size).astype(state.matrices.dtype)
        flat = jnp.einsum("bij,bj->bi", state.matrices[:, 1], r).astype(dtype).reshape(-1)
        return to_tree(flat[:lay.dim], params)

    def update(state, key, params, values, *, output_fn=None, **extra_args):
        del extra_args
        return refresh(opts, state, key, params, output_fn, jnp.all(jnp.isfinite(values)))[0]

    def cov_matvec(state, v):
        lay = layout(v, max_block_size)
        blocks = pad_blocks(to_flat(v), lay).reshape(lay.num_blocks, lay.size)
        blocks = blocks.astype(state.matrices.dtype)
        # Σ_b v_b = L_b (L_bᵀ v_b) for the blocks with a slot; the others keep v_b (Σ = I).
        held = jnp.where(state.block_of_slot >= 0, state.block_of_slot, lay.num_blocks)
        picked = blocks.at[held].get(mode="fill", fill_value=0)
        shaped = jnp.einsum("mij,mkj,mk->mi", state.factor, state.factor, picked)
        out = blocks.at[held].set(shaped, mode="drop").reshape(-1)[:lay.dim]
        if block_coordinate:
            out = out / lay.num_blocks
        return to_tree(out.astype(flat_dtype(v)), v)

    return Perturbation(init, prepare, sample, update, cov_matvec)


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
    pipeline.validate(smoothing, num_directions, directions_sharding=directions_sharding)
    opts = NaturalOptions(max_block_size, fisher, damping, ema, update_every, num_fisher_inputs,
                          jacobian, block_coordinate, max_fisher_blocks)
    perturbation = natural_perturbation(**opts._asdict())

    def estimate(key, value_fn, params, perturbation_state, *, output_fn=None, **extra_args):
        del extra_args
        partial = pipeline.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, scheme="forward", perturbation_state=perturbation_state,
            directions_sharding=directions_sharding)
        value, grads, finite = pipeline.finalize(partial, params)
        state, refreshed, queries = refresh(opts, perturbation_state, key, params, output_fn,
                                            finite)
        return pipeline.Estimate(value, grads, finite & refreshed, partial.num_queries + queries,
                                 state, nonfinite_handled=True)

    return estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                               name="natural")
