"""Argument validation shared by the estimators and transforms."""

import inspect
import math
import numbers
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value):
    """Returns ``value`` as a Python number, or None when it is traced (e.g. under jit)."""
    if isinstance(value, jax.core.Tracer) or isinstance(value, bool | str):
        return None
    if not isinstance(value, numbers.Real | np.ndarray | np.generic | jax.Array):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_positive_finite(name: str, value) -> None:
    """Raises ValueError unless ``value`` is finite and > 0 (skipped when traced)."""
    if isinstance(value, jax.core.Tracer):
        return
    number = concrete_value(value)
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """Raises ValueError unless ``value`` is a Python int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or None" if allow_none else ""
        raise ValueError(
            f"{name} must be a static Python int >= 1{hint}, got {value!r}."
            + (" (Pass it in static_args of optax.inject_hyperparams.)"
               if hasattr(value, "dtype") else "")
        )


def check_int_like(name: str, value) -> None:
    """An int >= 1, or an integer array (traced under ``inject_hyperparams``: not checked)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, bool) or not (
            isinstance(value, int) or (hasattr(value, "dtype") and jnp.ndim(value) == 0
                                       and jnp.issubdtype(jnp.result_type(value), jnp.integer))):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


def check_bool(name: str, value) -> None:
    """Raises ValueError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_float_params(params) -> None:
    """Raises TypeError when a leaf of ``params`` is not a floating-point array."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct):
            where = jax.tree_util.keystr(path) or "params"
            raise TypeError(
                f"zeroth-order estimators need params that are arrays; {where} is a "
                f"{type(leaf).__name__}. Convert them first: params = jax.tree.map(jnp.asarray, "
                "params).")
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "params"
            raise TypeError(
                f"zeroth-order estimators need floating-point params; {where} has dtype {dtype}."
            )


def _describe_key(value) -> str:
    """What ``value`` is, for the error of :func:`check_prng_key`, with a hint."""
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return (f"a batch of PRNG keys of shape {tuple(shape)}: pass one key (jax.vmap the "
                    "call over a batch)")
        what = f"an array of shape {tuple(shape)} and dtype {dtype}"
    else:
        name = type(value).__name__
        what = f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"
    return f"{what}. Was the key left out?"


def _signature(function) -> str:
    """``name(arg, *args, keyword=default, **kwargs)``: ``function``'s call, no annotations."""
    signature = inspect.signature(function)
    signature = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty)
    return f"{function.__name__}{signature}"


def _raw_key_shape() -> tuple:
    """The shape of the default PRNG implementation's raw key data, ``(2,)`` for threefry."""
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def check_prng_key(key, function, *, allow_none: bool = False) -> None:
    """Raises TypeError unless ``key`` is one PRNG key, naming it and ``function``'s signature.

    For the functions called ``function(fun, key, params, *args, ...)``. One key is a typed key
    array of shape ``()`` (``jax.random.key``) or raw key data: a uint32 array of the default
    implementation's key shape (``(2,)`` for threefry, ``jax.random.PRNGKey``). Dtypes and
    shapes are static, so the check holds for tracers too (under ``jit``, and inside ``vmap``
    where a batch of keys is seen one key at a time).

    TypeError, as Python raises for a call with a missing positional argument and JAX for a
    value that is not a key: the usual mistake is a call without the key, which shifts
    ``params`` (a pytree) into its place and every later argument one place to the left.
    """
    if key is None and allow_none:
        return
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if tuple(shape) == ():
                return
        elif dtype == jnp.uint32 and tuple(shape) == _raw_key_shape():
            return
    raise TypeError(
        f"{_signature(function)}: the second argument, key, must be a PRNG key "
        f"(jax.random.key(0)); got {_describe_key(key)}")
