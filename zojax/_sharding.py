"""Directions split over the devices of a mesh axis (``directions_sharding``): the axes, the
even-split check and the ``shard_map`` of the estimators' loop (see :mod:`zojax.pipeline`)."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from zojax import weightings


def directions_axes(directions_sharding: NamedSharding) -> tuple[tuple[str, ...], int]:
    """The mesh axes that split the directions (the sharding's first partitioned entry) and the
    number of devices along them.

    Raises:
        ValueError: not a ``NamedSharding``, or one that partitions no axis.
    """
    if not isinstance(directions_sharding, NamedSharding):
        raise ValueError("directions_sharding must be a jax.sharding.NamedSharding, e.g. "
                         "NamedSharding(mesh, PartitionSpec('directions')), or None; got "
                         f"{directions_sharding!r}.")
    for entry in directions_sharding.spec:
        if entry is not None and entry != PartitionSpec.UNCONSTRAINED:
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            shape = directions_sharding.mesh.shape
            return axes, math.prod(shape[a] for a in axes)
    raise ValueError(f"directions_sharding {directions_sharding.spec} partitions no mesh axis; "
                     "name the axis that splits the directions, e.g. PartitionSpec("
                     f"{directions_sharding.mesh.axis_names[0]!r}) (mesh axes: "
                     f"{directions_sharding.mesh.axis_names}).")


def check_directions_sharding(directions_sharding, count: int,
                              name: str = "num_directions") -> None:
    """Raises ValueError unless ``count`` directions split evenly over ``directions_sharding``
    (None: nothing to check). No padding: a step never evaluates other than ``count``."""
    if directions_sharding is None:
        return
    axes, devices = directions_axes(directions_sharding)
    if count % devices:
        raise ValueError(
            f"{name}={count} does not split evenly over the {devices} devices of mesh axes "
            f"{axes}: choose a multiple of {devices} (directions are never padded).")


def sharded_loop(loop, weighting: weightings.Weighting, start, num: int,
                  directions_sharding: NamedSharding, *operands):
    """``loop(start, num, *operands) -> (acc, values)`` split over the devices of the
    directions axes.

    Each device runs ``loop`` on its ``num / n`` directions; the accumulators are combined
    (:func:`zojax.weightings.all_reduce`) and the values gathered in index order, so every
    device holds the whole ``(acc, values)``. The operands (key, params, state) enter
    replicated over the directions axes, keeping their sharding over the others.
    """
    axes, devices = directions_axes(directions_sharding)
    check_directions_sharding(directions_sharding, num)
    share = num // devices
    key = operands[0]
    if (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            and "philox" in str(jax.random.key_impl(key))):
        raise ValueError("directions_sharding needs threefry2x32 (JAX's default) or rbg keys: "
                         "philox4x32 draws do not compile inside shard_map in this JAX (their "
                         "mulhi has no StableHLO form).")

    def local(start, *operands):
        first = start + jax.lax.axis_index(axes).astype(jnp.uint32) * share
        acc, values = loop(first, share, *operands)
        return (weightings.all_reduce(weighting, acc, axes),
                jax.lax.all_gather(values, axes, tiled=True))

    mesh = directions_sharding.mesh
    # shard_map's other axes must be automatic: explicit ones are made so within, and the
    # outputs replicated (sharded parameters and their directions stay sharded inside).
    explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                     if t == AxisType.Explicit and a not in axes)
    if explicit:
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=tuple(
            AxisType.Auto if a in explicit else t for a, t in zip(mesh.axis_names,
                                                                   mesh.axis_types)))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(),
                           out_specs=PartitionSpec(), axis_names=frozenset(axes),
                           check_vma=False)
    if explicit:
        mapped = jax.sharding.auto_axes(
            mapped, axes=explicit,
            out_sharding=NamedSharding(directions_sharding.mesh, PartitionSpec()))
    return mapped(jnp.asarray(start, jnp.uint32), *operands)
