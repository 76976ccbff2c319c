r"""Parameter-efficient fine-tuning: train a part of the parameters, the rest frozen (LoRA, and
the parameter subsets it is built on).

A zeroth-order estimator perturbs every leaf of the params it is given. To fine-tune a part of
a model, give it that part alone, and evaluate the loss on the full parameters built from it and
the frozen rest:

- :func:`select` takes the leaves whose paths match regular expressions (a *subset*: nested
  dicts holding the selected leaves alone), :func:`combine` puts a subset back into the full
  params, and :func:`freeze` makes the subset's objective ``subset ↦ loss(combine(params,
  subset))``, the frozen params closed over: never perturbed, never updated. Prefix tuning
  trains such a subset (the key/value prefixes of :mod:`experiments.models.prefix`).
- LoRA (Hu et al., 2021) trains rank-r *adapters* of selected matrices, :math:`W + \frac{\alpha}
  {r} A B` with :math:`A` (in × r) and :math:`B` (r × out) (Flax's ``(in, out)`` kernels:
  ``x @ W``): :func:`init` makes them (:math:`B = 0`, so the merged weights start at
  :math:`W`), :func:`merge` computes the merged params, and :func:`objective` the adapters'
  objective, merged inside the loss.

A path is the ``/``-joined key path of a leaf (``"layer_0/query/kernel"``; a list index is its
number), and a pattern selects the leaves it matches entirely (:func:`re.fullmatch`):
``r".*(query|value)/kernel"`` selects every query and value kernel. An estimator then perturbs
the subset (or the adapters) alone, in both memory modes: the low-memory mode regenerates a
direction of the adapters' size, and each evaluation merges the selected matrices (one copy of
those matrices, not of the model). :func:`zojax.layerwise`, the per-layer form of full-parameter
steps, has nothing to save here: ``objective(layerwise(loss), ...)`` uses the plain value, and
``layerwise(objective(...))`` is an error saying so.

Example (a jitted training step: :func:`objective`):
    >>> import jax, jax.numpy as jnp, zojax
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> adapters = zojax.lora.init(jax.random.key(0), params, r"dense/kernel", rank=2)
    >>> jax.tree.map(jnp.shape, adapters)
    {'dense': {'kernel': Adapter(a=(4, 2), b=(2, 3))}}
    >>> merged = zojax.lora.merge(params, adapters, alpha=4.0)  # W + (4 / 2) A B, B = 0 at init
    >>> bool(jnp.all(merged["dense"]["kernel"] == 1.0))
    True
"""

import functools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zojax import weightings
from zojax.objective import Objective


class Adapter(NamedTuple):
    """The LoRA adapter of one matrix ``W`` (in × out): ``W + (alpha / r) · a @ b``."""

    a: jax.Array  # (in, r), the dtype of W; random at init
    b: jax.Array  # (r, out), the dtype of W; zeros at init


def path_name(path) -> str:
    """The ``/``-joined name of a key path (``jax.tree_util`` path entries): dict keys,
    attribute names and list indices."""
    return "/".join(str(_entry(k)) for k in path)


def _entry(k):
    for attribute in ("key", "name", "idx"):
        if hasattr(k, attribute):
            return getattr(k, attribute)
    return str(k)


def _patterns(paths: str | Sequence[str]) -> tuple[str, ...]:
    patterns = (paths,) if isinstance(paths, str) else tuple(paths)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"paths must be a regular expression or a non-empty sequence of them, "
                         f"got {paths!r}.")
    return patterns


def select(params, paths: str | Sequence[str]) -> dict:
    """The leaves of ``params`` whose paths match one of ``paths``, as nested dicts mirroring
    their paths (a *subset*; the other leaves left out).

    Args:
        params: a pytree (nested dicts, as Flax's params; lists and tuples too); arrays or
            ``jax.ShapeDtypeStruct`` leaves.
        paths: a regular expression or a sequence of them, each matched against the whole
            ``/``-joined path of every leaf (:func:`re.fullmatch`, see :func:`path_name`).

    Returns:
        ``{key: {...: leaf}}`` holding every selected leaf at its path.

    Raises:
        ValueError: a pattern matches no leaf (the message names it and lists some paths).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "b": jnp.ones(3)}
        >>> jax.tree.map(jnp.shape, select(params, [r".*kernel", "b"]))
        {'a': {'kernel': (2, 2)}, 'b': (3,)}
    """
    patterns = _patterns(paths)
    named = [(path_name(path), path, x)
             for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    subset: dict = {}
    for pattern in patterns:
        matched = [(path, x) for name, path, x in named if re.fullmatch(pattern, name)]
        if not matched:
            known = [name for name, _, _ in named]
            shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise ValueError(f"the path pattern {pattern!r} matches no parameter (patterns match "
                             f"whole '/'-joined paths, re.fullmatch); the paths: {shown}.")
        for path, x in matched:
            node = subset
            for k in path[:-1]:
                node = node.setdefault(_entry(k), {})
            node[_entry(path[-1])] = x
    return subset


def _lookup(subset, path, is_leaf):
    """The entry of ``subset`` at ``path``, or None."""
    node = subset
    for k in path:
        if not isinstance(node, dict) or is_leaf(node):
            return None
        node = node.get(_entry(k))
        if node is None:
            return None
    return node


def _replace(params, subset, fn: Callable, is_leaf=lambda x: False, name="combine"):
    """``params`` with ``fn(leaf, entry, path)`` at the leaves ``subset`` has an entry for."""
    wanted = {path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(
        subset, is_leaf=is_leaf)[0]}
    found = set()

    def replace(path, x):
        entry = _lookup(subset, path, is_leaf)
        if entry is None:
            return x
        found.add(path_name(path))
        return fn(x, entry, path_name(path))

    out = jax.tree_util.tree_map_with_path(replace, params)
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"zojax.lora.{name}: {missing[0]!r} is not the path of a leaf of the "
                         "params (a subset or adapters made for other params?).")
    return out


