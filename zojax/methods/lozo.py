r"""LOZO (Chen et al. 2024): low-rank perturbations U Vᵀ of the matrix leaves, V held for
several steps."""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _checks, _cpu, directions
from zojax.methods.two_point import two_point


class LozoState(NamedTuple):
    """State of :func:`lozo_perturbation`: per 2-D leaf the held ``V`` (n × r; None elsewhere)."""

    v: Any  # tuple over the leaves of params: V of a matrix leaf, (1, r) zeros (unused) else.
    count: jax.Array  # int32 scalar: steps taken; V is redrawn when count % refresh_every == 0.


def lozo_perturbation(rank: int, refresh_every: int) -> directions.Perturbation:
    r"""Low-rank directions: :math:`u = U V^\top/\sqrt r` on every 2-D leaf (m × n), Gaussian
    elsewhere; :math:`U \in \mathbb{R}^{m\times r}` fresh for each direction,
    :math:`V \in \mathbb{R}^{n\times r}` drawn every ``refresh_every`` steps and held between
    (U, V standard normal).

    Covariance given the held V: :math:`\Sigma = I_m \otimes VV^\top/r` on a matrix leaf (the
    estimate's mean is :math:`\nabla_W f\, VV^\top/r`, the gradient's rows projected on V's
    span); averaged over V's draws :math:`\Sigma = I`. ``cov_matvec`` is the former, for the V
    the state holds (after a first step). The state is V: :math:`n r` numbers per matrix leaf.
    """

    def fresh(key, params):
        leaves = jax.tree.leaves(params)
        keys = jax.random.split(jax.random.fold_in(key, directions.CONTEXT_TAG), len(leaves))
        return tuple(_cpu.normal(k, (p.shape[1], rank), p.dtype) if p.ndim == 2 else
                     jnp.zeros((1, rank), p.dtype)
                     for k, p in zip(keys, leaves))

    def init(params):
        return LozoState(tuple(jnp.zeros((p.shape[1] if p.ndim == 2 else 1, rank), p.dtype)
                               for p in jax.tree.leaves(params)), jnp.zeros((), jnp.int32))

    def prepare(key, params, state):
        due = state.count % refresh_every == 0
        return jax.tree.map(lambda new, old: jnp.where(due, new, old), fresh(key, params),
                            state.v)

    def sample(key, params, state, v):  # directions.gaussian's keys, U on the matrix leaves
        del state
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, max(len(leaves), 1))
        return treedef.unflatten([
            _cpu.normal(k, p.shape, p.dtype) if p.ndim != 2 else
            _cpu.normal(k, (p.shape[0], rank), p.dtype) @ basis.T / math.sqrt(rank)
            for p, basis, k in zip(leaves, v, keys)])

    def update(state, key, params, values, **extra_args):
        del values, extra_args
        return LozoState(prepare(key, params, state), state.count + 1)

    def cov_matvec(state, v):
        leaves, treedef = jax.tree.flatten(v)
        return treedef.unflatten([x if x.ndim != 2 else x @ basis @ basis.T / rank
                                  for x, basis in zip(leaves, state.v)])

    return directions.Perturbation(init, prepare, sample, update, cov_matvec)


def lozo(smoothing, rank: int, *, refresh_every: int, num_directions: int = 1,
         scheme: str = "central", chunk_size: int | None = None, seed=0,
         directions_sharding: NamedSharding | None = None
         ) -> optax.GradientTransformationExtraArgs:
    r"""LOZO (Chen et al. 2024): :func:`zojax.two_point` with :func:`lozo_perturbation`.

    .. math:: \hat g_W = \frac1q\sum_i \frac{f(x + \lambda u_i) - f(x - \lambda u_i)}{2\lambda}
        \, \frac{U_i V^\top}{\sqrt r}

    on every 2-D leaf W (m × n), with :math:`V` (n × r) held for ``refresh_every`` steps (the
    paper's ν) and the :math:`U_i` (m × r) fresh; other leaves take Gaussian directions. Each
    step's estimate of a matrix leaf, :math:`(\sum_i c_i U_i) V^\top`, has rank ≤ r whatever
    q. Same queries, state (plus V) and non-finite policy as :func:`zojax.two_point`.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        rank: ``r ≥ 1`` (static), the rank of each matrix leaf's direction.
        refresh_every: ``ν ≥ 1`` (an int, may be injected): V is redrawn at steps 0, ν, 2ν, ...
        num_directions, scheme, chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = lozo(0.01, rank=1, refresh_every=10)
        >>> w = jnp.ones((4, 3))
        >>> g, _ = opt.update(None, opt.init(w), w, value_fn=lambda w: jnp.sum(w ** 2))
        >>> int(jnp.linalg.matrix_rank(g))
        1
    """
    _checks.check_positive_int("rank", rank)
    _checks.check_int_like("refresh_every", refresh_every)
    return two_point(smoothing, num_directions,
                                direction=lozo_perturbation(rank, refresh_every), scheme=scheme,
                                chunk_size=chunk_size, seed=seed,
                                directions_sharding=directions_sharding)
