r"""Block-diagonal perturbations: natural (Fisher-shaped) ZO-NP, and ZO-I / ZO-coordinate on the
same blocks.

The flattened parameters (:func:`jax.flatten_util.ravel_pytree` order) are cut into
:math:`B = \lceil d / N \rceil` contiguous blocks of :math:`N` entries (:func:`partition_blocks`;
blocks straddle leaves, the last may be shorter). Internally each block is padded to :math:`N`
and the blocks are stacked, so that a traced block index selects one.

*Natural perturbations* (Sawada, Aoyama, Hikima, ICML 2025; the forms below are zojax's reading
of the paper and of its authors' preceding work). Per block :math:`b`,

.. math::

    F_b = \mathbb{E}_x\big[J_b^\top G\, J_b\big], \qquad
    \Sigma_b = (1 + \rho)\,(F_b + \rho I)^{-1} = L_b L_b^\top, \qquad
    \delta\theta = L_b r,\; r \sim N(0, I_N),

with :math:`J_b` the Jacobian of the model outputs with respect to the block, :math:`G` the
output-space Fisher (``"softmax"``: :math:`\operatorname{diag}(p) - pp^\top` of the softmax of
the outputs; ``"gaussian"``: :math:`I`), :math:`\rho` the damping. :math:`F_b` starts at
:math:`I` (so :math:`\Sigma_b = I`) and is refreshed as an EMA, :math:`F_b \leftarrow \alpha
F_b^{\text{new}} + (1 - \alpha) F_b`. The estimate is one-sided from one shared :math:`f(x)`,
:math:`\hat g = \frac1q\sum_i \frac{f(x + \mu\,\delta\theta_i) - f(x)}{\mu}\,\delta\theta_i`,
whose mean given the block is :math:`\Sigma_b \nabla_b f` on a quadratic (zero outside the
block): a damped natural-gradient step on one block.

Block-coordinate steps (the default): each step samples one block uniformly (from the step's
key, shared by all its directions) and perturbs only it; at steps ``count % update_every == 0``
that block's Fisher is refreshed. The unconditional covariance is then :math:`\frac1B
\operatorname{blockdiag}(\Sigma_b)` (``cov_matvec``). With ``block_coordinate=False`` every block
is perturbed at once and a refresh refreshes every block.

Storage: :math:`F_b` and :math:`L_b` for at most :math:`M` blocks (``max_fisher_blocks``), one
float32 array of shape :math:`(M, 2, N, N)`, :math:`2MN^2` numbers; :math:`\Sigma_b` is never
stored (:math:`L_b L_b^\top`). A step without a refresh reads one :math:`L_b` and writes nothing
of it; a refresh writes one slot in place, provided the optimizer state is donated to the
jitted step (``jax.jit(step, donate_argnums=...)``): otherwise every call copies the array.
A block without a slot uses :math:`\Sigma = I`; when every slot is taken, a refresh takes the
slot of the least recently refreshed block, which returns to :math:`I`.

The block Jacobian (:func:`block_jacobian`), column by column:

- ``"zeroth_order"``: forward differences along the block's coordinates, :math:`(o(\theta + h_j
  e_j) - o(\theta)) / h_j` with :math:`h_j = \sqrt{\epsilon}\max(1, |\theta_j|)` (the
  parameters' machine epsilon; error :math:`O(h\,\|\partial^2 o\|) + O(\epsilon\|o\|/h)`), from
  output queries only: :math:`N_b + 1` calls of ``output_fn``, each of ``n`` rows, so
  :math:`(N_b + 1)\,n` queries per refreshed block (:math:`N_b` its unpadded size).
- ``"autodiff"``: one ``jax.jvp`` of ``output_fn`` per coordinate (white-box models); counted as
  the ``n`` queries of the one primal call.

The Fisher weights the first ``num_fisher_inputs`` rows of the outputs.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from zojax import _backend, _checks, directions
from zojax.directions import Perturbation

FISHERS = ("softmax", "gaussian")
JACOBIANS = ("zeroth_order", "autodiff")
BLOCK_DIRECTIONS = ("gaussian", "coordinate")
# prepare() draws the step's block from fold_in(key, _BLOCK_TAG), independent of the directions.
_BLOCK_TAG = directions.CONTEXT_TAG


class Layout(NamedTuple):
    """The static block layout of a parameter pytree."""

    dim: int  # d, the number of parameters.
    size: int  # N, the padded block size: min(max_block_size, d).
    num_blocks: int  # B = ceil(d / N).

    def block_size(self, b):
        """The unpadded size of block ``b`` (may be traced)."""
        return jnp.minimum(self.size, self.dim - b * self.size)


def layout(params, max_block_size: int) -> Layout:
    """The :class:`Layout` of ``params`` (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    dim = directions.num_params(params)
    size = max(1, min(max_block_size, dim))
    return Layout(dim, size, max(1, -(-dim // size)))


def partition_blocks(params, max_block_size: int) -> list[tuple[int, int]]:
    """Contiguous blocks of at most ``max_block_size`` entries of the flattened ``params``.

    The order is :func:`jax.flatten_util.ravel_pytree`'s; blocks may straddle leaves, and the
    ``(start, stop)`` pairs cover every entry once.

    Raises:
        ValueError: ``max_block_size`` is not an int >= 1.

    Example:
        >>> import jax.numpy as jnp
        >>> partition_blocks({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}, 3)
        [(0, 3), (3, 6), (6, 7)]
    """
    _checks.check_positive_int("max_block_size", max_block_size)
    lay = layout(params, max_block_size)
    return [(b * lay.size, min((b + 1) * lay.size, lay.dim)) for b in range(lay.num_blocks)]


# ---------------------------------------------------------------------------------------------
# Flat vectors and blocks.


def _flat_dtype(params):
    return jnp.result_type(*(leaf.dtype for leaf in jax.tree.leaves(params)))


def _to_flat(tree):
    return ravel_pytree(tree)[0]


def _to_tree(flat, like):
    """The inverse of :func:`_to_flat` for the shapes and dtypes of ``like`` (which may hold
    ``jax.ShapeDtypeStruct`` leaves: ``ravel_pytree``'s unravel needs arrays)."""
    leaves, treedef = jax.tree.flatten(like)
    out, offset = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        out.append(flat[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype))
        offset += size
    return treedef.unflatten(out)


def _padded(flat, lay: Layout):
    return jnp.pad(flat, (0, lay.num_blocks * lay.size - lay.dim))


def _embed(block, b, like, lay: Layout):
    """The pytree like ``like`` that is ``block`` (N,) on block ``b`` and zero elsewhere."""
    zeros = jnp.zeros(lay.num_blocks * lay.size, block.dtype)
    return _to_tree(lax.dynamic_update_slice(zeros, block, (b * lay.size,))[:lay.dim], like)


def _block_index(key, lay: Layout):
    return jax.random.randint(jax.random.fold_in(key, _BLOCK_TAG), (), 0, lay.num_blocks)


def _block_normal(key, like, shape):
    return _backend.normal(key, shape, _flat_dtype(like))


def _coordinate_block(key, b, like, lay: Layout):
    size = lay.block_size(b)
    index = jax.random.randint(key, (), 0, size)
    hot = jnp.arange(lay.size) == index
    return (hot * jnp.sqrt(size.astype(jnp.float32))).astype(_flat_dtype(like))


# ---------------------------------------------------------------------------------------------
# ZO-I and ZO-coordinate on blocks (stateless).


def block_perturbation(max_block_size: int, direction: str = "gaussian", *,
                       block_coordinate: bool = True) -> Perturbation:
    r"""ZO-I (``"gaussian"``, :math:`r \sim N(0, I)`) or ZO-co (``"coordinate"``,
    :math:`\sqrt{N_b}\,e_j`, :math:`j` uniform in the block) on the blocks of
    :func:`partition_blocks`.

    With ``block_coordinate`` one block per step (drawn in ``prepare``) is perturbed, so
    :math:`\mathbb{E}[u u^\top \mid b] = I_b` and :math:`\mathbb{E}[u u^\top] = I / B`; without,
    every block at once: :math:`N(0, I_d)`, or :math:`\sqrt{d}\,e_i` with :math:`i` uniform over
    all coordinates (:func:`zojax.directions.coordinate`).
    """
    _checks.check_positive_int("max_block_size", max_block_size)
    _checks.check_choice("direction", direction, BLOCK_DIRECTIONS)
    _check_bool("block_coordinate", block_coordinate)

    def init(params):
        del params
        return ()

    def prepare(key, params, state):
        del state
        return _block_index(key, layout(params, max_block_size)) if block_coordinate else ()

    def sample(key, params, state, context):
        del state
        lay = layout(params, max_block_size)
        if block_coordinate:
            if direction == "gaussian":
                block = _block_normal(key, params, (lay.size,))
            else:
                block = _coordinate_block(key, context, params, lay)
            return _embed(block, context, params, lay)
        if direction == "coordinate":
            return directions.coordinate(key, params)
        flat = _block_normal(key, params, (lay.num_blocks * lay.size,))
        return _to_tree(flat[:lay.dim], params)

    def update(state, key, params, values, **extra_args):
        del key, params, values, extra_args
        return state

    def cov_matvec(state, v):
        del state
        if not block_coordinate:
            return v
        num_blocks = layout(v, max_block_size).num_blocks
        return jax.tree.map(lambda x: x / num_blocks, v)

    return Perturbation(init, prepare, sample, update, cov_matvec)


# ---------------------------------------------------------------------------------------------
# The Fisher of a block, its covariance factor.


def block_jacobian(output_fn, params, block: int | jax.Array, max_block_size: int, *,
                   jacobian: str = "zeroth_order"):
    r"""``(outputs, J)``: the outputs :math:`o(\theta)` (``(n, ...)``) and the Jacobian of
    ``output_fn`` with respect to block ``block``, shape ``(N, *outputs.shape)`` (column ``j``
    first; columns of the padding are zero).

    ``"zeroth_order"``: forward differences from :math:`N_b + 1` output queries (see the module
    docstring); ``"autodiff"``: one ``jax.jvp`` per coordinate. Columns are computed one after
    the other (``lax.map``), so memory holds one evaluation at a time.
    """
    _checks.check_choice("jacobian", jacobian, JACOBIANS)
    lay = layout(params, max_block_size)
    padded = _padded(_to_flat(params), lay)
    start = block * lay.size
    z0 = lax.dynamic_slice(padded, (start,), (lay.size,))

    def outputs_at(z):
        return output_fn(_to_tree(lax.dynamic_update_slice(padded, z, (start,))[:lay.dim],
                                  params))

    base = outputs_at(z0)
    size = lay.block_size(block)
    accumulate = _backend.accumulator_dtype(base.dtype)
    if jacobian == "zeroth_order":
        eps = jnp.finfo(z0.dtype).eps
        step = jnp.sqrt(eps).astype(z0.dtype) * jnp.maximum(1, jnp.abs(z0))
        step = (z0 + step) - z0  # the step actually taken, exactly representable

        def column(j):
            def probe():
                moved = outputs_at(z0.at[j].add(step[j]))
                return ((moved.astype(accumulate) - base.astype(accumulate))
                        / step[j].astype(accumulate))

            return lax.cond(j < size, probe, lambda: jnp.zeros(base.shape, accumulate))
    else:
        def column(j):
            tangent = jnp.zeros_like(z0).at[j].set(1)
            return jax.jvp(outputs_at, (z0,), (tangent,))[1].astype(accumulate)

    return base, lax.map(column, jnp.arange(lay.size))


def _fisher_from_jacobian(base, jac, fisher: str, num_inputs):
    """``F = Σ_i w_i J_iᵀ G_i J_i`` over the rows of the outputs, ``w_i = [i < m] / min(n, m)``.

    Softmax: ``G_i = diag(p_i) − p_i p_iᵀ``, so ``F = R Rᵀ − V Vᵀ`` with ``R = J·√(w p)`` (the
    Jacobian scaled in place: one Jacobian-sized buffer) and ``V = √w Σ_c p_c J_c`` (N, n).
    """
    if fisher == "softmax" and (base.ndim != 2 or base.shape[1] < 2):
        raise ValueError("fisher='softmax' needs output_fn to return logits of shape (n, "
                         f"classes) with classes >= 2; got outputs of shape {base.shape}.")
    if base.ndim < 1:
        raise ValueError("output_fn must return outputs with a leading axis of inputs, "
                         "(n, ...); got a scalar.")
    jac = jac.reshape(jac.shape[0], base.shape[0], -1)  # (N, n, outputs per row)
    n = jac.shape[1]
    weights = (jnp.arange(n) < num_inputs) / jnp.minimum(n, num_inputs).astype(jac.dtype)
    if fisher == "softmax":
        p = jax.nn.softmax(base.astype(jac.dtype), axis=-1)
        mean = jnp.einsum("jnc,nc->jn", jac, p) * jnp.sqrt(weights)  # V
        scaled = (jac * jnp.sqrt(weights[:, None] * p)).reshape(jac.shape[0], -1)  # R
        fisher_matrix = scaled @ scaled.T - mean @ mean.T
    else:
        scaled = (jac * jnp.sqrt(weights)[:, None]).reshape(jac.shape[0], -1)
        fisher_matrix = scaled @ scaled.T
    return 0.5 * (fisher_matrix + fisher_matrix.T)


def block_fisher(output_fn, params, block, max_block_size: int, *, fisher: str = "softmax",
                 jacobian: str = "zeroth_order", num_fisher_inputs=100):
    r"""``(F_b, finite, num_queries)``: the Fisher :math:`\mathbb{E}_x[J_b^\top G J_b]` of block
    ``block`` from the first ``num_fisher_inputs`` rows of ``output_fn(params)``.

    ``F_b`` is (N, N) float32, symmetric positive semi-definite up to rounding; on the padding of
    the last block it is the identity. ``finite`` says whether the outputs and ``F_b`` are
    finite; ``num_queries`` counts the rows of every ``output_fn`` call (module docstring).
    """
    _checks.check_choice("fisher", fisher, FISHERS)
    lay = layout(params, max_block_size)
    base, jac = block_jacobian(output_fn, params, block, max_block_size, jacobian=jacobian)
    fisher_matrix = _fisher_from_jacobian(base, jac, fisher, num_fisher_inputs)
    valid = jnp.arange(lay.size) < lay.block_size(block)
    fisher_matrix = jnp.where(valid[:, None] & valid[None, :], fisher_matrix,
                              jnp.diag(jnp.where(valid, 0, 1).astype(fisher_matrix.dtype)))
    finite = jnp.all(jnp.isfinite(fisher_matrix)) & jnp.all(jnp.isfinite(base))
    calls = lay.block_size(block) + 1 if jacobian == "zeroth_order" else 1
    rows = base.shape[0] if base.ndim else 1
    return fisher_matrix, finite, jnp.asarray(calls * rows, jnp.int32)


def covariance_factor(fisher, damping):
    r"""The lower Cholesky factor :math:`L` of :math:`\Sigma = (1 + \rho)(F + \rho I)^{-1}`.

    With :math:`PAP = CC^\top` (:math:`A = F + \rho I`, :math:`P` the reversal),
    :math:`L = \sqrt{1+\rho}\;P C^{-\top} P` is lower triangular with a positive diagonal and
    :math:`LL^\top = \Sigma`; :math:`F = I` gives :math:`L = I` up to rounding.

    It never fails for a finite symmetric positive semi-definite ``fisher`` and
    :math:`\rho > 0`: :math:`A` is scaled by the power of 2 nearest its largest diagonal entry
    (exact; no overflow for huge :math:`F`), and when the Cholesky factorization breaks down in
    floating point (condition number beyond :math:`1/\epsilon`) it is repeated with
    :math:`N\epsilon\,\|A\|` added to the diagonal. :math:`\Sigma` is then still a damped
    inverse (eigenvalues in :math:`[0, (1+\rho)/\rho]`, huge directions damped), but the
    directions that :math:`F` leaves below that resolution are damped too.
    """
    fisher = jnp.asarray(fisher)
    n = fisher.shape[-1]
    eye = jnp.eye(n, dtype=fisher.dtype)
    damping = jnp.asarray(damping, fisher.dtype)
    a = 0.5 * (fisher + fisher.T) + damping * eye
    scale = jnp.exp2(jnp.round(jnp.log2(jnp.max(jnp.diag(a)))))  # a power of 2: exact
    reversed_a = (a / scale)[::-1, ::-1]
    chol = jnp.linalg.cholesky(reversed_a)
    jitter = n * jnp.finfo(fisher.dtype).eps
    chol = lax.cond(jnp.all(jnp.isfinite(chol)), lambda: chol,
                    lambda: jnp.linalg.cholesky(reversed_a + jitter * eye))
    inv_t = jax.scipy.linalg.solve_triangular(chol, eye, lower=True, trans="T")
    return jnp.sqrt((1 + damping) / scale) * inv_t[::-1, ::-1]


# ---------------------------------------------------------------------------------------------
# The natural perturbation (stateful).


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


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


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
    _check_bool("block_coordinate", block_coordinate)
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
                                                _block_index(key, lay), due, enabled)
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
        dtype = _backend.accumulator_dtype(_flat_dtype(params))
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
        b = _block_index(key, lay)
        return b, state.slot_of_block[b]

    def sample(key, params, state, context):
        lay = layout(params, max_block_size)
        dtype = _flat_dtype(params)
        if block_coordinate:
            b, slot = context
            r = _block_normal(key, params, (lay.size,)).astype(state.matrices.dtype)
            shaped = state.matrices[jnp.maximum(slot, 0), 1] @ r
            if state.matrices.shape[0] < lay.num_blocks:  # a block without a slot: Σ = I
                shaped = jnp.where(slot >= 0, shaped, r)
            return _embed(shaped.astype(dtype), b, params, lay)
        r = _block_normal(key, params, (lay.num_blocks * lay.size,))
        r = r.reshape(lay.num_blocks, lay.size).astype(state.matrices.dtype)
        flat = jnp.einsum("bij,bj->bi", state.matrices[:, 1], r).astype(dtype).reshape(-1)
        return _to_tree(flat[:lay.dim], params)

    def update(state, key, params, values, *, output_fn=None, **extra_args):
        del extra_args
        return refresh(opts, state, key, params, output_fn, jnp.all(jnp.isfinite(values)))[0]

    def cov_matvec(state, v):
        lay = layout(v, max_block_size)
        blocks = _padded(_to_flat(v), lay).reshape(lay.num_blocks, lay.size)
        blocks = blocks.astype(state.matrices.dtype)
        # Σ_b v_b = L_b (L_bᵀ v_b) for the blocks with a slot; the others keep v_b (Σ = I).
        held = jnp.where(state.block_of_slot >= 0, state.block_of_slot, lay.num_blocks)
        picked = blocks.at[held].get(mode="fill", fill_value=0)
        shaped = jnp.einsum("mij,mkj,mk->mi", state.factor, state.factor, picked)
        out = blocks.at[held].set(shaped, mode="drop").reshape(-1)[:lay.dim]
        if block_coordinate:
            out = out / lay.num_blocks
        return _to_tree(out.astype(_flat_dtype(v)), v)

    return Perturbation(init, prepare, sample, update, cov_matvec)
