"""Argument validation shared by the estimators and transforms."""

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


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_float_params(params) -> None:
    """Raises TypeError when a leaf of ``params`` is not floating point."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "params"
            raise TypeError(
                f"zeroth-order estimators need floating-point params; {where} has dtype {dtype}."
            )