def combine(params, subset):
    """``params`` with the leaves of ``subset`` (from :func:`select`) in place of its own.

    Raises:
        ValueError: a leaf of ``subset`` is at no leaf's path of ``params`` (named), or has
            another shape or dtype than the leaf it replaces.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
        >>> combine(params, {"b": jnp.ones(3)})["b"].tolist()
        [1.0, 1.0, 1.0]
    """
    def replace(x, new, name):
        if jnp.shape(new) != jnp.shape(x) or jnp.result_type(new) != jnp.result_type(x):
            raise ValueError(f"zojax.lora.combine: the subset's {name!r} is "
                             f"{jnp.result_type(new)}{list(jnp.shape(new))}, the params' "
                             f"{jnp.result_type(x)}{list(jnp.shape(x))}.")
        return new

    return _replace(params, subset, replace)


def freeze(loss: Callable, params, build: Callable = combine) -> Objective:
    """The objective of a trained part: ``trained ↦ loss(build(params, trained), *args)``.

    ``params`` (the full params) are closed over, frozen: an estimator given ``trained``
    perturbs and updates ``trained`` alone. Pass the params into a jitted step as an argument
    and build the objective inside it (closed-over arrays would be compiled into the program
    as constants).

    Args:
        loss: ``loss(params, *args, **kwargs) -> scalar`` on the full params (an
            :class:`~zojax.objective.Objective`'s value; its line and per-layer forms, which
            perturb the full params, are not kept).
        params: the full params, frozen.
        build: ``build(params, trained) -> full params``: :func:`combine` (a subset, the
            default) or ``functools.partial(merge, alpha=alpha)`` (LoRA adapters, what
            :func:`objective` passes).

    Returns:
        An :class:`~zojax.objective.Objective` ``value(trained, *args, **kwargs)``, for the
        estimators' ``value_fn`` (with :func:`zojax.objective.bind` for the data).

    Example:
        >>> import jax, jax.numpy as jnp, zojax
        >>> params = {"head": jnp.ones(2), "body": jnp.ones(3)}
        >>> loss = lambda p: jnp.sum(p["head"] ** 2) + jnp.sum(p["body"] ** 2)
        >>> head = select(params, "head")
        >>> vg = zojax.zo_value_and_grad(freeze(loss, params), smoothing=1e-3)
        >>> value, grads = vg(jax.random.key(0), head)
        >>> list(grads)
        ['head']
    """
    value = loss.value if isinstance(loss, Objective) else loss

    def frozen(trained, *args, **kwargs):
        return value(build(params, trained), *args, **kwargs)

    return Objective(frozen)


# ---------------------------------------------------------------------------------------------
# LoRA.


def _is_adapter(x) -> bool:
    return isinstance(x, Adapter)


