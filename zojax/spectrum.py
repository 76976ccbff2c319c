r"""The Hessian's spectrum by Lanczos on Hessian-vector products (:mod:`zojax.curvature`):
its largest eigenvalue and stochastic Lanczos quadrature of its density.

Why not matfree's Lanczos (``matfree.decomp.tridiag_sym(k, reortho="full")``, 0.6.3): it
raises for ``k > d``; it normalizes the residual without a breakdown test, so an exhausted
Krylov space gives NaN when the residual is exactly zero (:math:`H = 2I` or
:math:`\mathbf{1}\mathbf{1}^\top` from :math:`\mathbf{1}`, ``k = 3``) and otherwise normalized
rounding noise: on :math:`\mathbf{1}\mathbf{1}^\top` (d = 4) from :math:`e_1` it repeats a
Lanczos vector and returns nodes −0.20, 2.27, 4.93 with weights 0.63, 0.26, 0.11 instead of
0 and 4 with 3/4 and 1/4. (On diag(1, 1, 2, 2, 3, 3) from a random start, k = 5, it stays
finite, its spurious nodes weighing 1e-28.) It is also slower (``benchmarks/curvature.py``,
figures in ``benchmarks/README.md``). Our Lanczos
(:func:`_lanczos`) restarts on breakdown, which keeps weights exact and shapes static, and is
shared by :func:`hessian_top_eigenvalue` and :func:`hessian_spectrum`.
"""

import jax
import jax.numpy as jnp

from zojax import _checks
from zojax.curvature import flat_objective, hessian_vector_product


