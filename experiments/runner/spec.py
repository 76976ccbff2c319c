"""What an experiment gives the runner: problems, members and experiments.

Plain data; nothing is compiled. :mod:`experiments.runner` re-exports every public name.
"""

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.runner.methods import METHODS, Method

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
        num_steps: its own step budget (None: ``config.num_steps``; 0: evaluated once, at the
            start, never stepped: a zero-shot baseline), e.g. an equal query budget
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
