r"""Samplers of perturbation directions.

A *sampler* is a function ``sample(key, params) -> direction`` that returns a pytree with the
structure, shapes and dtypes of ``params`` (``params`` may hold ``jax.ShapeDtypeStruct`` leaves:
only shapes and dtypes are read). It is the single extension point for shaped perturbations
(Fisher-shaped, diagonal-Hessian, low-rank, sparse masks): any sampler plugs into
:func:`zojax.zo_grad` and :func:`zojax.two_point` through their ``direction`` argument.

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
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Sampler = Callable[[jax.Array, object], object]


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
        [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def rademacher(key, params):
    """Independent ±1 entries, so ``E[u uᵀ] = I``."""
    leaves, treedef, keys = _leaf_keys(key, params)
    return treedef.unflatten(
        [jax.random.rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def sphere(key, params):
    """``√d · v`` with ``v`` uniform on the unit sphere of all ``d`` parameters; ``E[u uᵀ] = I``."""
    leaves, treedef, keys = _leaf_keys(key, params)
    normals = [jax.random.normal(k, leaf.shape, jnp.float32) for k, leaf in zip(keys, leaves)]
    sq_norm = sum(jnp.sum(jnp.square(n)) for n in normals)
    scale = jnp.sqrt(num_params(params) / sq_norm)
    return treedef.unflatten(
        [(n * scale).astype(leaf.dtype) for n, leaf in zip(normals, leaves)]
    )


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


def get_sampler(direction: str | Sampler) -> Sampler:
    """Returns the sampler named ``direction``, or ``direction`` itself when it is callable."""
    if callable(direction):
        return direction
    if isinstance(direction, str) and direction in SAMPLERS:
        return SAMPLERS[direction]
    raise ValueError(
        f"direction must be one of {tuple(SAMPLERS)} or a callable sample(key, params), "
        f"got {direction!r}."
    )
