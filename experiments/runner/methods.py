"""How a method steps: :class:`Method`, an optax optimizer built from a member's hyperparameters.

:mod:`experiments.runner` re-exports every public name.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

import zojax
from experiments.runner.config import ConfigError


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
        fields: the hyperparameters the method reads (``seed`` is always allowed); a member
            setting another is an error listing these. Empty: not checked.
    """

    optimizer: Callable[[jax.Array, Mapping[str, Any]], optax.GradientTransformation]
    queries_per_step: Callable[[Mapping[str, Any]], int]
    uses_gradient: bool = False
    traced: tuple[str, ...] = ("learning_rate", "smoothing", "seed")
    fields: tuple[str, ...] = ()

    def check(self, member_name: str, method_name: str, hparams: Mapping[str, Any]) -> None:
        """Raises ConfigError naming the field and listing the method's fields."""
        unknown = [k for k in hparams if self.fields and k not in (*self.fields, "seed")]
        if unknown:
            raise ConfigError(f"member {member_name!r}: method {method_name!r} has no field "
                              f"{unknown[0]!r}; its fields: {(*self.fields, 'seed')}.")


def _gd(key, hparams):
    del key
    return optax.sgd(hparams["learning_rate"])


def _zo(key, hparams):
    return zojax.zo_sgd(hparams["learning_rate"], hparams["smoothing"],
                        hparams.get("num_directions", 1),
                        direction=hparams.get("direction", "gaussian"),
                        scheme=hparams.get("scheme", "central"),
                        chunk_size=hparams.get("chunk_size"), seed=key,
                        directions_sharding=hparams.get("directions_sharding"))


def _zo_queries(hparams):
    q = hparams.get("num_directions", 1)
    return 2 * q if hparams.get("scheme", "central") == "central" else q + 1


def _forward_grad(key, hparams):
    estimate = zojax.forward_gradient(hparams.get("num_directions", 1),
                                      direction=hparams.get("direction", "gaussian"),
                                      chunk_size=hparams.get("chunk_size"), seed=key)
    return optax.chain(estimate, optax.sgd(hparams["learning_rate"]))


def _zest(key, hparams):
    return zojax.zest(hparams["learning_rate"], hparams["smoothing"], hparams["tilt"],
                      hparams["num_directions"], direction=hparams.get("direction", "gaussian"),
                      antithetic=hparams.get("antithetic", True),
                      chunk_size=hparams.get("chunk_size"), seed=key,
                      directions_sharding=hparams.get("directions_sharding"))


METHODS: dict[str, Method] = {
    # Gradient descent: one gradient per step.
    "gd": Method(_gd, lambda hparams: 1, uses_gradient=True, fields=("learning_rate",)),
    # Two-point ZO-SGD: central 2q evaluations per step, forward q + 1.
    "zo": Method(_zo, _zo_queries, fields=("learning_rate", "smoothing", "num_directions",
                                           "direction", "scheme", "chunk_size")),
    # The λ → 0 limit of "zo", (uᵀ∇f)u by jvp: q jvps per step.
    "forward_grad": Method(_forward_grad, lambda hparams: hparams.get("num_directions", 1),
                           fields=("learning_rate", "num_directions", "direction",
                                   "chunk_size")),
    # ZEST, the tilted estimator: num_directions evaluations per step (2k points: k ± pairs).
    "zest": Method(_zest, lambda hparams: hparams["num_directions"],
                   traced=("learning_rate", "smoothing", "tilt", "seed"),
                   fields=("learning_rate", "smoothing", "tilt", "num_directions", "direction",
                           "antithetic", "chunk_size")),
}

