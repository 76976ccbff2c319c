"""The objective an estimator evaluates: :class:`Objective` (a value and, optionally, its line
form), :func:`as_objective` (the one place its outputs are checked) and :func:`bind` (data
arguments fixed, the line form kept)."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
    r"""An objective ``value(params) -> scalar`` and, optionally, its line form.

    The *line form* ``along(params, direction, steps) -> [f(x + t_k u)]_k`` (one value per
    entry of the 1-D ``steps``, up to rounding) is evaluated by the estimators instead of
    ``value`` at perturbed copies of ``params``. For a model linear in its first stage,
    :math:`f(x) = h(Ax)`, it computes :math:`Ax` and :math:`Au` once and :math:`h(Ax + t\,Au)`
    for each step: ``q`` directions cost ``q + 1`` products with :math:`A` instead of ``2q``.
    An Objective is called like its ``value``; build one with :func:`bind` to fix data
    arguments. A function with an ``along`` attribute is read as an Objective with that line
    form; a plain callable has none. (A dataclass, not a NamedTuple: ``jax.jit`` takes it, and
    pytree functions see it as a leaf.)
    """

    value: Callable[..., jax.Array]
    along: Callable[..., jax.Array] | None = None
    # The per-layer form, ``perturbed(params, direction, step) -> f(x + step · u)`` with ``u`` a
    # :class:`zojax.low_memory.Direction` read leaf by leaf where the model uses it (the
    # low-memory mode evaluates it instead of ``value``; see :func:`zojax.layerwise`).
    perturbed: Callable[..., jax.Array] | None = None

    def __call__(self, params, *args, **kwargs):
        return self.value(params, *args, **kwargs)


def as_objective(fun: Callable, name: str = "fun") -> Objective:
    """``fun`` as an :class:`Objective` whose value and line form check their output shapes.

    Raises (when called):
        ValueError: the value is not a scalar (a ``(loss, aux)`` pair included), or the line
            form does not return one value per step (the message names ``name`` and the
            shapes).

    An objective this function made is returned as it is (checked once, whoever asks again).
    """
    if isinstance(fun, Objective) and getattr(fun.value, "checks_outputs", False):
        return fun
    value = fun.value if isinstance(fun, Objective) else fun
    along = fun.along if isinstance(fun, Objective) else getattr(fun, "along", None)
    perturbed = fun.perturbed if isinstance(fun, Objective) else None

    def checked_value(*args, **kwargs):
        return checked(value(*args, **kwargs))

    def checked(out):
        if isinstance(out, tuple | list | dict):
            raise ValueError(
                f"{name} must return a scalar loss, got a {type(out).__name__} (a (loss, aux) "
                "pair?). zojax's estimators only evaluate the loss and have no has_aux: pass "
                f"{name}=lambda p: loss_and_aux(p)[0], and compute aux apart from the step.")
        if jnp.shape(out) != ():
            raise ValueError(f"{name} must return a scalar, got an output of shape "
                             f"{jnp.shape(out)}.")
        return out

    def checked_along(params, direction, steps, *args, **kwargs):
        out = along(params, direction, steps, *args, **kwargs)
        if jnp.shape(out) != jnp.shape(steps):
            raise ValueError(f"{name}.along must return one value per step, shape "
                             f"{jnp.shape(steps)}; got {jnp.shape(out)}.")
        return out

    def checked_perturbed(params, direction, step):
        return checked(perturbed(params, direction, step))

    checked_value.checks_outputs = True
    return Objective(checked_value, None if along is None else checked_along,
                     None if perturbed is None else checked_perturbed)


def bind(fun: Callable, *args, **kwargs) -> Objective:
    r"""Returns the :class:`Objective` ``params ↦ fun(params, *args, **kwargs)``, keeping
    ``fun``'s line form (``fun.along(params, direction, steps, *args, **kwargs)``).

    Use it for ``value_fn`` of the transforms: a ``lambda`` drops the line form. The losses of
    :mod:`zojax.problems.linear` have one; under a ``vmap`` over parameters that share their
    directions (a sweep with one seed) their :math:`Au` is then computed once for all members.

    Example:
        >>> import jax.numpy as jnp
        >>> def loss(w, a):
        ...     return jnp.sum((a @ w) ** 2)
        >>> def loss_along(w, u, steps, a):  # h(Aw + t Au) for every step t
        ...     return jnp.sum((a @ w + steps[:, None] * (a @ u)) ** 2, axis=1)
        >>> value_fn = bind(Objective(loss, loss_along), 2 * jnp.eye(2))
        >>> float(value_fn(jnp.ones(2)))
        8.0
        >>> value_fn.along(jnp.ones(2), jnp.ones(2), jnp.array([0.0, 1.0])).tolist()
        [8.0, 32.0]
    """
    value = fun.value if isinstance(fun, Objective) else fun
    along = fun.along if isinstance(fun, Objective) else getattr(fun, "along", None)
    perturbed = fun.perturbed if isinstance(fun, Objective) else None

    def bound(params):
        return value(params, *args, **kwargs)

    def bound_along(params, direction, steps):
        return along(params, direction, steps, *args, **kwargs)

    def bound_perturbed(params, direction, step):
        return perturbed(params, direction, step, *args, **kwargs)

    return Objective(bound, None if along is None else bound_along,
                     None if perturbed is None else bound_perturbed)
