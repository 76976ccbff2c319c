r"""The low-memory mode: every direction regenerated where it is used, never stored (MeZO).

``two_point(..., low_memory=True)`` (and :func:`zojax.zo_sgd`, :func:`zojax.zo_adam`,
:func:`zojax.zo_sign_sgd`) estimates what the default mode estimates, from the same key, but
never holds a direction: direction :math:`u_i` is drawn again at each of its uses, the points
:math:`x + \lambda u_i` and :math:`x - \lambda u_i` and the estimate :math:`\frac1q\sum_i c_i
u_i` (the step keeps the q scalars :math:`c_i`). For q = 1 the estimate is one elementwise
expression of the parameters' shapes, so in a jitted step with donated params XLA fuses it
into the optimizer's update and writes the new params in place: no parameter-sized buffer
beyond one perturbed copy of the parameters for the forward passes. For q > 1 each leaf's sum
is a loop over the q directions, the leaves one after the other (a few leaves' sums alive at a
time), and a leaf of at least :data:`UNROLLED_SHARE` of the parameters (an embedding table)
gets one unrolled expression fused into the update (see :func:`_sum_leaf_by_leaf`).

XLA merges identical computations and hoists what depends on nothing: the three draws of a
direction would become one stored draw, and the perturbed copies of every layer would be
computed before the first forward pass. So each use draws from the key combined with a zero
XLA cannot fold (``salt``, from a value the use must wait for: the minus pass's key waits for
f(x + λu), the estimate's for every value), and the draws stay where they are used. The same
bits: the salt is zero whenever the values are finite (a non-finite step is skipped anyway).

Two ways to evaluate the objective at :math:`x + t u`:

- any ``value_fn``: the whole perturbed copy of the parameters, one leaf regenerated into
  each; forward + about one parameter size;
- its *per-layer form* (:attr:`zojax.objective.Objective.perturbed`, built for Flax models by
  :func:`zojax.layerwise`): the model perturbs each layer's parameters as the layer reads them,
  from a :class:`Direction` whose key waits for the layer's input, and only the rows of an
  embedding table that the batch looks up (a counter-based draw of those rows alone, the same
  numbers as the whole table's).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zojax import pipeline, weightings
from zojax.directions import Perturbation, is_stateless
from zojax.objective import Objective


def zero_of(x) -> jax.Array:
    """A uint32 zero XLA cannot fold, computed from the first entry of ``x``: 1 only where its
    bits are all ones (a NaN for floats, -1 for ints), which no finite value or valid index
    has."""
    first = jnp.ravel(jnp.asarray(x))[0]
    if first.dtype == jnp.bool_:
        first = first.astype(jnp.uint8)
    width = jnp.dtype(first.dtype).itemsize * 8
    uint = np.dtype(f"uint{width}")
    bits = jax.lax.bitcast_convert_type(first, uint)
    return (bits == np.array(np.iinfo(uint).max, uint)).astype(jnp.uint32)


def _salted(key, salt):
    return jax.random.wrap_key_data(jax.random.key_data(key) ^ salt,
                                    impl=jax.random.key_impl(key))


class Direction:
    """One direction of a step, drawn leaf by leaf where it is used (:meth:`leaf`,
    :meth:`rows`); :meth:`after` gives the same direction keyed to wait for an array."""

    def __init__(self, perturbation: Perturbation, key, params, salt=None):
        self.perturbation, self.key, self.params = perturbation, key, params
        self.salt = jnp.zeros((), jnp.uint32) if salt is None else salt
        self.num_leaves = len(jax.tree.leaves(params))
        self._sampled = None  # a sampler's whole draw, when it cannot draw one leaf

    def after(self, x) -> "Direction":
        """The same direction, drawn only once ``x`` is computed."""
        return Direction(self.perturbation, self.key, self.params, self.salt ^ zero_of(x))

    def _key(self):
        return _salted(self.key, self.salt)

    def leaf(self, index: int) -> jax.Array:
        """Leaf ``index`` (in ``jax.tree.leaves(params)`` order) of the direction."""
        sample_leaf = self.perturbation.sample_leaf
        if sample_leaf is not None:
            return sample_leaf(self._key(), self.params, (), (), index)
        if self._sampled is None:
            self._sampled = jax.tree.leaves(
                self.perturbation.sample(self._key(), self.params, (), ()))
        return self._sampled[index]

    def rows(self, index: int, rows) -> jax.Array:
        """Rows ``rows`` (int array, any shape) of leaf ``index``: ``leaf(index)[rows]``, drawn
        alone where the sampler can (Gaussian, Rademacher)."""
        sample_leaf = self.perturbation.sample_leaf
        if sample_leaf is not None:
            return sample_leaf(self._key(), self.params, (), (), index, rows)
        return jnp.take(self.leaf(index), rows, axis=0)

    def tree_leaves(self) -> list:
        """The leaves of the whole direction."""
        return [self.leaf(j) for j in range(self.num_leaves)]

    def tree(self):
        """The whole direction, a pytree like ``params``."""
        return jax.tree.unflatten(jax.tree.structure(self.params), self.tree_leaves())


def check(perturbation: Perturbation, name: str) -> None:
    """Raises ValueError (at construction) unless ``perturbation`` can be regenerated."""
    if not is_stateless(perturbation):
        raise ValueError(
            f"{name}(low_memory=True) needs a direction drawn from the key alone; the "
            "direction given is a Perturbation with a state or a per-step context, whose "
            "directions the low-memory mode cannot regenerate. Use a named direction "
            "(\"gaussian\", \"rademacher\", ...) or a sampler sample(key, params), or "
            "low_memory=False.")


def perturbed_params(params, direction: Direction, step):
    """The whole perturbed copy ``x + step · u``, one regenerated leaf into each."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([pipeline._perturb(x, step, direction.leaf(j))
                              for j, x in enumerate(leaves)])


