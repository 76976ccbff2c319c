r"""The bilinear test function of "ZO Optimization Finds Flat Minima" (Example 2.1, Figure 1).

For x = (y, z) with y, z ∈ R^d,

.. math:: h(y, z) = \tfrac12 (y^\top z - 1)^2, \qquad
    \operatorname{tr} \nabla^2 h(y, z) = \|y\|^2 + \|z\|^2.

Every point with yᵀz = 1 is a minimizer; the flattest ones have y = z, ‖y‖ = 1 and trace 2.
"""

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


def loss(params: Params) -> jax.Array:
    """Returns h(y, z) = (yᵀz − 1)² / 2.

    Args:
        params: dict with entries ``"y"`` and ``"z"``, both of shape (d,).

    Returns:
        The scalar loss.

    Example:
        >>> import jax.numpy as jnp
        >>> float(loss({"y": jnp.ones(2), "z": jnp.ones(2)}))
        0.5
    """
    return 0.5 * (jnp.vdot(params["y"], params["z"]) - 1.0) ** 2


def hessian_trace(params: Params) -> jax.Array:
    """Returns the closed-form trace of the Hessian, tr ∇²h(y, z) = ‖y‖² + ‖z‖².

    The Hessian is [[z zᵀ, z yᵀ + (yᵀz − 1) I], [y zᵀ + (yᵀz − 1) I, y yᵀ]]; only the
    diagonal blocks contribute to the trace.

    Args:
        params: dict with entries ``"y"`` and ``"z"``, both of shape (d,).

    Returns:
        The scalar trace.

    Example:
        >>> import jax.numpy as jnp
        >>> float(hessian_trace({"y": jnp.ones(3), "z": jnp.zeros(3)}))
        3.0
    """
    return jnp.vdot(params["y"], params["y"]) + jnp.vdot(params["z"], params["z"])


def init_params(key: jax.Array, dim: int = 100, scale: float = 0.88) -> Params:
    """Draws the starting point y, z ~ N(0, scale² I_dim) (float32).

    The paper's figure starts near trace 155, which matches scale ≈ 0.88 for dim = 100
    (E tr = 2 · dim · scale²); the public script uses scale = 1 (trace ≈ 200).

    Args:
        key: typed PRNG key (``jax.random.key``), split into one key for y and one for z.
        dim: dimension d of y and of z (static).
        scale: standard deviation σ of every coordinate.

    Returns:
        ``{"y": (dim,), "z": (dim,)}`` float32 arrays.

    Example:
        >>> import jax
        >>> params = init_params(jax.random.key(0), dim=3)
        >>> params["y"].shape, params["z"].dtype
        ((3,), dtype('float32'))
    """
    key_y, key_z = jax.random.split(key)
    y = scale * jax.random.normal(key_y, (dim,), jnp.float32)
    z = scale * jax.random.normal(key_z, (dim,), jnp.float32)
    return {"y": y, "z": z}
