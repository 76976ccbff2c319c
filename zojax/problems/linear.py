"""Linear classifiers of Figure 2 ("ZO finds flat minima"): squared-hinge SVM, logistic regression.

Every function is pure with the parameters first, ``fn(w, features, labels)``, so it plugs into
estimators that call ``fun(params, *args)``. Labels are b ∈ {−1, +1}. ``features`` is anything
with ``features @ w``: a dense (N, D) array, or an :class:`AffineFeatures` map that never forms
the N × D matrix.

The logistic loss comes exact (``logistic_loss``) and clipped as scikit-learn's ``log_loss``
computes it (``clipped_logistic_loss``, the loss of the paper's public code). Every loss has a
line form ``loss.along(w, u, steps, features, labels)``, f(w + t u) for every step t, which the
two-point estimators use (see :func:`zojax.objective.bind`). With an :class:`AffineFeatures` map
it applies the map to w and u, not to every point w ± λu: q directions cost 1 + q columns instead
of 2q, and a vmapped sweep sharing its directions computes X u once. :data:`LOSSES` names them.

Closed-form Hessian traces (the paper's metrics), margins mᵢ = bᵢ xᵢᵀw, pᵢ = sigmoid(xᵢᵀw):

    SVM (generalized Hessian):  tr ∇²f(w) = (2/N) Σ_{mᵢ < 1} ‖xᵢ‖²
    logistic regression:        tr ∇²f(w) = (1/N) Σᵢ pᵢ (1 − pᵢ) ‖xᵢ‖²
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero

# Full float32 matmuls (no TF32 on GPUs): ZO differences f(w + λu) − f(w − λu) need them.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


class AffineFeatures(NamedTuple):
    """The random-feature map X = [1, (Φ W − μ)/σ] as an affine map that never forms X (N × m+1).

    ``X @ w = w₀ + Φ (W (w₁:/σ)) − μᵀ(w₁:/σ)`` costs O(N d + d m) instead of O(N m). A NamedTuple
    is a pytree, so instances pass through ``jit``, ``grad`` and ``vmap`` (over ``w``).

    Products are computed with Φᵀ, ``inputs_t``: a batch of k weight vectors then gives its
    (k, N) scores in their batched layout, which on a CPU is faster than multiplying Φ (N, d)
    (``benchmarks/README.md``). Under ``vmap`` every product of one call is one matrix
    product with a row per vector (see :func:`_products`). Build the map with :meth:`create` (or
    :func:`random_features`), which stores both Φ and Φᵀ; a map built from five fields has
    ``inputs_t = None`` and multiplies Φ itself, with the same values.

    Attributes:
        inputs: Φ, (N, d) standardized inputs.
        projection: W, (d, m) Gaussian projection.
        mean: μ, (m,) train mean of Φ_train W.
        scale: σ, (m,) train standard deviation of Φ_train W (zeros replaced by one).
        row_sq_norms: (N,) squared row norms ‖xᵢ‖² of X, constant column included.
        inputs_t: Φᵀ, (d, N), a copy of ``inputs`` in the layout the products use, or None
            (products then read ``inputs``). Derivatives with respect to the map flow through
            ``inputs``, ``projection``, ``mean`` and ``scale``; ``inputs_t`` is not differentiated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> phi = jax.random.normal(jax.random.key(0), (4, 2))
        >>> features = AffineFeatures.create(phi, jnp.ones((2, 3)), jnp.zeros(3), jnp.ones(3))
        >>> features.shape, features.inputs_t.shape
        ((4, 4), (2, 4))
        >>> w = jnp.ones(4)
        >>> bool(jnp.allclose(features @ w, features.dense() @ w, atol=1e-5))
        True
    """

    inputs: jax.Array
    projection: jax.Array
    mean: jax.Array
    scale: jax.Array
    row_sq_norms: jax.Array
    inputs_t: jax.Array | None = None

    @classmethod
    def create(cls, inputs, projection, mean, scale) -> "AffineFeatures":
        """Builds the map, Φᵀ and the row norms without forming N × m.

        With A = W diag(1/σ) and c = μ/σ, ‖xᵢ‖² = 1 + φᵢ A Aᵀ φᵢᵀ − 2 φᵢ A c + ‖c‖², which needs
        only the d × d Gram matrix A Aᵀ.

        Args:
            inputs: Φ, (N, d).
            projection: W, (d, m).
            mean: μ, (m,).
            scale: σ, (m,), nonzero.

        Returns:
            The :class:`AffineFeatures`, with ``inputs_t`` = Φᵀ.
        """
        arrays = tuple(jnp.asarray(a) for a in (inputs, projection, mean, scale))
        return cls(*arrays, _affine_row_sq_norms(*arrays), jnp.transpose(arrays[0]))

    @property
    def shape(self) -> tuple[int, int]:
        """(N, m + 1), the shape of the dense X."""
        return (self.inputs.shape[0], self.projection.shape[1] + 1)

    def __matmul__(self, w: jax.Array) -> jax.Array:
        """Returns X w for w of shape (m+1,) or (m+1, k), in O(N d + d m) per column."""
        if w.ndim == 1:
            return _affine_products(self, (w,))[0]
        return _affine_products(self, (w.T,))[0].T

    def dense(self) -> jax.Array:
        """Materializes X = [1, (Φ W − μ)/σ], shape (N, m + 1) (for tests and small baselines)."""
        body = (_mm(self.inputs, self.projection) - self.mean) / self.scale
        return jnp.concatenate([jnp.ones((body.shape[0], 1), body.dtype), body], axis=1)


@jax.jit
def _affine_row_sq_norms(inputs, projection, mean, scale):
    a = projection / scale
    c = mean / scale
    quad = jnp.sum(_mm(inputs, _mm(a, a.T)) * inputs, axis=1)
    return 1.0 + quad - 2.0 * _mm(inputs, _mm(a, c)) + jnp.vdot(c, c)


def _matvec(features, w: jax.Array) -> jax.Array:
    if isinstance(features, AffineFeatures):
        return features @ w
    return _mm(features, w)


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_HIGHEST)


def _scores(ws: jax.Array, features: AffineFeatures) -> jax.Array:
    """X w for ``ws`` of shape (D,) or (k, D), as (N,) or (k, N); plain (transposable) ops."""
    v = ws[..., 1:] / features.scale  # (..., m)
    z = _dot(features.projection, v, ((1,), (v.ndim - 1,)))  # (d, ...): W v in its fast layout
    # zᵀΦᵀ as a contraction over z's first axis, not a matmul of z.T: XLA folds that transpose
    # into the first product, whose operands then swap into a slower layout.
    if features.inputs_t is None:
        s = _dot(z, features.inputs, ((0,), (1,)))  # (..., N)
    else:
        s = _dot(z, features.inputs_t, ((0,), (0,)))
    return s + (ws[..., 0] - _mm(v, features.mean))[..., None]


def _products_of(features: AffineFeatures, blocks: tuple) -> tuple:
    """(X b for b in blocks), each block (..., D) of weight vectors: one product for all rows."""
    if len(blocks) == 1 and blocks[0].ndim <= 2:
        return (_scores(blocks[0], features),)
    rows = [b.reshape(-1, b.shape[-1]) for b in blocks]
    scores = _scores(jnp.concatenate(rows), features)
    ends = np.cumsum([r.shape[0] for r in rows])
    return tuple(scores[end - r.shape[0]:end].reshape(*b.shape[:-1], -1)
                 for end, r, b in zip(ends, rows, blocks))


@custom_vmap
def _products(features: AffineFeatures, blocks: tuple) -> tuple:
    """(X b for b in blocks) with one batching rule: a batch axis is one more axis of rows.

    Batched over the blocks (vmaps over w, over directions, over both, nested), every product
    of the call stays one matrix product with a row per vector, in the fast layout. Blocks not
    batched over keep their rows once: for the line form's [w, U] the estimator's vmap over
    directions makes it one product with 1 + q rows, and a sweep of points sharing their
    directions computes X U once for all of them instead of each point carrying a copy of U.
    Batched features fall back to ``vmap``'s default rules.
    """
    return _products_of(features, blocks)


@_products.def_vmap
def _products_vmap(axis_size, in_batched, features, blocks):
    features_batched, blocks_batched = in_batched
    if any(jax.tree.leaves(features_batched)):
        axes = jax.tree.map(lambda batched: 0 if batched else None, tuple(in_batched))
        out = jax.vmap(_products_of, axes, axis_size=axis_size)(features, blocks)
        return out, tuple(True for _ in blocks)
    if not any(blocks_batched):  # e.g. the primal part of a jvp under vmap
        return _products_of(features, blocks), tuple(blocks_batched)
    # Batched blocks have one more leading axis: one product again, seen by any outer vmap.
    return _products(features, blocks), tuple(blocks_batched)


@jax.custom_jvp
def _affine_products(features: AffineFeatures, blocks: tuple) -> tuple:
    """:func:`_products` with derivatives (custom_vmap functions cannot be transposed)."""
    return _products(features, blocks)


def _is_zero(tangent) -> bool:
    return isinstance(tangent, SymbolicZero)


def _instantiate(tangent):
    return jnp.zeros(tangent.shape, tangent.dtype) if _is_zero(tangent) else tangent


@functools.partial(_affine_products.defjvp, symbolic_zeros=True)
def _affine_products_jvp(primals, tangents):
    # X b is linear in b: the tangents are the same products written with plain ops, so that
    # jax.grad can transpose them.
    features, blocks = primals
    features_dot, blocks_dot = tangents
    out = _products(features, blocks)
    if all(map(_is_zero, jax.tree.leaves(features_dot, is_leaf=_is_zero))):
        return out, tuple(jnp.zeros_like(o) if _is_zero(t) else _products_of(features, (t,))[0]
                          for o, t in zip(out, blocks_dot))
    # Derivatives with respect to the map (through Φ, not its copy Φᵀ).
    plain = features._replace(inputs_t=None)
    dot = jax.tree.map(_instantiate, features_dot._replace(inputs_t=None), is_leaf=_is_zero)
    _, tangent = jax.jvp(_products_of, (plain, blocks), (dot, tuple(map(_instantiate, blocks_dot))))
    return out, tangent


def _along(margin_loss):
    """The line form (see :func:`zojax.objective.bind`) of f(w) = mean ℓ(bᵢ xᵢᵀw):
    f(w + t u) = mean ℓ(bᵢ xᵢᵀw + t bᵢ xᵢᵀu) for every step t, with X w and X u from one
    product for an :class:`AffineFeatures` map. A dense X is multiplied with the points w + t u
    themselves: on a CPU that product is bound by reading X, once either way."""

    def along(w, direction, steps, features, labels):
        if not isinstance(features, AffineFeatures):
            return jax.vmap(lambda t: jnp.mean(margin_loss(
                labels * _mm(features, w + t.astype(w.dtype) * direction))))(steps)
        xw, xu = _affine_products(features, (w, direction))
        base, slope = labels * xw, labels * xu
        return jax.vmap(lambda t: jnp.mean(margin_loss(base + t * slope)))(steps)

    return along


def squared_row_norms(features) -> jax.Array:
    """Returns ‖xᵢ‖² per row: Σⱼ Xᵢⱼ² for a dense array, the stored norms for AffineFeatures.

    Example:
        >>> import jax.numpy as jnp
        >>> squared_row_norms(jnp.array([[1.0, 2.0], [0.0, 3.0]])).tolist()
        [5.0, 9.0]
    """
    if isinstance(features, AffineFeatures):
        return features.row_sq_norms
    return jnp.sum(jnp.square(features), axis=1)


def svm_loss(w: jax.Array, features, labels: jax.Array) -> jax.Array:
    """Squared-hinge loss f(w) = (1/N) Σᵢ max(0, 1 − bᵢ xᵢᵀw)².

    Args:
        w: (D,) weights.
        features: (N, D) dense array or :class:`AffineFeatures`.
        labels: (N,) labels in {−1, +1}.

    Returns:
        The scalar mean loss.

    Example:
        >>> import jax.numpy as jnp
        >>> x, b = jnp.array([[1.0], [1.0]]), jnp.array([1.0, -1.0])
        >>> float(svm_loss(jnp.array([0.5]), x, b))  # (0.5² + 1.5²) / 2
        1.25
    """
    return jnp.mean(_squared_hinge(labels * _matvec(features, w)))


def _squared_hinge(margins: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(1.0 - margins))


svm_loss.along = _along(_squared_hinge)


@jax.custom_jvp
def _softplus(x: jax.Array) -> jax.Array:
    """log(1 + eˣ) as max(x, 0) + log1p(e^−|x|): equal to ``jax.nn.softplus``, ~2.5x cheaper on
    CPU (no ``logaddexp`` special cases), with the smooth derivative sigmoid(x) at every order."""
    return jax.nn.relu(x) + jnp.log1p(jnp.exp(-jnp.abs(x)))


_softplus.defjvps(lambda tangent, _, x: jax.nn.sigmoid(x) * tangent)


def logistic_loss(w: jax.Array, features, labels: jax.Array) -> jax.Array:
    """Logistic loss f(w) = (1/N) Σᵢ softplus(−bᵢ xᵢᵀw).

    Equals the mean cross-entropy of pᵢ = sigmoid(xᵢᵀw) against yᵢ = (bᵢ + 1)/2 ∈ {0, 1};
    ``softplus`` keeps it finite for large margins.

    Args:
        w: (D,) weights.
        features: (N, D) dense array or :class:`AffineFeatures`.
        labels: (N,) labels in {−1, +1}.

    Returns:
        The scalar mean loss.

    Example:
        >>> import jax.numpy as jnp
        >>> x, b = jnp.ones((2, 1)), jnp.array([1.0, -1.0])
        >>> round(float(logistic_loss(jnp.zeros(1), x, b)), 4)  # log 2
        0.6931
    """
    return jnp.mean(_logistic(labels * _matvec(features, w)))


def _logistic(margins: jax.Array) -> jax.Array:
    return _softplus(-margins)


logistic_loss.along = _along(_logistic)

LOG_LOSS_EPS = float(np.finfo(np.float64).eps)
"""ε = 2⁻⁵² ≈ 2.22e-16, the clipping of scikit-learn's ``log_loss`` for float64 probabilities
(``np.finfo(float64).eps``): p is clipped to [ε, 1 − ε], so a per-sample loss lies in
[−log(1 − ε), −log ε] ≈ [2.2e-16, 36.04]."""

_LOG_LOSS_RANGE = (-math.log1p(-LOG_LOSS_EPS), -math.log(LOG_LOSS_EPS))


def clipped_logistic_loss(w: jax.Array, features, labels: jax.Array) -> jax.Array:
    """The logistic loss as ``sklearn.metrics.log_loss`` computes it, with p clipped to [ε, 1 − ε].

    f(w) = (1/N) Σᵢ −log clip(sigmoid(bᵢ xᵢᵀw), ε, 1 − ε), ε = :data:`LOG_LOSS_EPS` = 2⁻⁵² (the
    float64 machine epsilon that scikit-learn uses for float64 probabilities, whatever the dtype
    of ``w``): each sample's loss is :func:`logistic_loss`'s clipped to [−log(1 − ε), −log ε], at
    most ≈ 36.04 nats. This is how the paper's public code evaluates the loss for Figure 2: the
    values its ZO estimator differences and its curves record.

    Only the values are clipped: derivatives (``jax.grad``, ``jax.jvp``, Hessians) are those of
    :func:`logistic_loss`, as the paper's GD steps along the exact gradient Xᵀ(p − y)/N next to
    the clipped values (a straight-through clip; the clip's own derivative, zero wherever a
    sample is clipped, would stop GD on those samples). Hence :func:`logistic_hessian_trace` is
    its trace, which ``zojax.hessian_trace`` reproduces as for :func:`logistic_loss`.

    Args:
        w: (D,) weights.
        features: (N, D) dense array or :class:`AffineFeatures`.
        labels: (N,) labels in {−1, +1}.

    Returns:
        The scalar mean loss.

    Example:
        >>> import jax.numpy as jnp
        >>> x, b = jnp.ones((2, 1)), jnp.array([1.0, -1.0])
        >>> round(float(clipped_logistic_loss(jnp.array([100.0]), x, b)), 2)  # (0 + 36.04) / 2
        18.02
    """
    return jnp.mean(_clipped_logistic(labels * _matvec(features, w)))


@jax.custom_jvp
def _clipped_logistic(margins: jax.Array) -> jax.Array:
    return jnp.clip(_logistic(margins), *_LOG_LOSS_RANGE)


@_clipped_logistic.defjvp
def _clipped_logistic_jvp(primals, tangents):  # straight through: the exact loss's derivatives
    value, tangent = jax.jvp(_logistic, primals, tangents)
    return jnp.clip(value, *_LOG_LOSS_RANGE), tangent


clipped_logistic_loss.along = _along(_clipped_logistic)


def accuracy(w: jax.Array, features, labels: jax.Array) -> jax.Array:
    """Fraction of correct signs, mean(sign(xᵢᵀw) = bᵢ); a score of exactly 0 predicts +1 and
    a NaN score makes the accuracy NaN.

    Example:
        >>> import jax.numpy as jnp
        >>> x, b = jnp.array([[1.0], [-1.0], [0.0], [2.0]]), jnp.ones(4)
        >>> float(accuracy(jnp.array([1.0]), x, b))
        0.75
    """
    # sign(2 sign(s) + 1) is sign(s) with sign(±0) = +1; a correct sign gives b·prediction = 1.
    # Arithmetic rather than a comparison: faster in XLA's CPU reductions (benchmarks/README.md).
    predictions = jnp.sign(2.0 * jnp.sign(_matvec(features, w)) + 1.0)
    return jnp.mean((1.0 + labels * predictions) / 2.0)


def svm_hessian_trace(w: jax.Array, features, labels: jax.Array) -> jax.Array:
    """Trace of the generalized Hessian of :func:`svm_loss`, (2/N) Σ_{bᵢ xᵢᵀw < 1} ‖xᵢ‖².

    Example:
        >>> import jax.numpy as jnp
        >>> x, b = jnp.array([[1.0], [2.0]]), jnp.ones(2)
        >>> float(svm_hessian_trace(jnp.array([0.5]), x, b))  # only row 1 has margin < 1
        1.0
    """
    active = labels * _matvec(features, w) < 1.0
    return 2.0 * jnp.mean(jnp.where(active, squared_row_norms(features), 0.0))


def logistic_hessian_trace(w: jax.Array, features, labels: jax.Array) -> jax.Array:
    """Trace of the Hessian of :func:`logistic_loss`, (1/N) Σᵢ pᵢ (1 − pᵢ) ‖xᵢ‖².

    Here pᵢ = sigmoid(xᵢᵀw). ``labels`` is unused (the Hessian does not depend on them); it
    keeps the ``fn(w, features, labels)`` signature.

    Example:
        >>> import jax.numpy as jnp
        >>> float(logistic_hessian_trace(jnp.zeros(1), jnp.array([[2.0]]), jnp.ones(1)))
        1.0
    """
    del labels
    scores = _matvec(features, w)
    # p (1 − p) = 1 / ((1 + e^−s)(1 + e^s)): no cancellation, 0 where an exp overflows, and one
    # division (XLA's CPU reductions run it faster than two sigmoids: benchmarks/README.md).
    return jnp.mean(squared_row_norms(features) / (2.0 + jnp.exp(scores) + jnp.exp(-scores)))


class Loss(NamedTuple):
    """A linear classifier's objective, ``fn(w, features, labels)``, with its closed-form trace."""

    title: str  # how plots name it.
    loss: Callable[..., jax.Array]  # the mean loss; it has a line form ``loss.along``.
    hessian_trace: Callable[..., jax.Array]  # the closed-form trace of its Hessian.