def init(key, params, paths: str | Sequence[str], rank: int = 8) -> dict:
    r"""LoRA adapters of the matrices of ``params`` that ``paths`` select.

    Each selected matrix ``W`` (in × out) gets an :class:`Adapter`: ``a`` (in × rank) uniform in
    :math:`\pm 1/\sqrt{in}` (PEFT's Kaiming-uniform initialization of ``lora_A``), ``b`` (rank
    × out) zeros, both in ``W``'s dtype: the merged weights start at ``W``.

    Args:
        key: a PRNG key (``a``'s draws).
        params: the params (arrays; ``jax.ShapeDtypeStruct``s under ``jax.eval_shape``).
        paths: regular expressions, matched against whole paths as in :func:`select`.
        rank: the adapters' rank ``r``, a positive int (static).

    Returns:
        The adapters: nested dicts mirroring the selected paths, an :class:`Adapter` at each.

    Raises:
        ValueError: a pattern matches nothing (named), a selected leaf is not a 2-D floating
            point matrix (named, with its shape), or ``rank`` is not a positive int.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"q": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
        >>> adapters = init(jax.random.key(0), params, r".*kernel", rank=2)
        >>> adapters["q"]["kernel"].a.shape, float(jnp.abs(adapters["q"]["kernel"].b).max())
        ((8, 2), 0.0)
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    subset = select(params, paths)
    named = [(path_name(path), w) for path, w in jax.tree_util.tree_flatten_with_path(subset)[0]]
    for name, w in named:
        dtype = jnp.result_type(w)
        if len(jnp.shape(w)) != 2 or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"zojax.lora.init: LoRA adapts matrices; the selected parameter "
                             f"{name!r} is {dtype}{list(jnp.shape(w))}. Select 2-D floating "
                             "point leaves only (e.g. r'.*query/kernel', not the bias).")
    keys = iter(jax.random.split(key, max(len(named), 1)))

    def adapter(w):
        fan_in, fan_out = jnp.shape(w)
        bound = 1.0 / np.sqrt(fan_in)
        dtype = jnp.result_type(w)
        a = jax.random.uniform(next(keys), (fan_in, rank), jnp.float32, -bound, bound)
        return Adapter(a.astype(dtype), jnp.zeros((rank, fan_out), dtype))

    return jax.tree.map(adapter, subset)


def merge(params, adapters, alpha=16.0):
    r"""``params`` with :math:`W + \frac{\alpha}{r} A B` at each adapted matrix, the rest as is.

    The product and the sum are computed in float32 (or wider) and rounded once to ``W``'s
    dtype. ``r`` is read from the adapters' shapes.

    Args:
        params: the base params.
        adapters: from :func:`init` (or trained from it).
        alpha: the scale :math:`\alpha` (numeric, may be traced).

    Raises:
        ValueError: an adapter is at no leaf of ``params``, or its shapes do not fit the matrix
            (named).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.zeros((2, 2))}
        >>> adapters = {"w": Adapter(jnp.ones((2, 1)), jnp.ones((1, 2)))}
        >>> merge(params, adapters, alpha=2.0)["w"].tolist()
        [[2.0, 2.0], [2.0, 2.0]]
    """
    def merged(w, adapter, name):
        a, b = adapter
        rank = jnp.shape(a)[-1]
        if (len(jnp.shape(w)) != 2 or jnp.shape(a) != (jnp.shape(w)[0], rank)
                or jnp.shape(b) != (rank, jnp.shape(w)[1])):
            raise ValueError(f"zojax.lora.merge: the adapter of {name!r} has a {jnp.shape(a)}, "
                             f"b {jnp.shape(b)}; the matrix is {jnp.shape(w)}.")
        dtype = weightings.accumulator_dtype(jnp.result_type(w))
        delta = jnp.matmul(a, b, preferred_element_type=dtype) * jnp.asarray(
            alpha / rank, dtype)
        return (w.astype(dtype) + delta).astype(w.dtype)

    return _replace(params, adapters, merged, _is_adapter, "merge")


def objective(loss: Callable, params, alpha=16.0) -> Objective:
    r"""The adapters' objective: ``adapters ↦ loss(merge(params, adapters, alpha), *args)``.

    :func:`freeze` with :func:`merge`: the base ``params`` closed over and frozen (pass them
    into a jitted step as an argument). Any zojax estimator, in either memory mode, then
    perturbs and updates the adapters alone.

    Args:
        loss: ``loss(params, *args, **kwargs) -> scalar`` on the full params.
        params: the base params.
        alpha: the LoRA scale :math:`\alpha` (numeric, may be traced); MeZO's is 16 with r = 8.

    Returns:
        An :class:`~zojax.objective.Objective` ``value(adapters, *args, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, zojax
        >>> params = {"w": jnp.eye(3)}
        >>> loss = lambda p, x: jnp.sum((x @ p["w"]) ** 2)
        >>> adapters = zojax.lora.init(jax.random.key(0), params, "w", rank=1)
        >>> opt = optax.chain(zojax.two_point(1e-3, 4), optax.adam(1e-2))
        >>> @jax.jit
        ... def step(adapters, state, params, x):
        ...     value_fn = zojax.objective.bind(zojax.lora.objective(loss, params), x)
        ...     updates, state = opt.update(None, state, adapters, value_fn=value_fn)
        ...     return optax.apply_updates(adapters, updates), state
        >>> adapters, state = step(adapters, opt.init(adapters), params, jnp.ones((2, 3)))
        >>> adapters["w"].b.shape
        (1, 3)
    """
    return freeze(loss, params, functools.partial(merge, alpha=alpha))