def _lanczos(hvp, keys, x, num_steps: int, *, reorthogonalize: bool):
    r"""Lanczos tridiagonalization of :math:`H` from one random start per key, batched.

    ``hvp(V) -> H V`` for a batch ``V`` (b, d) of vectors; ``keys`` (b,) typed keys; start
    vector ``b`` is ``normal(keys[b])`` normalized; ``num_steps <= d`` steps.

    Without reorthogonalization this is the three-term recurrence alone: memory ``O(b d)``,
    no basis kept. In finite precision its vectors lose orthogonality as Ritz values converge
    and converged ones reappear as copies ("ghosts") that share their weight, but the
    quadrature :math:`e_1^\top g(T) e_1` stays accurate (Greenbaum 1989; Knizhnerman 1996;
    Chen, Trogdon and Ubaru 2022), which is all the spectral density needs.

    With ``reorthogonalize=True`` the basis (b, num_steps, d) is kept and each new vector is
    orthogonalized against it by one classical Gram–Schmidt pass, and by a second one when the
    first cancelled more than half its norm (the DGKS criterion; "twice is enough"): the basis
    stays orthonormal to working precision, Ritz values are not repeated. Each pass reads the
    basis from memory: at 30 steps × 10 probes, D = 10,001 (``benchmarks/curvature.py``) one
    pass per step costs half of the HVPs' time.

    When a probe's Krylov space is exhausted (its residual vanishes relative to
    :math:`\|Hv\|`), its off-diagonal :math:`\beta_j` is set to 0 and it restarts from
    ``normal(fold_in(key, j + 1))`` (orthogonalized against the basis when there is one):
    :math:`T` becomes block diagonal, the first block's Ritz values are eigenvalues of
    :math:`H`, and those of restarted blocks (Ritz values of :math:`H` on another Krylov space,
    inside its spectrum) have zero first component, so zero quadrature weight. The second pass
    and the restart vectors are computed only at steps where some probe needs them (a
    ``lax.cond`` on the whole batch: a per-probe condition would be vmapped into a select
    computing both).

    Returns:
        ``(alphas, betas)``, each (b, num_steps): :math:`T`'s diagonal and, in
        ``betas[:, :-1]``, its off-diagonal.
    """
    dim = x.size
    tiny = jnp.sqrt(jnp.finfo(x.dtype).eps)

    def normal(key):
        return jax.random.normal(key, (dim,), x.dtype)

    def project_out(w, basis):  # one pass: (b, d) against each probe's rows (b, num_steps, d)
        return w - jnp.einsum("bkd,bk->bd", basis, jnp.einsum("bkd,bd->bk", basis, w))

    def with_norm(w):
        return w, jnp.linalg.norm(w, axis=-1)

    # The vectors live in one buffer (b, slots, d) indexed modulo ``slots``: the whole basis
    # when reorthogonalizing, else a ring of the two the recurrence needs. Writing v_{j+1} over
    # v_{j-1} in place, instead of carrying (v, v_prev) and shifting them, saves XLA's copies of
    # the shifted carry: 1.24x -> 1.14x a bare scan of the HVPs (benchmarks/curvature.py).
    slots = num_steps if reorthogonalize else 2

    def step(carry, j):
        vectors, beta_prev = carry
        v = jax.lax.dynamic_index_in_dim(vectors, j % slots, axis=1, keepdims=False)
        v_prev = jax.lax.dynamic_index_in_dim(vectors, (j - 1) % slots, axis=1, keepdims=False)
        w = hvp(v)
        alpha = jnp.sum(w * v, axis=-1)
        w = w - alpha[:, None] * v - beta_prev[:, None] * v_prev
        norm = jnp.linalg.norm(w, axis=-1)
        # Breakdown: the residual vanishes against ‖Hv‖² = α² + β_prev² + ‖w‖² (the
        # recurrence's identity; it saves a pass over Hv).
        floor = tiny * jnp.maximum(jnp.sqrt(alpha**2 + beta_prev**2 + norm**2), tiny)
        if reorthogonalize:
            w = project_out(w, vectors)
            beta = jnp.linalg.norm(w, axis=-1)
            again = (beta < norm / 2**0.5) | (beta <= floor)
            w, norm = jax.lax.cond(jnp.any(again), lambda w: with_norm(project_out(w, vectors)),
                                   lambda w: (w, beta), w)
        broke = norm <= floor

        def restart(w):
            fresh = jax.vmap(lambda k: normal(jax.random.fold_in(k, j + 1)))(keys)
            if reorthogonalize:
                fresh = project_out(project_out(fresh, vectors), vectors)
            return with_norm(jnp.where(broke[:, None], fresh, w))

        w, norm = jax.lax.cond(jnp.any(broke), restart, lambda w: (w, norm), w)
        beta = jnp.where(broke, 0.0, norm)
        v_next = w / jnp.where(norm > 0, norm, 1.0)[:, None]  # 0 only past the last step
        # (At the last step, slot (j + 1) % slots is v_0's or v_{j-1}'s: never read again.)
        vectors = jax.lax.dynamic_update_index_in_dim(vectors, v_next, (j + 1) % slots, axis=1)
        return (vectors, beta), (alpha, beta)

    v0 = jax.vmap(normal)(keys)
    v0 = v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True)
    vectors = jnp.zeros((v0.shape[0], slots, dim), x.dtype).at[:, 0].set(v0)
    _, (alphas, betas) = jax.lax.scan(step, (vectors, jnp.zeros(v0.shape[:1], x.dtype)),
                                      jnp.arange(num_steps))
    return alphas.T, betas.T


def _tridiagonal(alphas, betas):
    """The symmetric tridiagonal matrices (b, k, k) of :func:`_lanczos`'s coefficients."""
    off = jax.vmap(lambda b: jnp.diag(b[:-1], 1))(betas)
    return jax.vmap(jnp.diag)(alphas) + off + jnp.swapaxes(off, 1, 2)


def _batched_hvp(fun, params, args, kwargs):
    f, x = flat_objective(fun, params, args, kwargs)
    hvp = hessian_vector_product(f)
    return jax.vmap(lambda v: hvp(x, v)), x


