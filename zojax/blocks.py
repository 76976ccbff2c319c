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

from zojax import _checks, _cpu, directions, weightings

FISHERS = ("softmax", "gaussian")
JACOBIANS = ("zeroth_order", "autodiff")
# prepare() draws the step's block from fold_in(key, BLOCK_TAG), independent of the directions.
BLOCK_TAG = directions.CONTEXT_TAG


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


def flat_dtype(params):
    return jnp.result_type(*(leaf.dtype for leaf in jax.tree.leaves(params)))


def to_flat(tree):
    return ravel_pytree(tree)[0]


def to_tree(flat, like):
    """The inverse of :func:`to_flat` for the shapes and dtypes of ``like`` (which may hold
    ``jax.ShapeDtypeStruct`` leaves: ``ravel_pytree``'s unravel needs arrays)."""
    leaves, treedef = jax.tree.flatten(like)
    out, offset = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        out.append(flat[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype))
        offset += size
    return treedef.unflatten(out)


def pad_blocks(flat, lay: Layout):
    return jnp.pad(flat, (0, lay.num_blocks * lay.size - lay.dim))


def embed(block, b, like, lay: Layout):
    """The pytree like ``like`` that is ``block`` (N,) on block ``b`` and zero elsewhere."""
    zeros = jnp.zeros(lay.num_blocks * lay.size, block.dtype)
    return to_tree(lax.dynamic_update_slice(zeros, block, (b * lay.size,))[:lay.dim], like)


def block_index(key, lay: Layout):
    return jax.random.randint(jax.random.fold_in(key, BLOCK_TAG), (), 0, lay.num_blocks)


def block_normal(key, like, shape):
    return _cpu.normal(key, shape, flat_dtype(like))


def coordinate_block(key, b, like, lay: Layout):
    size = lay.block_size(b)
    index = jax.random.randint(key, (), 0, size)
    hot = jnp.arange(lay.size) == index
    return (hot * jnp.sqrt(size.astype(jnp.float32))).astype(flat_dtype(like))


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
    padded = pad_blocks(to_flat(params), lay)
    start = block * lay.size
    z0 = lax.dynamic_slice(padded, (start,), (lay.size,))

    def outputs_at(z):
        return output_fn(to_tree(lax.dynamic_update_slice(padded, z, (start,))[:lay.dim],
                                  params))

    base = outputs_at(z0)
    size = lay.block_size(block)
    accumulate = weightings.accumulator_dtype(base.dtype)
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


def fisher_from_jacobian(base, jac, fisher: str, num_inputs):
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
    fisher_matrix = fisher_from_jacobian(base, jac, fisher, num_fisher_inputs)
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


_MOVED = {"block_perturbation": "block_two_point", "BLOCK_DIRECTIONS": "block_two_point",
          **{name: "natural" for name in ("NaturalState", "NaturalOptions", "validate_natural",
                                          "refresh", "natural_perturbation")}}


def __getattr__(name):
    """The ZO-NP and ZO-I stages moved to :mod:`zojax.methods` (this release re-exports them)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"zojax.methods.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'zojax.blocks' has no attribute {name!r}")