def _values(objective: Objective, params, direction: Direction, steps):
    """The values f(x + t_k u) of one direction, each use keyed to wait for the one before."""
    if objective.along is not None:
        return objective.along(params, direction.tree(), steps)
    values = []
    for k in range(steps.shape[0]):
        if objective.perturbed is not None:
            value = objective.perturbed(params, direction, steps[k])
        else:
            value = objective.value(perturbed_params(params, direction, steps[k]))
        values.append(value)
        direction = direction.after(value)
    return jnp.stack(values)


def estimate(objective: Objective, key, params, *, smoothing, num_directions: int,
             perturbation: Perturbation, scheme: str) -> pipeline.Estimate:
    """The :class:`zojax.pipeline.Estimate` of the two-point estimator, regenerating every
    direction (the same numbers as the default mode with ``chunk_size=1``, up to rounding)."""
    steps = pipeline.scheme_steps(scheme, smoothing, params)
    base = None
    if scheme == "forward":
        base = objective.value(params)
        base = base.astype(weightings.accumulator_dtype(base.dtype))

    def direction(i, salt):
        return Direction(perturbation, jax.random.fold_in(key, i), params, salt)

    def one(salt, i):
        values = _values(objective, params, direction(i, salt), steps)
        values = values.astype(weightings.accumulator_dtype(values.dtype))
        return salt ^ zero_of(values[-1:]), values

    indices = jnp.arange(num_directions, dtype=jnp.uint32)
    salt, values = jax.lax.scan(one, jnp.zeros((), jnp.uint32), indices)
    coefficients = pipeline.scheme_coefficients(scheme, smoothing, base)(values)
    salt = salt ^ zero_of(jnp.sum(coefficients))
    leaves, treedef = jax.tree.flatten(params)
    if num_directions > 1 and perturbation.sample_leaf is not None:
        total = _sum_leaf_by_leaf(leaves, coefficients, lambda i, j, salt: pipeline._applied(
            leaves[j], direction(i, salt).leaf(j), steps), salt)
    else:
        total = _sum_at_once(leaves, coefficients, lambda i, salt: [
            pipeline._applied(x, u, steps) for x, u in zip(
                leaves, direction(i, salt).tree_leaves())], indices, salt)
    grads = [(t / num_directions).astype(x.dtype) for t, x in zip(total, leaves)]
    finite = jnp.all(jnp.isfinite(values)) & jnp.isfinite(smoothing) & (smoothing > 0)
    if base is None:
        value, queries = jnp.mean(values), values.size
    else:
        finite &= jnp.isfinite(base)
        value, queries = base, values.size + 1
    return pipeline.Estimate(value, treedef.unflatten(grads), finite,
                             jnp.asarray(queries, jnp.int32), ())


def _weighted(c, u):
    """``c u`` in float32 or wider (as :func:`zojax.weightings.mean` accumulates)."""
    dtype = weightings.accumulator_dtype(u.dtype)
    return c.astype(dtype) * u.astype(dtype)


def _sum_at_once(leaves, coefficients, direction_leaves, indices, salt):
    """Σ_i c_i ũ_i, every leaf: the first term alone for q = 1 (one elementwise expression,
    which XLA fuses into the optimizer's update), else a loop over the directions into one
    parameter-sized sum (for samplers that draw a whole direction at once)."""
    def terms(i, c):
        return [_weighted(c, u) for u in direction_leaves(i, salt)]

    # The sum starts from the first term, which waits for every value: a zero-filled start could
    # be allocated before the forward passes and held through them.
    total = terms(np.uint32(0), coefficients[0])
    if len(coefficients) > 1:
        def add(total, ic):
            return [t + w for t, w in zip(total, terms(*ic))], None

        total, _ = jax.lax.scan(add, total, (indices[1:], coefficients[1:]))
    return total


# At q > 1, a leaf of at least this share of all parameter bytes (an embedding table) gets its
# sum Σ_i c_i ũ_i as one unrolled expression, which XLA fuses into the optimizer's update: no
# buffer, but q draws compiled into one kernel (compile time grows with q × such leaves). The
# others are summed by a loop each, one leaf after the other, each loop starting from its first
# term keyed on the previous leaf's sum: XLA then reuses their buffers (about three leaves alive
# at a time), where one loop over every leaf would hold a parameter-sized sum.
UNROLLED_SHARE = 1 / 16


def _sum_leaf_by_leaf(leaves, coefficients, direction_leaf, salt):
    """Σ_i c_i ũ_i leaf by leaf (q > 1), see :data:`UNROLLED_SHARE`."""
    sizes = [x.size * jnp.dtype(x.dtype).itemsize for x in leaves]
    total_size, num = sum(sizes), len(coefficients)
    out, previous = [], None
    for j, size in enumerate(sizes):
        if size >= UNROLLED_SHARE * total_size:
            terms = (_weighted(coefficients[i], direction_leaf(np.uint32(i), j, salt))
                     for i in range(num))
            out.append(functools.reduce(jnp.add, terms))
            continue
        here = salt if previous is None else salt ^ zero_of(previous)

        def add(i, acc, j=j, here=here):
            return acc + _weighted(coefficients[i], direction_leaf(i.astype(jnp.uint32), j, here))

        previous = jax.lax.fori_loop(
            1, num, add, _weighted(coefficients[0], direction_leaf(np.uint32(0), j, here)))
        out.append(previous)
    return out
