"""Which parameters a member tunes: every one, LoRA adapters, or a subset such as a prefix.

Four fields any method takes, next to its optimizer's (a member that sets none tunes every
parameter, as before):

- ``tuning``: ``"full"`` (default), ``"lora"`` (rank-``lora_rank`` adapters of the matrices
  ``tuned_paths`` selects, merged as W + (α/r)·A B inside the loss: :mod:`zojax.lora`) or
  ``"prefix"`` (the leaves ``tuned_paths`` selects, by default the key/value prefixes of
  :mod:`experiments.models.prefix`; the problem's model must have one, ``prefix_length`` > 0);
- ``lora_rank`` (default 8) and ``lora_alpha`` (default 16.0): MeZO's LoRA;
- ``tuned_paths``: one regular expression matched against whole ``/``-joined parameter paths
  (:func:`zojax.lora.select`; one string, since a tuple is a sweep); default
  :data:`DEFAULT_PATHS`.

The runner trains such a member on :func:`tuned_problem`: its params are the adapters (or the
subset), what the optimizer perturbs and updates, what checkpoints and :func:`load_member` hold;
the base params are frozen, passed to the compiled program as the last data argument (not
compiled into it), and the loss, the metrics and the final metrics are evaluated on the merged
(or combined) params. LoRA's ``A`` is drawn from the fixed key 0, so every member of a problem
starts from the same adapters. A problem's ``extra_args`` are given the loss's arguments without
the base params; a function of the params among them (natural perturbations' ``output_fn``)
would receive the adapters or subset, so such methods do not combine with tuning yet.
"""

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import NamedTuple

import jax

import zojax
from experiments.runner.config import TUNING_FIELDS, ConfigError
from experiments.runner.spec import Member, Problem

FIELDS = TUNING_FIELDS
KINDS = ("full", "lora", "prefix")
DEFAULT_PATHS = {
    # the attention's query and value kernels of the MiniLM and Llama ports (MeZO's LoRA)
    "lora": r".*(query|value|q_proj|v_proj)/kernel",
    "prefix": r"(.*/)?prefix/(key|value)",  # experiments.models.prefix.PATHS
}


def settings(member: Member) -> tuple | None:
    """``(kind, paths, rank, alpha)`` of a member, None when it tunes every parameter.

    Raises:
        ConfigError: an unknown ``tuning``, a rank that is not a positive int, a non-positive
            alpha, paths that are not one string (each naming the member and the field).
    """
    h = member.hparams
    kind = h.get("tuning", "full")
    if kind not in KINDS:
        raise ConfigError(f"member {member.name!r}: tuning must be one of {KINDS}, got "
                          f"{kind!r}.")
    rank, alpha = h.get("lora_rank", 8), h.get("lora_alpha", 16.0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"member {member.name!r}: lora_rank must be a positive int, got "
                          f"{rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ConfigError(f"member {member.name!r}: lora_alpha must be positive, got "
                          f"{alpha!r}.")
    paths = h.get("tuned_paths")
    if paths is not None and not isinstance(paths, str):
        raise ConfigError(f"member {member.name!r}: tuned_paths must be one regular expression "
                          f"(use alternation, 'a|b'), got {paths!r}.")
    if kind == "full":
        if paths is not None:
            raise ConfigError(f"member {member.name!r}: tuned_paths needs tuning 'lora' or "
                              "'prefix'.")
        return None
    return kind, paths or DEFAULT_PATHS[kind], rank if kind == "lora" else None, (
        float(alpha) if kind == "lora" else None)


class TunedPart(NamedTuple):
    """What a function with ``takes_tuned = True`` (a problem's metrics, say) receives as its
    ``tuned`` keyword on a member that tunes a part: e.g. the Hessian trace of the adapters,
    ``zojax.hutchinson_trace(lambda t: loss(part.params(t), ...), key, part.tuned, ...)``."""

    tuned: dict  # the LoRA adapters or the parameter subset the member trains
    base: dict  # the frozen params
    alpha: float | None  # LoRA's scale; None for a subset

    def params(self, tuned) -> dict:
        """The whole params of ``tuned`` (merged with, or put into, the base)."""
        if self.alpha is None:
            return zojax.lora.combine(self.base, tuned)
        return zojax.lora.merge(self.base, tuned, self.alpha)


@dataclasses.dataclass(frozen=True)
class Tuned:
    """``fn(params, *args)`` of a problem evaluated on the tuned part:
    ``fn(build(base, tuned), *args)``, the base params the last argument (compared by value:
    equal ones share compiled programs). A ``fn`` with the attribute ``takes_tuned = True`` also
    receives ``tuned=`` a :class:`TunedPart`."""

    fn: Callable
    alpha: float | None  # None: a subset (zojax.lora.combine); else LoRA's scale

    def __call__(self, tuned, *args):
        *args, base = args
        part = TunedPart(tuned, base, self.alpha)
        if getattr(self.fn, "takes_tuned", False):
            return self.fn(part.params(tuned), *args, tuned=part)
        return self.fn(part.params(tuned), *args)


@dataclasses.dataclass(frozen=True)
class _WithoutBase:
    """``fn(*args)`` of the problem's ``extra_args``, the base params dropped."""

    fn: Callable

    def __call__(self, *args):
        return self.fn(*args[:-1])


def _init(params, kind: str, paths: str, rank: int | None):
    if kind == "lora":
        return zojax.lora.init(jax.random.key(0), params, paths, rank)
    return zojax.lora.select(params, paths)


_TUNED: "weakref.WeakKeyDictionary[Problem, dict]" = weakref.WeakKeyDictionary()


def _tuned(problem: Problem, kind: str, paths: str, rank: int | None,
           alpha: float | None) -> Problem:
    made = _TUNED.setdefault(problem, {})
    if (kind, paths, rank, alpha) not in made:
        made[kind, paths, rank, alpha] = _make(problem, kind, paths, rank, alpha)
    return made[kind, paths, rank, alpha]


def _make(problem: Problem, kind: str, paths: str, rank: int | None,
          alpha: float | None) -> Problem:
    try:
        init = _init(problem.init_params, kind, paths, rank)
    except ValueError as error:
        raise ConfigError(f"tuning {kind!r}: {error}") from None
    base = problem.init_params
    wrap = functools.partial(Tuned, alpha=alpha)
    data = (*problem.data, base)
    return dataclasses.replace(
        problem, loss=wrap(problem.loss), metrics=wrap(problem.metrics), init_params=init,
        data=data, reference_metrics={k: wrap(v) for k, v in problem.reference_metrics.items()},
        eval_data=None if problem.eval_data is None else (*problem.eval_data, base),
        extra_args=None if problem.extra_args is None else _WithoutBase(problem.extra_args),
        final_metrics=None if problem.final_metrics is None else wrap(problem.final_metrics))


def tuned_problem(member: Member) -> Problem:
    """The problem ``member`` trains: its own for ``tuning="full"``, else the problem of its
    adapters or subset (the module docstring); one per problem and settings, so members that
    tune alike share it (and their programs).

    Raises:
        ConfigError: bad settings (:func:`settings`), a pattern that matches no parameter or a
            LoRA on a leaf that is not a matrix (naming the member and the leaf or pattern).
    """
    found = settings(member)
    if found is None:
        return member.problem
    try:
        return _tuned(member.problem, *found)
    except ConfigError as error:
        raise ConfigError(f"member {member.name!r}: {error}") from None