LOSSES = {
    "svm": Loss("SVM (squared hinge)", svm_loss, svm_hessian_trace),
    "logistic": Loss("logistic regression", logistic_loss, logistic_hessian_trace),
    "clipped_logistic": Loss("logistic regression (log_loss, clipped)", clipped_logistic_loss,
                             logistic_hessian_trace),
}
"""The losses of Figure 2 by name: :class:`Loss` (title, loss, closed-form Hessian trace)."""


@functools.partial(jax.jit, static_argnames=("num_features", "dtype"))
def random_features(key: jax.Array, train_inputs, test_inputs=None, num_features: int = 10_000,
                    dtype=jnp.float32) -> tuple[AffineFeatures, AffineFeatures | None]:
    """The paper's linear-probing map X = [1, S₂(S₁(inputs) W)] as :class:`AffineFeatures`.

    S₁ standardizes the raw inputs with the train mean/std (std 0 → 1), giving Φ;
    W ~ N(0, 1)^{d × m}; S₂ standardizes Φ W with train statistics computed from d × d
    quantities only: μ = mean(Φ_train) W and σ² = diag(Wᵀ C W) − μ², C = Φ_trainᵀ Φ_train / N
    (σ = 0 → 1). Both splits use the train statistics. Jit-compiled.

    Args:
        key: typed PRNG key for W.
        train_inputs: (N, d) raw train inputs.
        test_inputs: optional (N_test, d) raw test inputs.
        num_features: m, the number of random features (static); X has m + 1 columns.
        dtype: floating dtype of every array (static; float64 for exact checks under x64).

    Returns:
        ``(train_features, test_features)``; ``test_features`` is None without ``test_inputs``.

    Example:
        >>> import jax, numpy as np
        >>> train, test = random_features(jax.random.key(0), np.eye(3), num_features=5)
        >>> train.shape, test
        ((3, 6), None)
    """
    train = jnp.asarray(train_inputs, dtype)
    center = jnp.mean(train, axis=0)
    spread = jnp.std(train, axis=0)
    spread = jnp.where(spread > 0, spread, 1.0)
    phi = (train - center) / spread
    projection = jax.random.normal(key, (train.shape[1], num_features), dtype)

    mean = _mm(jnp.mean(phi, axis=0), projection)
    covariance = _mm(phi.T, phi) / phi.shape[0]
    variance = jnp.sum(projection * _mm(covariance, projection), axis=0) - jnp.square(mean)
    variance = jnp.maximum(variance, 0.0)
    scale = jnp.where(variance > 0, jnp.sqrt(variance), 1.0)

    train_features = AffineFeatures.create(phi, projection, mean, scale)
    if test_inputs is None:
        return train_features, None
    test_phi = (jnp.asarray(test_inputs, dtype) - center) / spread
    return train_features, AffineFeatures.create(test_phi, projection, mean, scale)


def init_params(key: jax.Array, dim: int, scale: float = 0.1) -> jax.Array:
    """Draws w₀ ~ N(0, scale² I_dim) (float32), the paper's initialization with scale = 0.1.

    Example:
        >>> import jax
        >>> init_params(jax.random.key(0), 5).shape
        (5,)
    """
    return scale * jax.random.normal(key, (dim,), jnp.float32)