def hessian_top_eigenvalue(fun, key, params, *args, num_iters: int = 100,
                           reorthogonalize: bool = True, **kwargs):
    r"""Largest algebraic eigenvalue of :math:`\nabla^2 f` by Lanczos on HVPs.

    ``min(num_iters, d)`` Lanczos steps from a random start (``key``), by default with full
    reorthogonalization; an exhausted Krylov space restarts from a fresh orthogonal vector, so
    the Ritz values stay Rayleigh quotients of the Hessian, never above its largest eigenvalue
    (the Lanczos of :func:`hessian_spectrum`). Returns the largest Ritz value.
    ``reorthogonalize=False`` keeps no basis (memory ``O(d)`` instead of ``O(num_iters · d)``,
    for large models): the largest Ritz value converges as fast, since the vectors lose
    orthogonality only to Ritz vectors that have converged (Paige 1980), at the price of copies
    of converged values.
    """
    _checks.check_prng_key(key, hessian_top_eigenvalue)
    _checks.check_positive_int("num_iters", num_iters)
    hvp, x = _batched_hvp(fun, params, args, kwargs)
    alphas, betas = _lanczos(hvp, key[None], x, min(num_iters, x.size),
                             reorthogonalize=reorthogonalize)
    return jnp.max(jnp.linalg.eigvalsh(_tridiagonal(alphas, betas)[0]))


def hessian_spectrum(fun, key, params, *args, num_iters: int, num_samples: int,
                     reorthogonalize: bool | None = None, **kwargs):
    r"""Stochastic Lanczos quadrature (SLQ) of the Hessian's spectral density.

    For each of ``num_samples`` start vectors :math:`q_k` uniform on the unit sphere (probe
    ``k`` from ``fold_in(key, k)``), ``num_iters`` Lanczos steps on HVPs give a tridiagonal
    :math:`T_k = \sum_j \theta_{kj} s_{kj} s_{kj}^\top`; the nodes are its eigenvalues
    :math:`\theta_{kj}`, the weights the squared first components :math:`w_{kj} = (e_1^\top
    s_{kj})^2`, so :math:`\sum_j w_{kj}\, g(\theta_{kj}) = e_1^\top g(T_k) e_1 \approx q_k^\top
    g(H) q_k`, and

    .. math::

        \frac1d \operatorname{tr} g(H) \approx \frac1n \sum_k \sum_j w_{kj}\, g(\theta_{kj}),

    exact for polynomials of degree up to ``2 num_iters - 1`` probe by probe (e.g. ``d ·
    mean_k Σ_j w_kj θ_kj`` estimates tr H, and with θ² tr H²). Each row of weights sums to 1.
    The probes are vmapped and the recursion is a ``lax.scan``. :func:`spectral_density`
    smooths the result.

    Reorthogonalization (``reorthogonalize=None`` chooses): below ``d`` steps, the default,
    the three-term recurrence runs alone, memory ``O(num_samples · d)``. Its vectors lose
    orthogonality as Ritz values converge, converged nodes reappear as copies that share their
    weight, and the quadrature stays accurate (Greenbaum 1989; Knizhnerman 1996; Chen, Trogdon
    and Ubaru 2022): what a density needs, at the cost of the HVPs alone (30 steps × 10 probes
    at D = 10,001: 1.13–1.17× a bare scan of the HVPs, against 1.55–1.7× with full
    reorthogonalization, ``benchmarks/curvature.py``). With ``num_iters >= d`` the nodes
    should be the eigenvalues, which only an orthogonal basis gives (without it, d = 20 with
    three outlying eigenvalues gives nodes off by 1e-3 relative, even in float64), so the
    Lanczos bases are kept, memory ``O(num_samples · d²)``, and each new vector is
    reorthogonalized against them. ``reorthogonalize=True`` or ``False`` forces either, e.g.
    ``True`` to count distinct eigenvalues below ``d`` steps.

    An exhausted Krylov space (fewer distinct eigenvalues than ``num_iters``, a low-rank
    Hessian) restarts the recursion from a fresh vector: the nodes of the restarted
    blocks (Ritz values inside the spectrum, not necessarily eigenvalues) get weight 0, those
    with nonzero weight are eigenvalues of :math:`H`, and the quadrature stays exact. When
    ``num_iters > d``, ``d`` steps are taken (they exhaust :math:`\mathbb{R}^d`, the
    quadrature is then exact) and the ``num_iters - d`` extra columns repeat each row's largest
    node with weight 0, so the shape stays ``(num_samples, num_iters)`` and each row of nodes is
    ascending.

    Args:
        fun: ``fun(params, *args, **kwargs) -> scalar``, twice differentiable.
        key: typed PRNG key.
        params: pytree of floating-point arrays (flattened into :math:`\mathbb{R}^d`).
        *args: passed to ``fun``.
        **kwargs: passed to ``fun``.
        num_iters: Lanczos steps per probe (static).
        num_samples: number of probes (static).
        reorthogonalize: keep the bases and reorthogonalize against them (static); ``None``:
            exactly when ``num_iters >= d``.

    Returns:
        ``(nodes, weights)``, each of shape ``(num_samples, num_iters)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 1.0, 2.0, 3.0]) * p ** 2)
        >>> nodes, weights = hessian_spectrum(f, jax.random.key(0), jnp.ones(4), num_iters=3,
        ...                                   num_samples=2)
        >>> nodes.round(4).tolist()
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
        >>> weights.sum(axis=1).round(4).tolist()
        [1.0, 1.0]
    """
    _checks.check_prng_key(key, hessian_spectrum)
    _checks.check_positive_int("num_iters", num_iters)
    _checks.check_positive_int("num_samples", num_samples)
    hvp, x = _batched_hvp(fun, params, args, kwargs)
    steps = min(num_iters, x.size)
    keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(num_samples))
    if reorthogonalize is None:
        reorthogonalize = steps == x.size
    alphas, betas = _lanczos(hvp, keys, x, steps, reorthogonalize=reorthogonalize)
    nodes, vectors = jnp.linalg.eigh(_tridiagonal(alphas, betas))
    weights = jnp.square(vectors[:, 0, :])
    extra = num_iters - steps
    if extra:
        nodes = jnp.concatenate([nodes, jnp.repeat(nodes[:, -1:], extra, axis=1)], axis=1)
        weights = jnp.concatenate([weights, jnp.zeros((num_samples, extra), weights.dtype)],
                                  axis=1)
    return nodes, weights


