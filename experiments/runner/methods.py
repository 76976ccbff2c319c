"""How a method steps: :class:`Method`, and the one registry every experiment's methods come from.

:func:`method` builds a :class:`Method` from a zojax (or optax) optimizer's name: the member's
hyperparameters are passed by name to the factory (``zojax.zo_sgd(learning_rate=..., ...)``), so
what a member leaves out takes zojax's own default; the fields a member may set are the
factory's arguments; the queries per step (needed before a run, for query budgets, and for
first-order methods, whose state counts none) come from :data:`QUERIES` on the hyperparameters
completed with the factory's defaults. While training, the runner reads the estimator state's
``num_queries`` counter instead. An experiment's table names its methods:
``{"zo": method("zo_sgd"), "zo_np": method("natural", step="adam")}``.

:mod:`experiments.runner` re-exports every public name.
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

import zojax
from experiments.runner.config import TUNING_FIELDS, ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method steps: an optax optimizer built from a member's hyperparameters.

    Attributes:
        optimizer: ``optimizer(key, hparams) -> optax.GradientTransformation``. ``hparams`` holds
            every field the member sets; those named in ``traced`` arrive as traced scalars, so
            members that differ only in them share one compiled program; the others (static:
            ``num_directions``, ``direction``, ``chunk_size``, ...) as Python values. ``key`` is
            a typed PRNG key made from ``hparams["seed"]`` (0 when absent). With a
            ``directions`` axis in ``config.mesh_shape``, ``hparams["directions_sharding"]``
            holds its ``NamedSharding`` (pass it to the zojax transform; "zo" and "zest" do).
        queries_per_step: ``queries_per_step(hparams) -> int``, objective evaluations per step
            (a gradient or a jvp counts as one), used when the optimizer state has no
            ``num_queries`` counter (zojax's transforms have one, and it is read instead).
        uses_gradient: the optimizer receives ``jax.grad(loss)`` as updates (first-order);
            otherwise it receives ``None`` and evaluates ``value_fn`` itself.
        traced: hyperparameters swept inside one program (numeric, used in traced arithmetic).
        fields: the hyperparameters the method reads (``seed`` and the tuning fields of
            :mod:`experiments.runner.tuning` are always allowed, and the latter never reach
            ``optimizer``); a member setting another is an error listing these. Empty: not
            checked.
    """

    optimizer: Callable[[jax.Array, Mapping[str, Any]], optax.GradientTransformation]
    queries_per_step: Callable[[Mapping[str, Any]], int]
    uses_gradient: bool = False
    traced: tuple[str, ...] = ("learning_rate", "smoothing", "seed")
    fields: tuple[str, ...] = ()

    def check(self, member_name: str, method_name: str, hparams: Mapping[str, Any]) -> None:
        """Raises ConfigError naming the field and listing the method's fields."""
        known = (*self.fields, "seed", *TUNING_FIELDS)
        unknown = [k for k in hparams if self.fields and k not in known]
        if unknown:
            raise ConfigError(f"member {member_name!r}: method {method_name!r} has no field "
                              f"{unknown[0]!r}; its fields: {(*self.fields, 'seed')}, and "
                              f"which parameters it tunes: {TUNING_FIELDS}.")


def _two_point_queries(h) -> int:  # central: 2 per direction; forward: q + f(x)
    q = h["num_directions"]
    return 2 * q if h.get("scheme", "central") == "central" else q + 1


# zojax's (and optax's) optimizers by name: (factory, first-order, queries per step). The factory
# takes the member's hyperparameters by name; an estimator without a learning rate is chained with
# the method's step (optax.sgd unless ``method(..., step="adam")``).
FACTORIES: dict[str, tuple[Callable, bool]] = {
    "sgd": (optax.sgd, True),
    "adam": (optax.adam, True),
    "zo_sgd": (zojax.zo_sgd, False),
    "zo_adam": (zojax.zo_adam, False),
    "zo_sign_sgd": (zojax.zo_sign_sgd, False),
    "zest": (zojax.zest, False),
    "forward_gradient": (zojax.forward_gradient, False),
    "hizoo": (zojax.hizoo, False),
    "lozo": (zojax.lozo, False),
    "sparse_two_point": (zojax.sparse_two_point, False),
    "fzoo": (zojax.fzoo, False),
    "zo_svrg": (zojax.zo_svrg, False),
    "block_two_point": (zojax.block_two_point, False),
    "natural": (zojax.natural, False),
}
# Objective evaluations per step (a gradient or a jvp counts as one), given the hyperparameters
# completed with the factory's defaults: what the estimator state's num_queries grows by.
QUERIES: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "sgd": lambda h: 1,
    "adam": lambda h: 1,
    "zo_sgd": _two_point_queries,
    "zo_adam": _two_point_queries,
    "zo_sign_sgd": _two_point_queries,
    "zest": lambda h: h["num_directions"],  # 2k points: k ± pairs
    "forward_gradient": lambda h: h["num_directions"],  # q jvps
    "hizoo": lambda h: 2 * h["num_directions"] + 1,  # the pairs and f(x)
    "lozo": _two_point_queries,
    "sparse_two_point": _two_point_queries,
    "fzoo": lambda h: h["num_directions"] + 1,  # one-sided from one f(x)
    # 2q on a snapshot step, 4q between: the average over a snapshot period
    "zo_svrg": lambda h: 4 * h["num_directions"] - 2 * h["num_directions"] / h["snapshot_every"],
    # one-sided from one f(x); the natural method's Fisher refreshes are not counted here
    "block_two_point": lambda h: h["num_directions"] + 1,
    "natural": lambda h: h["num_directions"] + 1,
}
RENAMES = {"fisher_inputs": "num_fisher_inputs"}  # config field -> the factory's argument
_NOT_FIELDS = ("seed", "directions_sharding")  # given by the runner
TRACEABLE = ("learning_rate", "smoothing", "tilt", "seed")  # numeric, traced arithmetic only


