r"""Perturbations: the directions a zeroth-order estimator probes, and their state.

A :class:`Perturbation` is the first stage of every estimator (see docs/guides/architecture.md):
four pure functions in the shape of optax's ``GradientTransformation``,

- ``init(params) -> state`` (``()`` for a stateless perturbation),
- ``prepare(key, params, state) -> context``: choices shared by every direction of a step (the
  block a block-coordinate method perturbs, say),
- ``sample(key, params, state, context) -> direction``: one direction, a pytree with the
  structure, shapes and dtypes of ``params`` (``params`` may hold ``jax.ShapeDtypeStruct``
  leaves: only shapes and dtypes are read),
- ``update(state, key, params, values, **extra_args) -> state`` after the step, from the step's
  key (direction ``i`` is ``sample(fold_in(key, i), ...)``: it is regenerated, never stored) and
  the objective values ``values`` (q, k) the step evaluated,

plus ``cov_matvec(state, v) -> Σ v``, the covariance :math:`\Sigma = \mathbb{E}[u u^\top]`
applied to a vector (for tests; the d × d matrix is never formed). On a quadratic the central
two-point estimate then has mean :math:`\Sigma \nabla f`. A plain *sampler*
``sample(key, params) -> direction`` is a stateless perturbation (:func:`stateless`); every
``direction`` argument of zojax takes a name of :data:`SAMPLERS`, a sampler or a
:class:`Perturbation` (:func:`as_perturbation`).


Convention: every named sampler is *isotropic*, :math:`\mathbb{E}[u u^\top] = I` over the
flattened parameters of size :math:`d`, so a smoothing :math:`\lambda` is the same perturbation
size for every kind and :math:`\mathbb{E}[(u^\top g)\, u] = g`:

- ``gaussian``: :math:`u \sim N(0, I_d)`; the estimate's mean is :math:`\nabla f_\lambda`, the
  gradient of the Gaussian-smoothed :math:`f_\lambda(x) = \mathbb{E} f(x + \lambda u)`.
- ``sphere``: :math:`u = \sqrt{d}\,v`, :math:`v` uniform on the unit sphere; the mean is the
  gradient of :math:`f` averaged over the ball of radius :math:`\lambda\sqrt{d}`.
- ``rademacher``: independent :math:`u_i = \pm 1`; the mean is the expected finite-difference
  quotient, not the gradient of a smoothed function in general.
- ``coordinate``: :math:`u = \sqrt{d}\,e_i`, :math:`i` uniform (with replacement); likewise the
  mean finite-difference quotient. The *forward* scheme with coordinate directions is biased even
  on quadratics, by :math:`\frac{\lambda\sqrt{d}}{2}\operatorname{diag}\nabla^2 f`.

All four are unbiased for :math:`\nabla f` on quadratics with the central scheme.

Streams (``stream=``, static, in every estimator that takes a ``direction``; :data:`STREAMS`):

- ``"jax"`` (the default): ``jax.random``'s numbers, bit for bit (``jax.random.normal`` /
  ``rademacher`` of the leaf's split of the key), so every result reproduces.
- ``"fast"``: cheaper numbers from the same Threefry hash, for ``"gaussian"`` and
  ``"rademacher"`` only (:func:`fast_gaussian`, :func:`packed_rademacher`): each hash gives 64
  bits (``jax.random`` XORs its two words into 32), and an entry is a standardized binomial of
  64 bits (a population count instead of erf⁻¹) or one of 64 signs. Still isotropic and
  symmetric, so every estimate keeps its mean on quadratics; the Gaussian is approximate (65
  values in [−8, 8], the normal's moments up to the third, a fourth moment 3 − 1/32). What it
  buys, measured: ``benchmarks/streams.py``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zojax import _cpu, _threefry

Sampler = Callable[[jax.Array, object], object]

# A step's shared draws (``prepare``'s block, a held basis) come from fold_in(key, CONTEXT_TAG);
# direction i from fold_in(key, i), i < num_directions: independent of each other.
CONTEXT_TAG = np.uint32(2**32 - 1)


class Perturbation(NamedTuple):
    """A perturbation stage: ``init``, ``prepare``, ``sample``, ``update``, ``cov_matvec``.

    See the module docstring for each function's signature. A stateful perturbation (``init``
    returns a non-empty pytree) keeps its state in the transform's
    ``TwoPointState.perturbation_state``; the pure estimators take it as the keyword argument
    ``perturbation_state``.
    """

    init: Callable[[Any], Any]
    prepare: Callable[[jax.Array, Any, Any], Any]
    sample: Callable[[jax.Array, Any, Any, Any], Any]
    update: Callable[..., Any]
    cov_matvec: Callable[[Any, Any], Any]
    # Optional: sample_leaf(key, params, state, context, index, rows=None) -> leaf ``index`` of
    # ``sample(key, params, state, context)`` (flattened order), or only its rows ``rows``
    # (an int array; first axis) when given: the low-memory mode draws what each use needs.
    sample_leaf: Callable[..., Any] | None = None


def _no_state(params):
    del params
    return ()


def _no_context(key, params, state):
    del key, params, state
    return ()


def _keep_state(state, key, params, values, **extra_args):
    del key, params, values, extra_args
    return state


def _identity(state, v):
    del state
    return v


def stateless(sample: Sampler, cov_matvec: Callable | None = None,
              sample_leaf: Callable | None = None) -> Perturbation:
    """The stateless :class:`Perturbation` of a sampler ``sample(key, params) -> direction``.

    ``cov_matvec(v) -> Σ v`` defaults to the identity: zojax's samplers are isotropic.
    ``sample_leaf(key, params, index, rows=None)``: one leaf of ``sample(key, params)`` (or its
    rows), for the low-memory mode (see :class:`Perturbation`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> perturbation = stateless(gaussian)
        >>> state = perturbation.init(jnp.zeros(3))
        >>> u = perturbation.sample(jax.random.key(0), jnp.zeros(3), state, ())
        >>> bool(jnp.array_equal(u, gaussian(jax.random.key(0), jnp.zeros(3))))
        True
    """
    matvec = _identity if cov_matvec is None else (lambda state, v: cov_matvec(v))
    leaf = None if sample_leaf is None else (
        lambda key, params, state, context, index, rows=None: sample_leaf(key, params, index,
                                                                          rows))
    return Perturbation(_no_state, _no_context,
                        lambda key, params, state, context: sample(key, params),
                        _keep_state, matvec, leaf)


def is_stateless(perturbation: Perturbation) -> bool:
    """Whether ``perturbation`` was built by :func:`stateless` (no state, no context): its
    directions are a function of the key alone."""
    return perturbation.init is _no_state and perturbation.prepare is _no_context


def as_perturbation(direction, stream: str = "jax") -> Perturbation:
    """The :class:`Perturbation` of a ``direction`` argument: a name, a sampler or one itself,
    drawn from the random stream ``stream`` (a name in :data:`STREAMS`).

    Raises:
        ValueError: ``direction`` is none of these (the message lists the names); ``stream`` is
            not a stream, or one ``direction`` cannot be drawn from (the message names both).
    """
    if not (isinstance(stream, str) and stream in STREAMS):
        raise ValueError(f"stream must be one of {tuple(STREAMS)}, got {stream!r} (a static "
                         "option).")
    if stream != "jax":
        names = STREAMS[stream]
        if isinstance(direction, str) and direction in names:
            return names[direction]
        raise ValueError(
            f"stream={stream!r} draws the directions {tuple(names)} only; direction="
            f"{direction!r} cannot be drawn from it (use stream='jax' for it).")
    if isinstance(direction, Perturbation):
        return direction
    if isinstance(direction, str) and direction in SAMPLERS:
        return PERTURBATIONS[direction]
    if callable(direction):
        return stateless(direction)
    raise ValueError(
        f"direction must be one of {tuple(SAMPLERS)}, a callable sample(key, params) or a "
        f"zojax.directions.Perturbation, got {direction!r}.")


def is_stateful(perturbation: Perturbation, params) -> bool:
    """Whether ``perturbation.init(params)`` holds any array (read from shapes only)."""
    return bool(jax.tree.leaves(jax.eval_shape(perturbation.init, params)))


def check_direction(direction, params, name: str = "direction") -> None:
    """Raises ValueError naming the leaf where ``direction`` differs from ``params`` in
    structure, shape or dtype (both may hold ``jax.ShapeDtypeStruct`` leaves)."""
    expected, got = jax.tree.structure(params), jax.tree.structure(direction)
    if expected != got:
        raise ValueError(f"{name}: a sampled direction must have the structure of params, "
                         f"{expected}; got {got}.")
    for (path, leaf), u in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(direction)):
        if (u.shape, u.dtype) != (leaf.shape, leaf.dtype):
            where = "params" + jax.tree_util.keystr(path)
            raise ValueError(
                f"{name}: the sampled direction's leaf {where} has shape {u.shape} and dtype "
                f"{u.dtype}; the parameter has shape {leaf.shape} and dtype {leaf.dtype}.")


def _leaf_keys(key, params):
    leaves, treedef = jax.tree.flatten(params)
    return leaves, treedef, jax.random.split(key, max(len(leaves), 1))


def num_params(params) -> int:
    """Total number of scalars in a pytree (static)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def gaussian(key, params):
    """Standard normal directions, ``u ~ N(0, I)``, so ``E[u uᵀ] = I``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> u = gaussian(jax.random.key(0), {"w": jnp.zeros(3)})
        >>> u["w"].shape
        (3,)
    """
    leaves, treedef, keys = _leaf_keys(key, params)
    return treedef.unflatten(
        [_cpu.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def _leaf_sampler(draw, draw_rows):
    """``sample_leaf(key, params, index, rows=None)`` of a sampler that draws each leaf with
    ``draw(key_leaf, shape, dtype)`` from its own split of the key."""
    def sample_leaf(key, params, index, rows=None):
        leaves = jax.tree.leaves(params)
        leaf, leaf_key = leaves[index], jax.random.split(key, max(len(leaves), 1))[index]
        if rows is not None and jnp.size(rows) < leaf.shape[0]:  # else the whole leaf is less
            part = draw_rows(leaf_key, leaf.shape, leaf.dtype, rows)
            if part is not None:
                return part
        whole = draw(leaf_key, leaf.shape, leaf.dtype)
        return whole if rows is None else jnp.take(whole, rows, axis=0)

    return sample_leaf


def rademacher(key, params):
    """Independent ±1 entries, so ``E[u uᵀ] = I``."""
    leaves, treedef, keys = _leaf_keys(key, params)
    return treedef.unflatten(
        [_cpu.rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def sphere(key, params):
    """``√d · v`` with ``v`` uniform on the unit sphere of all ``d`` parameters; ``E[u uᵀ] = I``."""
    leaves, treedef, keys = _leaf_keys(key, params)
    normals = [_cpu.normal(k, leaf.shape, jnp.float32) for k, leaf in zip(keys, leaves)]
    sq_norm = sum(jnp.sum(jnp.square(n)) for n in normals)
    scale = jnp.sqrt(num_params(params) / sq_norm)
    return treedef.unflatten(
        [(n * scale).astype(leaf.dtype) for n, leaf in zip(normals, leaves)]
    )


def fast_gaussian(key, params):
    """The ``"gaussian"`` directions of the fast stream: each entry ``(ones − 32) / 4`` over
    the 64 bits of one Threefry hash, a standardized binomial: mean 0, ``E[u uᵀ] = I``,
    symmetric, approximately normal (see the module doc). Not ``jax.random``'s numbers.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> u = fast_gaussian(jax.random.key(0), {"w": jnp.zeros(3)})
        >>> u["w"].shape
        (3,)
    """
    leaves, treedef, keys = _leaf_keys(key, params)
    return treedef.unflatten(
        [_threefry.fast_normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


def packed_rademacher(key, params):
    """The ``"rademacher"`` directions of the fast stream: independent ±1 entries, 64 from each
    Threefry hash (32 from each of its words), so ``E[u uᵀ] = I``. Not ``jax.random``'s
    numbers."""
    leaves, treedef, keys = _leaf_keys(key, params)
    return treedef.unflatten(
        [_threefry.packed_rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


def coordinate(key, params):
    """``√d · e_i`` with the coordinate ``i`` uniform over all ``d`` parameters; ``E[u uᵀ] = I``."""
    leaves, treedef = jax.tree.flatten(params)
    dim = num_params(params)
    index = jax.random.randint(key, (), 0, dim)
    out, offset = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        hot = jnp.arange(size) == index - offset
        out.append((hot * math.sqrt(dim)).astype(leaf.dtype).reshape(leaf.shape))
        offset += size
    return treedef.unflatten(out)


SAMPLERS: dict[str, Sampler] = {
    "gaussian": gaussian,
    "sphere": sphere,
    "rademacher": rademacher,
    "coordinate": coordinate,
}


# The one registry of direction names: every `direction` argument is checked against it.
PERTURBATIONS: dict[str, Perturbation] = {name: stateless(fn) for name, fn in SAMPLERS.items()}
PERTURBATIONS["gaussian"] = stateless(gaussian, sample_leaf=_leaf_sampler(
    _cpu.normal, _threefry.normal_rows))
PERTURBATIONS["rademacher"] = stateless(rademacher, sample_leaf=_leaf_sampler(
    _cpu.rademacher, _threefry.rademacher_rows))

# The directions of each random stream (``stream=``); "jax" holds every name above.
STREAMS: dict[str, dict[str, Perturbation]] = {
    "jax": PERTURBATIONS,
    "fast": {
        "gaussian": stateless(fast_gaussian, sample_leaf=_leaf_sampler(
            _threefry.fast_normal, _threefry.fast_normal_rows)),
        "rademacher": stateless(packed_rademacher, sample_leaf=_leaf_sampler(
            _threefry.packed_rademacher, _threefry.packed_rademacher_rows)),
    },
}