def spectral_density(nodes, weights, grid, *, width):
    r"""Gaussian-smoothed spectral density of :func:`hessian_spectrum`'s quadrature on ``grid``.

    .. math::

        \rho(x) = \frac1n \sum_k \sum_j w_{kj}\, \mathcal{N}(x;\ \theta_{kj}, \sigma^2),

    a probability density (it integrates to 1 over a grid that covers the nodes by a few
    ``width``\ s) whose peaks sit at the eigenvalues of the Hessian, weighted by the share of
    the spectrum near them.

    Args:
        nodes: (num_samples, num_iters) from :func:`hessian_spectrum`.
        weights: (num_samples, num_iters), each row summing to 1.
        grid: 1-D array of points :math:`x`.
        width: :math:`\sigma > 0`, the Gaussian kernel's standard deviation (may be traced).

    Returns:
        The density at each point of ``grid``, its shape.

    Example:
        >>> import jax.numpy as jnp
        >>> grid = jnp.linspace(-5.0, 5.0, 1001)
        >>> density = spectral_density(jnp.array([[-1.0, 1.0]]), jnp.array([[0.5, 0.5]]), grid,
        ...                            width=0.3)
        >>> jnp.round(jnp.array([jnp.trapezoid(density, grid), grid[jnp.argmax(density)]]),
        ...           4).tolist()  # integral, peak
        [1.0, -1.0]
    """
    _checks.check_positive_finite("width", width)
    nodes, weights, grid = jnp.asarray(nodes), jnp.asarray(weights), jnp.asarray(grid)
    if nodes.ndim != 2 or nodes.shape != weights.shape:
        raise ValueError(f"nodes and weights must have the same shape (num_samples, num_iters),"
                         f" got {nodes.shape} and {weights.shape}.")
    if grid.ndim != 1:
        raise ValueError(f"grid must be a 1-D array, got shape {grid.shape}.")
    z = (grid[:, None, None] - nodes) / width
    kernel = jnp.exp(-0.5 * jnp.square(z)) / (width * jnp.sqrt(2 * jnp.pi))
    return jnp.sum(kernel * weights, axis=(1, 2)) / nodes.shape[0]