def _parameters(factory) -> dict[str, inspect.Parameter]:
    """The factory's arguments by config field name (without the runner's)."""
    inverse = {v: k for k, v in RENAMES.items()}
    return {inverse.get(name, name): p for name, p in inspect.signature(factory).parameters.items()
            if name not in _NOT_FIELDS}


@dataclasses.dataclass(frozen=True)
class _Optimizer:
    """``optimizer(key, hparams)`` of a registry method (compared by value: equal methods share
    compiled programs)."""

    name: str
    step: str | None  # the optax step an estimator is chained with, None for optimizers
    fixed: tuple[tuple[str, Any], ...]  # hyperparameters the experiment fixes

    def __call__(self, key, hparams):
        factory, first_order = FACTORIES[self.name]
        accepted = inspect.signature(factory).parameters
        kwargs = {RENAMES.get(k, k): v for k, v in {**dict(self.fixed), **hparams}.items()
                  if k not in _NOT_FIELDS and (k != "learning_rate" or self.step is None)}
        if not first_order:
            kwargs["seed"] = key
        if "directions_sharding" in accepted and hparams.get("directions_sharding") is not None:
            kwargs["directions_sharding"] = hparams["directions_sharding"]
        transform = factory(**kwargs)
        if self.step is None:
            return transform
        return optax.chain(transform, getattr(optax, self.step)(hparams["learning_rate"]))


def method(name: str, *, step: str | None = None, **fixed) -> Method:
    """The :class:`Method` of zojax's (or optax's) optimizer ``name`` in :data:`FACTORIES`.

    Args:
        name: ``"sgd"``/``"adam"`` (first-order: the gradient as updates), a zojax alias with its
            own step (``"zo_sgd"``, ``"zo_adam"``, ``"zo_sign_sgd"``, ``"zest"``) or a zojax
            estimator (``"forward_gradient"``, ``"hizoo"``, ...) chained with ``step``.
        step: the optax optimizer an estimator is chained with (``"sgd"`` when None), e.g.
            ``"adam"``; ignored for the aliases and the first-order methods.
        **fixed: hyperparameters the experiment fixes (e.g. ``chunk_size=1``); members cannot set
            them.

    Returns:
        A :class:`Method` whose fields are the factory's arguments (``learning_rate`` first) less
        the fixed ones, whose traced fields are those of :data:`TRACEABLE` among them, and whose
        queries per step come from :data:`QUERIES`.
    """
    factory, first_order = FACTORIES[name]
    parameters = _parameters(factory)
    own_step = first_order or "learning_rate" in parameters
    fields = tuple(k for k in ("learning_rate", *parameters) if k not in fixed)
    fields = tuple(dict.fromkeys(fields))  # learning_rate once
    defaults = {k: p.default for k, p in parameters.items() if p.default is not p.empty}

    def queries(hparams):
        return QUERIES[name]({**defaults, **fixed, **hparams})

    return Method(_Optimizer(name, None if own_step else (step or "sgd"), tuple(sorted(
        fixed.items()))), queries, uses_gradient=first_order,
        traced=tuple(k for k in TRACEABLE if k in (*fields, "seed")), fields=fields)


METHODS: dict[str, Method] = {
    "gd": method("sgd"),  # gradient descent: one gradient per step
    "zo": method("zo_sgd"),  # two-point ZO-SGD: central 2q evaluations per step, forward q + 1
    "forward_grad": method("forward_gradient"),  # the λ → 0 limit of "zo": q jvps per step
    "zest": method("zest"),  # ZEST, the tilted estimator: num_directions evaluations per step
}
