"""What a zojax transform checks of the optax wrappers around it, and the helpers they need.

A zeroth-order estimator computes its estimate from ``value_fn`` alone: the ``updates`` it is
given carry nothing it can use. Wrappers that feed it updates (``optax.MultiSteps`` around it,
a transform chained before it, ``optax.apply_if_finite`` around it, a dummy ``updates=params``
under ``optax.masked``) would have their work silently dropped, so :func:`check_updates`
refuses array updates and says what to do instead. Under ``optax.masked`` and
``optax.multi_transform`` the estimator receives params whose frozen leaves are
``optax.MaskedNode``: it perturbs the other leaves only, and evaluates the full params through
an objective made by :func:`fill_masked`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from zojax.objective import Objective

WRAPPERS_HELP = """\
Likely causes, and what to do instead:
- optax.MultiSteps(<zojax transform>, k): MultiSteps accumulates the incoming updates, which the \
estimator ignores, so only the last minibatch's estimate would be applied. Accumulate after the \
estimator: zojax.chain(zojax.two_point(...), optax.MultiSteps(optax.sgd(lr), k)).
- a transform chained before the estimator (optax.chain(optax.clip_by_global_norm(1.0), \
zojax.two_point(...), ...)): it would act on nothing. Put it after the estimator: \
zojax.chain(zojax.two_point(...), optax.clip_by_global_norm(1.0), optax.sgd(lr)).
- optax.apply_if_finite(<zojax transform>, k): it checks the incoming updates, not the \
estimate. zojax skips non-finite steps itself: use zojax.chain (the aliases zo_sgd, zo_adam, \
... are such chains), which leaves the params and the optimizer's state untouched on a step \
whose loss was not finite.
- optax.masked / optax.multi_transform: give None at the estimator's leaves, e.g. \
tx.update({"head": None, "body": body_grads}, state, params, \
value_fn=zojax.fill_masked(loss, params)).
Otherwise call update(None, state, params, value_fn=...)."""


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def check_updates(updates, name: str) -> None:
    """Raises ValueError when ``updates`` holds arrays (None and ``optax.MaskedNode`` leaves
    pass): an estimator would silently drop them. Checked when traced, from the structure
    alone."""
    arrays = [x for x in jax.tree.leaves(updates, is_leaf=_is_masked) if not _is_masked(x)]
    if arrays:
        raise ValueError(
            f"{name}.update was given incoming updates ({len(arrays)} array leaves), which a "
            "zeroth-order estimator cannot use: it estimates the gradient from value_fn alone "
            f"and would drop them.\n{WRAPPERS_HELP}")


def has_masked(params) -> bool:
    """Whether ``params`` has ``optax.MaskedNode`` leaves (the frozen part of optax.masked)."""
    return any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked))


def _filled(subset, params):
    """``subset`` with its ``optax.MaskedNode`` leaves taken from ``params``."""
    return jax.tree.map(lambda s, p: p if _is_masked(s) else s, subset, params,
                        is_leaf=_is_masked)


def fill_masked(fun: Callable, params) -> Objective:
    """The objective of a parameter subset: ``subset ↦ fun(subset with its frozen leaves)``.

    Under ``optax.masked`` or ``optax.multi_transform`` a zojax transform is given params whose
    unselected leaves are ``optax.MaskedNode``: it perturbs the selected leaves only, and needs
    the full params to evaluate the loss. ``fill_masked(loss, params)`` takes the
    ``optax.MaskedNode`` leaves of its argument from ``params`` (the current full params, as
    given to ``update``), keeping ``fun``'s line form (frozen leaves move by zero). A
    full-params argument (no ``MaskedNode``) is evaluated as is.

    Example:
        >>> import jax.numpy as jnp, optax, zojax
        >>> params = {"head": jnp.ones(2), "body": jnp.ones(3)}
        >>> loss = lambda p: jnp.sum(p["head"] ** 2) + jnp.sum(p["body"] ** 2)
        >>> tx = optax.multi_transform({"zo": zojax.zo_sgd(0.1, 1e-3), "fo": optax.sgd(0.1)},
        ...                            {"head": "zo", "body": "fo"})
        >>> updates, state = tx.update({"head": None, "body": 2 * params["body"]},
        ...                            tx.init(params), params,
        ...                            value_fn=zojax.fill_masked(loss, params))
        >>> bool(jnp.allclose(updates["body"], -0.2))  # the first-order part, as sgd made it
        True
    """
    value = fun.value if isinstance(fun, Objective) else fun
    along = fun.along if isinstance(fun, Objective) else getattr(fun, "along", None)

    def filled(subset, *args, **kwargs):
        return value(_filled(subset, params), *args, **kwargs)

    def filled_along(subset, direction, steps, *args, **kwargs):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return along(_filled(subset, params), _filled(direction, zeros), steps, *args,
                     **kwargs)

    filled.fills_masked = True
    return Objective(filled, None if along is None else filled_along)


def check_masked_objective(params, value_fn, name: str) -> None:
    """Raises ValueError when ``params`` has ``optax.MaskedNode`` leaves and ``value_fn`` was
    not made by :func:`fill_masked` (the user's loss would receive MaskedNodes)."""
    value = value_fn.value if isinstance(value_fn, Objective) else value_fn
    if has_masked(params) and not getattr(value, "fills_masked", False):
        raise ValueError(
            f"{name}.update was given params with optax.MaskedNode leaves (it runs inside "
            "optax.masked or optax.multi_transform): it perturbs the other leaves only, and "
            "needs the full params to evaluate the loss. Pass value_fn=zojax.fill_masked(loss, "
            "params) with the full params; or give the estimator the trainable subtree alone "
            "and close over the rest: opt.update(None, state, params['head'], value_fn=lambda "
            "head: loss({**params, 'head': head})).")
