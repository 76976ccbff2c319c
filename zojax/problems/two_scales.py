r"""Two curvature scales on one valley: the flattest trace and the smallest λ_max differ.

For x = (w, u, v) with w ∈ R and u, v ∈ R^n,

.. math::

    f(w, u, v) = \tfrac12 e^{a w} \|u\|^2 + \tfrac12 e^{-b w} \|v\|^2, \qquad a = 1/4,\ b = 1.

Every point with u = v = 0 is a minimizer (f = 0), and there the Hessian is diagonal:
0 along w, :math:`e^{aw}` on the n coordinates of u, :math:`e^{-bw}` on those of v. So, along
the valley,

- tr ∇²f = n (e^{aw} + e^{−bw}) is smallest where :math:`a e^{aw} = b e^{-bw}`, at
  w = log(b/a)/(a + b) = (4/5) log 4 ≈ 1.109 (trace n · 1.649, λ_max 1.320);
- λ_max = max(e^{aw}, e^{−bw}) is smallest where the two meet, at w = 0 (trace 2n, λ_max 1);
- tr ∇²f² = n (e^{2aw} + e^{−2bw}) is smallest at w = log(b/a)/(2(a + b)) ≈ 0.555.

A penalty on the trace (plain ZO, small tilts) moves w toward 1.109, one on λ_max (large tilts)
toward 0, a mix of both in between: the sharpness each method penalizes shows in one
coordinate. The slow scale a = 1/4 keeps the curvature nearly constant over a perturbation of
radius ≈ 1 along w, so the quadratic-model predictions apply at the smoothing radii used.
"""

import math

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]

A, B = 0.25, 1.0  # the two curvature rates
TRACE_MINIMIZER = math.log(B / A) / (A + B)  # ≈ 1.109: the flattest trace
EIGENVALUE_MINIMIZER = 0.0  # the smallest λ_max


def loss(params: Params) -> jax.Array:
    """Returns f(w, u, v) = e^{w/4} ‖u‖² / 2 + e^{−w} ‖v‖² / 2.

    Args:
        params: dict with ``"w"`` (a scalar), ``"u"`` and ``"v"`` (both (n,)).

    Example:
        >>> import jax.numpy as jnp
        >>> float(loss({"w": jnp.zeros(()), "u": jnp.ones(2), "v": jnp.ones(2)}))
        2.0
    """
    return 0.5 * (jnp.exp(A * params["w"]) * jnp.vdot(params["u"], params["u"])
                  + jnp.exp(-B * params["w"]) * jnp.vdot(params["v"], params["v"]))


def valley_curvature(w, n: int) -> dict[str, jax.Array]:
    """tr ∇²f, λ_max(∇²f) and tr (∇²f)² at the minimizer (w, 0, 0), in closed form.

    Example:
        >>> {k: round(float(v), 3) for k, v in valley_curvature(0.0, 3).items()}
        {'hessian_trace': 6.0, 'hessian_top_eigenvalue': 1.0, 'hessian_square_trace': 6.0}
    """
    slow, fast = jnp.exp(A * jnp.asarray(w)), jnp.exp(-B * jnp.asarray(w))
    return {"hessian_trace": n * (slow + fast), "hessian_top_eigenvalue": jnp.maximum(slow, fast),
            "hessian_square_trace": n * (slow**2 + fast**2)}


def init_params(w: float, n: int, key: jax.Array, scale: float) -> Params:
    """The start (w, u, v), u, v ~ N(0, scale² I_n) (float32): off the valley by ``scale``.

    Example:
        >>> import jax
        >>> p = init_params(-1.0, 4, jax.random.key(0), 0.1)
        >>> float(p["w"]), p["u"].shape
        (-1.0, (4,))
    """
    ku, kv = jax.random.split(key)
    return {"w": jnp.asarray(w, jnp.float32),
            "u": scale * jax.random.normal(ku, (n,), jnp.float32),
            "v": scale * jax.random.normal(kv, (n,), jnp.float32)}
