r"""Estimators of the 2024–25 ZO fine-tuning literature, each one stage of the pipeline.

Each is a perturbation (:mod:`zojax.directions`) or a weighting (:mod:`zojax.weightings`)
passed to the shared loop (:func:`zojax.estimators.partial_estimate`), and an optax transform
built by :func:`zojax.transforms.estimator_transform`: no loop of its own.

- :func:`fzoo` (FZOO, Dang et al. 2025): one-sided Rademacher differences, the step normalized
  by the standard deviation of the batch's losses.
- :func:`sparse_two_point` (Sparse-MeZO, Liu et al. 2024): Gaussian perturbations of the
  small-magnitude entries of each leaf only.
- :func:`hizoo` (HiZOO, Zhao et al. 2025): perturbations shaped by a diagonal Hessian estimate
  kept in the state and updated from the step's own evaluations.
- :func:`lozo` (LOZO, Chen et al. 2024): low-rank perturbations U Vᵀ of the matrix leaves, V
  held for several steps.
- :func:`zo_svrg` (ZO-SVRG / MeZO-SVRG, Gautam et al. 2024): minibatch estimates corrected by a
  control variate from a periodic large-batch estimate at a snapshot.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from zojax import _backend, _checks, directions, estimators, transforms, weightings

# ---------------------------------------------------------------------------------------------
# FZOO: a weighting.


class FzooState(NamedTuple):
    """Accumulator of :func:`fzoo_weighting`."""

    differences: weightings.MeanState  # Σ_i (ℓ_i − ℓ_0) u_i and the count.
    losses: weightings.MomentsState  # mean and M₂ of the ℓ_i = f(x + λu_i).


def fzoo_weighting(base) -> weightings.Weighting:
    r""":math:`\frac{1}{N\sigma}\sum_i (\ell_i - \ell_0)\,u_i`, :math:`\ell_i = f(x + \lambda
    u_i)`, :math:`\ell_0 = f(x)` (``base``), :math:`\sigma` the sample standard deviation of the
    :math:`\ell_i` (0 where :math:`\sigma = 0`). Values are ``(n, 1)``: the points alone."""
    differences = weightings.mean(lambda values: values[:, 0] - base)
    losses = weightings.mean_and_sem(lambda values: values[:, 0])

    def init(params):
        return FzooState(differences.init(params), losses.init(params))

    def add(acc, values, directions):
        return FzooState(differences.add(acc.differences, values, directions),
                         losses.add(acc.losses, values, None))

    def combine(a, b):
        return FzooState(differences.combine(a.differences, b.differences),
                         losses.combine(a.losses, b.losses))

    def finalize(acc):
        _, sem = losses.finalize(acc.losses)
        std = sem * jnp.sqrt(acc.losses.count)
        return jax.tree.map(lambda g: jnp.where(std > 0, g / std.astype(g.dtype), 0.0),
                            differences.finalize(acc.differences))

    def reduce(acc, axis_name):
        return FzooState(differences.reduce(acc.differences, axis_name),
                         weightings.all_reduce(losses, acc.losses, axis_name))

    return weightings.Weighting(init, add, combine, finalize, reduce)


def fzoo(smoothing, num_directions: int, *, chunk_size: int | None = None, seed=0,
         directions_sharding: NamedSharding | None = None
         ) -> optax.GradientTransformationExtraArgs:
    r"""FZOO's estimate: batched one-sided Rademacher differences over their losses' spread.

    .. math:: \hat g = \frac{1}{N\sigma}\sum_{i=1}^N \big(f(x + \lambda u_i) - f(x)\big)\,u_i,
        \qquad u_i \in \{\pm 1\}^d,\quad \sigma = \operatorname{std}_i f(x + \lambda u_i)

    (N + 1 queries per step). Chained with ``optax.sgd(η)`` it is FZOO's update
    :math:`x \leftarrow x - \eta\,\hat g`. Covariance of the directions: :math:`I`. What it
    estimates: as :math:`\lambda \to 0`, :math:`f(x + \lambda u) - f(x) \approx \lambda
    u^\top\nabla f` and :math:`\sigma \approx \lambda\|\nabla f\|` (Rademacher:
    :math:`\operatorname{Var} u^\top g = \|g\|^2`), so :math:`\mathbb{E}\hat g \to \nabla f /
    \|\nabla f\|` up to :math:`O(1/N)`: normalized gradient descent, whose step length does not
    depend on the loss's scale nor on λ. ``state.value`` is :math:`f(x)`.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        num_directions: :math:`N \geq 2` (static): σ needs two losses.
        chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = fzoo(0.01, 4)
        >>> g, state = opt.update(None, opt.init(jnp.ones(3)), jnp.ones(3),
        ...                       value_fn=lambda p: jnp.sum(p ** 2))
        >>> int(state.num_queries)
        5
    """
    _checks.check_positive_finite("smoothing", smoothing)
    _checks.check_positive_int("num_directions", num_directions)
    if num_directions < 2:
        raise ValueError(f"num_directions must be >= 2 (FZOO divides by the standard "
                         f"deviation of the step's losses), got {num_directions!r}.")
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    estimators.check_directions_sharding(directions_sharding, num_directions)

    def estimate(key, value_fn, params, perturbation_state, **extra_args):
        del perturbation_state, extra_args
        base = value_fn(params).astype(jnp.float32)
        weighting = fzoo_weighting(base)
        partial = estimators.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction="rademacher", scheme="points", chunk_size=chunk_size,
            weighting=weighting, directions_sharding=directions_sharding)
        _, grads, finite = estimators.finalize(partial, params, weighting)
        return estimators.Estimate(base, grads, finite & jnp.isfinite(base),
                                   partial.num_queries + 1, ())

    return transforms.estimator_transform(estimate, seed, name="fzoo")


# ---------------------------------------------------------------------------------------------
# Sparse-MeZO: a perturbation.


def sparse_thresholds(params, sparsity) -> Any:
    """Per leaf, the ``1 − sparsity`` quantile of ``|θ|`` (a float32 scalar per leaf), or
    ``+inf`` where that quantile is *degenerate*: equal to the leaf's smallest magnitude (all
    magnitudes equal, e.g. a leaf of zeros, or so many tied at the minimum that the quantile
    falls among them): such a leaf is perturbed densely (see :func:`sparse_perturbation`)."""

    def threshold(p):
        magnitudes = jnp.abs(p).astype(jnp.float32)
        quantile = jnp.quantile(magnitudes, 1.0 - sparsity)
        smallest = jnp.min(magnitudes, initial=jnp.inf)
        return jnp.where(quantile == smallest, jnp.float32(jnp.inf), quantile)

    return jax.tree.map(threshold, params)


def sparse_masks(params, sparsity=None, thresholds=None) -> Any:
    """Per leaf, True where ``|θ| ≤`` the leaf's threshold (True: perturbed and updated): the
    ``thresholds`` given (a :func:`sparse_perturbation` state), else those of ``params`` at
    ``sparsity`` (the masks of a first step from ``params``; all True on a degenerate leaf)."""
    if thresholds is None:
        thresholds = sparse_thresholds(params, sparsity)
    return jax.tree.map(lambda p, h: jnp.abs(p).astype(jnp.float32) <= h, params, thresholds)


def sparse_perturbation(sparsity) -> directions.Perturbation:
    r"""Gaussian directions on the small-magnitude entries of each leaf: :math:`u = m \odot z`,
    :math:`z \sim N(0, I)`, :math:`m_j = [\,|\theta_j| \le h_\ell\,]`.

    As in the paper, each leaf's threshold :math:`h_\ell` is the ``1 − sparsity`` quantile of
    its initial magnitudes (the state: one scalar per leaf, :func:`sparse_thresholds` at
    ``init``), and the mask is recomputed from the current parameters at every step
    (``prepare``: one elementwise comparison, fused into the step), so it follows the weights as
    they move. Covariance :math:`\Sigma = \operatorname{diag}(m)`: on a quadratic the central
    estimate's mean is :math:`m \odot \nabla f`, zero off the mask.

    A degenerate threshold, :math:`h_\ell = \min_j |\theta_j|` at ``init`` (a leaf initialized
    at zero: a linear model, a bias, LoRA's B; or at a constant, such as a norm's scale), is
    stored as :math:`+\infty`: the leaf is perturbed densely at every step, as by
    :func:`zojax.two_point`. Why: its initial magnitudes rank nothing, every entry sits on the
    threshold, and the paper's rule perturbs them all at the first step, then freezes each one
    that moved outward: from zero, the whole leaf after one step, silently (least squares from
    zeros, ``tests/test_variants.py``: loss 8.62 → 8.61 in 300 steps; dense: 1.7e-7). Keeping
    the first step's mask (all entries) costs nothing per step. Thresholds taken later, from
    the first weights that differ, are of the size of one step and freeze the leaf again
    (there: within two steps); a quantile of the current weights would sort the leaf at every
    step, which the fixed threshold exists to avoid. A leaf that is not degenerate (one of two
    or more entries whose magnitudes all differ never is) keeps the paper's threshold and mask
    exactly. ``jnp.isinf`` of the state shows which leaves are dense.
    """

    def prepare(key, params, thresholds):
        del key
        return sparse_masks(params, thresholds=thresholds)

    def sample(key, params, state, masks):
        del state
        z = directions.gaussian(key, params)
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), z, masks)

    def cov_matvec(state, v):
        del state, v
        raise NotImplementedError("Σ = diag(m) depends on the step's params: Σv is "
                                  "jnp.where(sparse_masks(params, thresholds=state), v, 0).")

    return directions.Perturbation(lambda params: sparse_thresholds(params, sparsity), prepare,
                                   sample, lambda state, *args, **kwargs: state, cov_matvec)


def sparse_two_point(smoothing, num_directions: int = 1, *, sparsity: float,
                     scheme: str = "central", chunk_size: int | None = None, seed=0,
                     directions_sharding: NamedSharding | None = None
                     ) -> optax.GradientTransformationExtraArgs:
    r"""Sparse-MeZO: :func:`zojax.two_point` with :func:`sparse_perturbation` directions.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda m\odot z_i) - f(x - \lambda m\odot
        z_i)}{2\lambda}\, m\odot z_i

    Only the entries of each leaf at or below its threshold, the ``1 − sparsity`` quantile of
    its magnitudes at ``init``, are perturbed (and so updated); the others get a zero estimate.
    The mask is recomputed at every step from the current weights. A leaf whose threshold is
    degenerate (its smallest initial magnitude: all equal, e.g. initialized at zero) is
    perturbed densely instead of being frozen after its first step (threshold ``+inf``; see
    :func:`sparse_perturbation`). Same queries and non-finite policy as
    :func:`zojax.two_point`; the state adds one threshold per leaf.

    Args:
        smoothing: :math:`\lambda > 0` (numeric, may be injected/vmapped).
        num_directions: ``q`` (static).
        sparsity: the fraction of each leaf left unperturbed, the largest entries, in (0, 1).
        scheme, chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = sparse_two_point(0.01, 2, sparsity=0.5)
        >>> g, _ = opt.update(None, opt.init(jnp.arange(4.0)), jnp.arange(4.0),
        ...                   value_fn=lambda p: jnp.sum(p ** 2))
        >>> bool(g[2] == 0) and bool(g[3] == 0)  # the two largest entries stay put
        True
    """
    if not isinstance(sparsity, jax.core.Tracer):  # traced: injected by inject_hyperparams
        number = _checks.concrete_value(sparsity)
        if number is None or not (math.isfinite(number) and 0 < number < 1):
            raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}.")
    return transforms.two_point(smoothing, num_directions,
                                direction=sparse_perturbation(sparsity), scheme=scheme,
                                chunk_size=chunk_size, seed=seed,
                                directions_sharding=directions_sharding)


# ---------------------------------------------------------------------------------------------
# HiZOO: a perturbation shaped by its state and a weighting that also measures curvature.


def hizoo_perturbation() -> directions.Perturbation:
    r"""Directions :math:`u = H^{-1/2} z`, :math:`z \sim N(0, I)`, :math:`H` the diagonal
    Hessian estimate kept as the state (params' structure, float32 or wider, initially 1).
    Covariance :math:`\Sigma = H^{-1}`. The state changes in :func:`hizoo`, from the step's
    evaluations (:func:`hizoo_weighting`)."""

    def init(params):
        return jax.tree.map(lambda p: jnp.ones(p.shape, _backend.accumulator_dtype(p.dtype)),
                            params)

    def sample(key, params, hessian, context):
        del context
        return jax.tree.map(lambda z, h: (z * jax.lax.rsqrt(h)).astype(z.dtype),
                            directions.gaussian(key, params), hessian)

    return directions.Perturbation(init, lambda key, params, state: (), sample,
                                   lambda state, *args, **kwargs: state,
                                   lambda hessian, v: jax.tree.map(jnp.divide, v, hessian))


class HizooState(NamedTuple):
    """Accumulator of :func:`hizoo_weighting`."""

    grads: weightings.MeanState  # Σ_i (ℓ₊ − ℓ₋)/(2λ) u_i.
    curvature: weightings.MeanState  # Σ_i |ℓ₊ + ℓ₋ − 2ℓ₀| / (2λ²) u_i².


def hizoo_weighting(smoothing, base) -> weightings.Weighting:
    r"""The central estimate :math:`\frac1q\sum_i \frac{\ell_{i+} - \ell_{i-}}{2\lambda} u_i`
    and, in the same pass, :math:`\frac1q\sum_i \frac{|\ell_{i+} + \ell_{i-} - 2\ell_0|}
    {2\lambda^2} u_i^2` (``base`` = :math:`\ell_0`), finalized as the pair."""
    grads = weightings.mean(lambda values: (values[:, 0] - values[:, 1]) / (2 * smoothing))
    curvature = weightings.mean(
        lambda values: jnp.abs(values[:, 0] + values[:, 1] - 2 * base) / (2 * smoothing**2))

    def add(acc, values, directions):
        return HizooState(grads.add(acc.grads, values, directions),
                          curvature.add(acc.curvature, values, jax.tree.map(jnp.square,
                                                                            directions)))

    def combine(a, b):
        return HizooState(grads.combine(a.grads, b.grads),
                          curvature.combine(a.curvature, b.curvature))

    return weightings.Weighting(
        lambda params: HizooState(grads.init(params), curvature.init(params)), add, combine,
        lambda acc: (grads.finalize(acc.grads), curvature.finalize(acc.curvature)),
        lambda acc, axis_name: jax.lax.psum(acc, axis_name))


def hizoo(smoothing, num_directions: int = 1, *, hessian_smooth=1e-8,
          chunk_size: int | None = None, seed=0,
          directions_sharding: NamedSharding | None = None
          ) -> optax.GradientTransformationExtraArgs:
    r"""HiZOO (Zhao et al. 2025): central differences along :math:`u = H^{-1/2} z`, and the
    diagonal Hessian estimate :math:`H` updated from the same evaluations and :math:`f(x)`.

    .. math:: \hat g = \frac1q\sum_i \frac{f(x + \lambda u_i) - f(x - \lambda u_i)}{2\lambda}
        \,u_i, \qquad H \leftarrow (1 - \alpha) H + \alpha\, \frac1q\sum_i
        \frac{|f(x + \lambda u_i) + f(x - \lambda u_i) - 2 f(x)|}{2\lambda^2}\, H \odot z_i^2

    (the authors' code: :math:`H` starts at 1, :math:`H \odot z^2 = H^2 \odot u^2`). Covariance
    :math:`\Sigma = H^{-1}`: on a quadratic :math:`\mathbb{E}\hat g = H^{-1}\nabla f`, a
    diagonally preconditioned step. On a quadratic with diagonal Hessian :math:`D`, where the
    second difference is :math:`\lambda^2 u^\top D u` exactly,
    :math:`\mathbb{E}[(z^\top A z) z_j^2] = \operatorname{tr} A + 2A_{jj}` with
    :math:`A = H^{-1/2} D H^{-1/2}`, so the update's fixed point is :math:`H = \frac{d + 2}{2}
    D`: the true diagonal Hessian up to one scalar (which rescales λ and the step alike). The
    step uses the H that shaped its directions (the reference rescales it by the updated one,
    a change of O(α)). 2q + 1 queries per step; the state is H (params-sized, float32), and a
    step holds one more float32 accumulator than a two-point step (the curvature sum).
    ``state.value`` is :math:`f(x)`.

    Args:
        smoothing: :math:`\lambda > 0` (the paper's μ; numeric, may be injected/vmapped).
        num_directions: ``q`` (static).
        hessian_smooth: :math:`\alpha \in [0, 1]`, the paper's smoothing of H (its code's
            ``hessian_smooth``; 1e-8 to 1e-6 for LLMs, larger for small models; 0: MeZO with
            fixed unit H).
        chunk_size, seed, directions_sharding: as :func:`zojax.two_point`.

    Example:
        >>> import jax.numpy as jnp
        >>> opt = hizoo(0.01, hessian_smooth=0.5)
        >>> w = jnp.ones(3)
        >>> g, state = opt.update(None, opt.init(w), w, value_fn=lambda w: jnp.sum(w ** 2))
        >>> int(state.num_queries), state.perturbation_state.shape
        (3, (3,))
    """
    estimators._validate(smoothing, num_directions, "gaussian", "central", chunk_size,
                         directions_sharding)
    if not isinstance(hessian_smooth, jax.core.Tracer):
        number = _checks.concrete_value(hessian_smooth)
        if number is None or not (0 <= number <= 1):
            raise ValueError(f"hessian_smooth must be a number in [0, 1], got "
                             f"{hessian_smooth!r}.")
    perturbation = hizoo_perturbation()

    def estimate(key, value_fn, params, hessian, **extra_args):
        del extra_args
        base = value_fn(params)
        base = base.astype(_backend.accumulator_dtype(base.dtype))
        weighting = hizoo_weighting(smoothing, base)
        partial = estimators.partial_estimate(
            value_fn, key, params, smoothing=smoothing, num_directions=num_directions,
            direction=perturbation, chunk_size=chunk_size, weighting=weighting,
            perturbation_state=hessian, directions_sharding=directions_sharding)
        grads, curvature = weighting.finalize(partial.acc)
        alpha = jnp.asarray(hessian_smooth, jnp.float32)
        hessian = jax.tree.map(lambda h, c: (1 - alpha) * h + alpha * h * h * c, hessian,
                               curvature)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return estimators.Estimate(base, grads, partial.finite & jnp.isfinite(base),
                                   partial.num_queries + 1, hessian)

    return transforms.estimator_transform(estimate, seed, init_perturbation=perturbation.init,
                                          name="hizoo")


# ---------------------------------------------------------------------------------------------
# LOZO: a perturbation with a held basis.


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
        return tuple(_backend.normal(k, (p.shape[1], rank), p.dtype) if p.ndim == 2 else
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
            _backend.normal(k, p.shape, p.dtype) if p.ndim != 2 else
            _backend.normal(k, (p.shape[0], rank), p.dtype) @ basis.T / math.sqrt(rank)
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
    return transforms.two_point(smoothing, num_directions,
                                direction=lozo_perturbation(rank, refresh_every), scheme=scheme,
                                chunk_size=chunk_size, seed=seed,
                                directions_sharding=directions_sharding)


# ---------------------------------------------------------------------------------------------
# ZO-SVRG: a transform over two-point estimates at the iterate and at a snapshot.


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
        return weightings.MeanState(_backend.weighted_sum(coefficients, directions, acc.total),
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
    estimators._validate(smoothing, num_directions, "gaussian", "central", chunk_size)
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
        full_value_fn = estimators.as_objective(full_value_fn, "full_value_fn")

        def snapshot_step():
            value, grads, finite = estimators.finalize(
                estimators.partial_estimate(full_value_fn, key, params, **options), params)
            return value, grads, finite

        def inner_step():
            at_snapshot = estimators.partial_estimate(value_fn, key, state.snapshot,
                                                      weighting=_values_only(), **options)
            reference = (at_snapshot.values[:, 0] - at_snapshot.values[:, 1]) / (2 * smoothing)
            weighting = _central_minus(smoothing, reference)
            at_x = estimators.partial_estimate(value_fn, key, params, weighting=weighting,
                                               **options)
            value, grads, finite = estimators.finalize(at_x, params, weighting)
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
        return estimators.Estimate(value, grads, finite,
                                   jnp.where(due, queries, 2 * queries).astype(jnp.int32),
                                   new_state)

    return transforms.estimator_transform(estimate, seed, init_perturbation=init,
                                          name="zo_svrg")
