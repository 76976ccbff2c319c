"""What an experiment gives the runner: problems, methods, members, and the config checks.

Everything here is plain data and validation; nothing is compiled. :mod:`experiments.runner`
re-exports every public name.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax

# ---------------------------------------------------------------------------------------------
# Problems.


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """An objective with its data, starting point and metrics.

    Full batch (``batch_fn`` None), every step sees ``data``; with a ``batch_fn`` each step
    draws a minibatch inside the compiled program and the loss sees it first.

    Attributes:
        loss: the training objective (the optimizers' ``value_fn``): ``loss(params, *data)``,
            or ``loss(params, batch, *data)`` with a ``batch_fn``. Compiled programs are cached on
            what they compute: the functions (use module-level ones; a lambda made per call
            compiles again) and the static parts of the data.
        metrics: ``metrics(params, *eval_data) -> {name: scalar}``, recorded at every evaluation
            inside the compiled program; must contain ``"loss"``, the training loss: a
            non-finite value marks the member as diverged.
        init_params: the starting point shared by every member trained on this problem.
        data: passed to ``loss`` (and to ``metrics`` when there is no ``eval_data``). Array
            leaves (numpy or jax arrays, Python numbers) are arguments of the compiled program,
            not constants baked into it; any other leaf (a Flax module, a function) is a static
            part of the program, compared by equality.
        reference_metrics: ``{name: fn(params, *eval_data)}``, independent (slower)
            implementations of some metrics, compared with them at the first and last
            evaluation.
        batch_fn: ``batch_fn(key, step) -> batch``, the minibatch of a step (0-based), with
            ``key = fold_in(data_key, step)``; ``data_key`` comes from the config's ``data_seed``
            (default 0) and is shared by every member and independent of their seeds, so every
            method sees the same batches and a resumed run draws the uninterrupted one's. A
            pytree (such as :class:`Minibatches`) keeps its arrays on the device, as arguments.
        eval_data: what ``metrics`` and ``reference_metrics`` see (None: ``data``), e.g. the
            full train and test sets when ``data`` holds only the model.
        extra_args: ``extra_args(*loss_args) -> {name: value}``, extra keyword arguments of the
            optimizer's ``update`` at each step, given the loss's arguments after ``params``
            (e.g. ``{"output_fn": lambda p: model.apply(p, batch[0])}``).
        name: shown in error messages (default: the names of its members).
        final_metrics: ``final_metrics(params, *eval_data) -> pytree of arrays``, computed once
            per member on its params after the last step (jitted, one compilation per problem)
            and stored as the run's ``"final_metrics"`` in results.json (arrays as nested
            lists; null for a member that went non-finite), e.g. a Hessian spectrum too costly
            to record at every evaluation.
    """

    loss: Callable[..., jax.Array]
    metrics: Callable[..., Mapping[str, jax.Array]]
    init_params: Any
    data: tuple = ()
    reference_metrics: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(
        default_factory=dict)
    batch_fn: Callable[[jax.Array, jax.Array], Any] | None = None
    eval_data: tuple | None = None
    extra_args: Callable[..., Mapping[str, Any]] | None = None
    name: str = ""
    final_metrics: Callable[..., Any] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Minibatches:
    """A ``batch_fn``: ``batch_size`` rows of ``arrays`` (a pytree of equal-length arrays).

    Rows are drawn uniformly without replacement within a step (``replace=False``) or with it.
    A pytree: its arrays stay on the device as program arguments.

    Example:
        >>> import jax.numpy as jnp
        >>> batch_fn = Minibatches((jnp.arange(10.0), jnp.arange(10)), batch_size=4)
        >>> x, y = batch_fn(jax.random.key(0), 3)
        >>> x.shape, bool((x == y).all())
        ((4,), True)
    """

    arrays: Any
    batch_size: int = dataclasses.field(metadata=dict(static=True))
    replace: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        sizes = {x.shape[0] if np.ndim(x) else None for x in jax.tree.leaves(self.arrays)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"Minibatches: arrays must share their first dimension, got sizes "
                             f"{sorted(map(str, sizes))}.")
        if not (isinstance(self.batch_size, int) and 0 < self.batch_size):
            raise ValueError(f"Minibatches: batch_size must be a positive int, got "
                             f"{self.batch_size!r}.")
        if not self.replace and self.batch_size > sizes.pop():
            raise ValueError(f"Minibatches: batch_size {self.batch_size} exceeds the "
                             "number of rows (pass replace=True to draw with replacement).")

    def __call__(self, key, step):
        del step  # the key already depends on it
        rows = jax.tree.leaves(self.arrays)[0].shape[0]
        index = (jax.random.randint(key, (self.batch_size,), 0, rows) if self.replace else
                 jax.random.choice(key, rows, (self.batch_size,), replace=False))
        return jax.tree.map(lambda x: jnp.take(x, index, axis=0), self.arrays)


# ---------------------------------------------------------------------------------------------
# Methods.


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


# ---------------------------------------------------------------------------------------------
# Members and experiments.


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One run: a name, a method of :data:`METHODS`, its hyperparameters and its problem.

    Attributes:
        name: unique within the experiment (results.json's and :func:`load_member`'s key).
        method: a key of the experiment's methods.
        hparams: the method's fields by the config's names (``learning_rate``, ``smoothing``,
            ``seed``, ...).
        problem: what it trains on.
        num_steps: its own step budget (None: ``config.num_steps``), e.g. an equal query budget
            at different q. Members with different budgets run in different programs (one
            compilation per chunk length, shared by equal ones), side by side.
        labels: descriptive entries (``{"dataset": "a7a"}``) recorded with the hyperparameters
            in results.json but not given to the method.
    """

    name: str
    method: str
    hparams: Mapping[str, Any]
    problem: Problem
    num_steps: int | None = None
    labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything :func:`run` needs besides the config.

    Attributes:
        name: experiment name (``results.json``'s ``"experiment"``, the plot's file name).
        members: the runs, in the order of results.json.
        plot: ``plot(results) -> matplotlib.figure.Figure``, saved as ``<name>.png`` and ``.pdf``
            (build it with ``Figure()``, not pyplot: no backend or global state involved), or
            ``-> {suffix: Figure}``, saved as ``<name><suffix>.png`` and ``.pdf``.
        summary: ``summary(results) -> str``, printed at the end (default :func:`summarize`).
        methods: the methods members may name (add an experiment's own to :data:`METHODS`).
        progress_metrics: metrics shown in the progress bar (min..max over members).
    """

    name: str
    members: Sequence[Member]
    plot: Callable[[dict], Any] | None = None
    summary: Callable[[dict], str] | None = None
    methods: Mapping[str, Method] = dataclasses.field(default_factory=lambda: METHODS)
    progress_metrics: tuple[str, ...] = ("loss", "hessian_trace")


def sweep(method: str, fields, problem: Problem, name: str | None = None, *,
          labels: Mapping[str, Any] | None = None,
          num_steps: int | None = None) -> list[Member]:
    """Members for every combination of the tuple-valued ``fields`` (a config sub-dict).

    A field holding a tuple is swept (one member per value, vmapped together when traced); the
    member names show the swept fields that take several values, e.g. ``zo(smoothing=0.05)``. A
    field holding None is left out (the method's default, e.g. ``chunk_size``). ``labels`` and
    ``num_steps`` are those of :class:`Member`.
    """
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    fields = {k: v for k, v in fields.items() if v is not None}
    swept = [k for k, v in fields.items() if isinstance(v, tuple | list)]
    varying = [k for k in swept if len(fields[k]) > 1]
    name = name or method
    members = []
    for values in itertools.product(*(fields[k] for k in swept)):
        hparams = {**fields, **dict(zip(swept, values))}
        label = ",".join(f"{k}={hparams[k]}" for k in varying)
        members.append(Member(f"{name}({label})" if label else name, method, hparams, problem,
                              num_steps, dict(labels or {})))
    return members


# ---------------------------------------------------------------------------------------------
# Config checks.

SCHEDULE_FIELDS = ("num_steps", "eval_every", "evals_per_chunk", "checkpoint_every")
BATCHING = ("vmap", "separate")  # values of config.batch_members
POSITIVE_FIELDS = (*SCHEDULE_FIELDS, "learning_rate", "smoothing", "tilt", "num_directions",
                   "metrics_batch", "chunk_size", "concurrent_programs")
OPTIONAL_FIELDS = ("chunk_size",)  # may also be None (the method's default)
SEED_FIELDS = ("seed", "data_seed")  # non-negative integers


class ConfigError(ValueError):
    """A config value the runner cannot use (the message names the field)."""


class ConfigMismatchError(ConfigError):
    """The workdir holds a run of a different config."""


class OldWorkdirError(ConfigError):
    """The workdir was written by an older version of the runner (start over: ``--overwrite``)."""


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def as_tuple(value) -> tuple:
    """A config value as a tuple of the values it sweeps (one value: a 1-tuple)."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def check_positive(where: str, value) -> None:
    """Raises ConfigError unless ``value`` is a positive finite number or a tuple of them."""
    for v in as_tuple(value):
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and v > 0):
            raise ConfigError(f"{where} must be positive, got {value!r}.")


def validate(config, positive: Sequence[str] = POSITIVE_FIELDS) -> None:
    """Raises ConfigError (a ValueError) naming the field when a step count, λ or η is not positive.

    Every field (at any depth) whose name is in ``positive`` must hold a positive number or a
    tuple of them (``chunk_size`` may also be None), every field named ``seed`` or ``data_seed``
    non-negative integers; ``log_evals`` must be >= 0.
    """
    missing = [field for field in SCHEDULE_FIELDS if field not in config]
    if missing:
        raise ConfigError(f"config lacks {missing}: the runner reads {SCHEDULE_FIELDS}.")
    for path, value in _leaves(config):
        name = path.rsplit(".", 1)[-1]
        if name in positive and not (value is None and name in OPTIONAL_FIELDS):
            check_positive(f"config.{path}", value)
        if name in SEED_FIELDS and not all(isinstance(s, int) and not isinstance(s, bool)
                                           and s >= 0 for s in as_tuple(value)):
            raise ConfigError(f"config.{path} must be non-negative integers, got {value!r}.")
    for name in ("metrics_batch", "evals_per_chunk", "num_steps", "concurrent_programs"):
        if not isinstance(config.get(name, 1), int) or isinstance(config.get(name, 1), bool):
            raise ConfigError(f"config.{name} must be a positive int, got {config[name]!r}.")
    if config.get("log_evals", 0) < 0:
        raise ConfigError(f"config.log_evals must be >= 0, got {config.log_evals!r}.")
    if config.get("batch_members", "vmap") not in BATCHING:
        raise ConfigError(f"config.batch_members must be one of {BATCHING}, got "
                          f"{config.batch_members!r}.")


def check_choices(config, choices: Mapping[str, Sequence]) -> None:
    """Raises ConfigError naming the field unless each field of ``choices`` holds known values.

    A field holding a tuple (a sweep) must be non-empty, without repeats, of known values; a
    field holding one value must be known. ``choices[field]`` of None allows any value (the
    tuple is only checked to be non-empty, without repeats).
    """
    for field, known in choices.items():
        value = config[field]
        values = as_tuple(value)
        if known is not None and any(v not in known for v in values):
            kind = "a non-empty tuple of" if isinstance(value, tuple | list) else "one of"
            raise ConfigError(f"config.{field} must be {kind} {tuple(known)}, got {value!r}.")
        if not values:
            raise ConfigError(f"config.{field} must name at least one value, got {value!r}.")
        if len(set(values)) != len(values):
            raise ConfigError(f"config.{field} has repeated values: {value!r}.")


# ---------------------------------------------------------------------------------------------
# The schedule.


def eval_steps(config, num_steps: int | None = None) -> np.ndarray:
    """Steps with metrics: 0, every ``eval_every``, the last, and ``log_evals`` log-spaced.

    ``num_steps`` (default ``config.num_steps``) is the member's budget.
    """
    num_steps = config.num_steps if num_steps is None else num_steps
    steps = set(range(0, num_steps, config.eval_every)) | {num_steps}
    if config.get("log_evals", 0):
        steps |= set(np.geomspace(1, num_steps, config.log_evals).round().astype(int))
    return np.array(sorted(int(s) for s in steps))


def chunk_size(num_evals: int, evals_per_chunk: int) -> int:
    """Evaluations per compiled chunk: the fewest chunks of at most ``evals_per_chunk``, of equal
    size (only the last is padded, by fewer evaluations than there are chunks)."""
    return -(-num_evals // -(-num_evals // evals_per_chunk))
