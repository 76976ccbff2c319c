"""The training loop every experiment shares.

An experiment module builds problems (:class:`Problem`: objective, data, starting point, metrics)
and runs (:class:`Member`), and calls :func:`run` with them, its config and a workdir:

    problem = runner.Problem(loss=loss, metrics=metrics, init_params=params)
    members = runner.sweep("gd", config.gd, problem) + runner.sweep("zo", config.zo, problem)
    runner.run(runner.Experiment("name", members, plot=plot), config, workdir)

The runner

- groups the members that share a problem, a method and the method's static hyperparameters
  (``num_directions``, ``direction``, ...), stacks their traced ones (``learning_rate``,
  ``smoothing``, ``seed``) and runs them in one compiled program, vmapped (or, with
  ``batch_members="separate"``, each member alone in its own run of one shared compilation:
  faster for tiny problems); programs run side by side on the CPU cores;
- runs ``num_steps`` steps as jitted ``lax.scan`` chunks of at most ``evals_per_chunk``
  evaluations (equal chunks: :func:`chunk_size`),
  the metrics computed inside the program; between chunks it appends them, advances a progress
  bar and writes an orbax checkpoint every ``checkpoint_every`` chunks (and on SIGINT/SIGTERM,
  before raising :class:`Interrupted`);
- resumes from the last checkpoint in ``workdir``; on a finished workdir it only prints the
  summary and redraws the plot; a different config for an existing workdir is an error
  (:class:`ConfigMismatchError`) unless ``overwrite``;
- marks a member whose loss turns non-finite, or whose estimator skipped a non-finite step
  (``num_nonfinite`` grew): its state is frozen at its last good evaluation, its metrics are
  null from then on, the other members go on, and :class:`NonFiniteError` names it at the end;
- writes ``workdir/results.json`` (schema in :func:`run`) and ``workdir/<name>.png`` / ``.pdf``.

:func:`load_params` restores every member's params from a checkpoint, for analysis.

Config fields read here: ``num_steps``, ``eval_every``, ``log_evals``, ``evals_per_chunk``,
``checkpoint_every`` and optionally ``rng_impl`` and ``batch_members``.
"""

import concurrent.futures
import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import zojax

# ---------------------------------------------------------------------------------------------
# What an experiment provides.


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """An objective with its data, starting point and metrics.

    Attributes:
        loss: ``loss(params, *data) -> scalar``, the training objective (the optimizers'
            ``value_fn``). Use a module-level function: compiled programs are cached on it.
        metrics: ``metrics(params, *data) -> {name: scalar}``, recorded at every evaluation
            (computed after each chunk, vmapped over its evaluations); must contain ``"loss"``,
            the training loss: a non-finite value marks the member as diverged.
        init_params: the starting point shared by every member trained on this problem.
        data: arrays passed to ``loss`` and ``metrics`` (arguments of the compiled program, not
            constants baked into it).
        reference_metrics: ``{name: fn(params, *data)}``, independent (slower) implementations of
            some metrics, compared with them at the first and last evaluation.
    """

    loss: Callable[..., jax.Array]
    metrics: Callable[..., Mapping[str, jax.Array]]
    init_params: Any
    data: tuple = ()
    reference_metrics: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(
        default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One run: a name, a method of :data:`METHODS`, its hyperparameters and its problem.

    ``hparams`` uses the config's field names (``learning_rate``, ``smoothing``, ``seed``, ...)
    and is written to results.json as is.
    """

    name: str
    method: str
    hparams: Mapping[str, Any]
    problem: Problem


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method steps: an optax optimizer built from a member's hyperparameters.

    Attributes:
        optimizer: ``optimizer(key, hparams) -> optax.GradientTransformation``. The
            hyperparameters named in ``traced`` arrive as traced scalars, so members that differ
            only in them share one compiled program; the others as Python values. ``key`` is a
            typed PRNG key made from ``hparams["seed"]`` (0 when absent).
        queries_per_step: ``queries_per_step(hparams) -> int``, objective evaluations per step
            (a gradient or a jvp counts as one).
        uses_gradient: the optimizer receives ``jax.grad(loss)`` as updates (first-order);
            otherwise it receives ``None`` and evaluates ``value_fn`` itself.
        traced: hyperparameters swept inside one program (numeric, used in traced arithmetic).
    """

    optimizer: Callable[[jax.Array, Mapping[str, Any]], optax.GradientTransformation]
    queries_per_step: Callable[[Mapping[str, Any]], int]
    uses_gradient: bool = False
    traced: tuple[str, ...] = ("learning_rate", "smoothing", "seed")


def _gd(key, hparams):
    del key
    return optax.sgd(hparams["learning_rate"])


def _zo(key, hparams):
    return zojax.zo_sgd(hparams["learning_rate"], hparams["smoothing"],
                        hparams.get("num_directions", 1),
                        direction=hparams.get("direction", "gaussian"),
                        scheme=hparams.get("scheme", "central"), seed=key)


def _zo_queries(hparams):
    q = hparams.get("num_directions", 1)
    return 2 * q if hparams.get("scheme", "central") == "central" else q + 1


def _forward_grad(key, hparams):
    estimate = zojax.forward_gradient(hparams.get("num_directions", 1),
                                      direction=hparams.get("direction", "gaussian"), seed=key)
    return optax.chain(estimate, optax.sgd(hparams["learning_rate"]))


METHODS: dict[str, Method] = {
    # Gradient descent: one gradient per step.
    "gd": Method(_gd, lambda hparams: 1, uses_gradient=True),
    # Two-point ZO-SGD: central 2q evaluations per step, forward q + 1.
    "zo": Method(_zo, _zo_queries),
    # The λ → 0 limit of "zo", (uᵀ∇f)u by jvp: q jvps per step.
    "forward_grad": Method(_forward_grad, lambda hparams: hparams.get("num_directions", 1)),
}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything :func:`run` needs besides the config.

    Attributes:
        name: experiment name (``results.json``'s ``"experiment"``, the plot's file name).
        members: the runs, in the order of results.json.
        plot: ``plot(results) -> matplotlib.figure.Figure``, saved as ``<name>.png`` and ``.pdf``
            (build it with ``Figure()``, not pyplot: no backend or global state involved).
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


def sweep(method: str, fields, problem: Problem, name: str | None = None) -> list[Member]:
    """Members for every combination of the tuple-valued ``fields`` (a config sub-dict).

    A field holding a tuple is swept (one member per value, vmapped together when traced); the
    member names show the swept fields that take several values, e.g. ``zo(smoothing=0.05)``.
    """
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    swept = [k for k, v in fields.items() if isinstance(v, tuple | list)]
    varying = [k for k in swept if len(fields[k]) > 1]
    name = name or method
    members = []
    for values in itertools.product(*(fields[k] for k in swept)):
        hparams = {**fields, **dict(zip(swept, values))}
        label = ",".join(f"{k}={hparams[k]}" for k in varying)
        members.append(Member(f"{name}({label})" if label else name, method, hparams, problem))
    return members


# ---------------------------------------------------------------------------------------------
# Config checks.

SCHEDULE_FIELDS = ("num_steps", "eval_every", "evals_per_chunk", "checkpoint_every")
BATCHING = ("vmap", "separate")  # values of config.batch_members
POSITIVE_FIELDS = (*SCHEDULE_FIELDS, "learning_rate", "smoothing", "num_directions")


class ConfigError(ValueError):
    """A config value the runner cannot use (the message names the field)."""


class ConfigMismatchError(ConfigError):
    """The workdir holds a run of a different config."""


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


def _check_positive(where: str, value) -> None:
    for v in as_tuple(value):
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and v > 0):
            raise ConfigError(f"{where} must be positive, got {value!r}.")


def validate(config, positive: Sequence[str] = POSITIVE_FIELDS) -> None:
    """Raises ConfigError (a ValueError) naming the field when a step count, λ or η is not positive.

    Every field (at any depth) whose name is in ``positive`` must hold a positive number or a
    tuple of them, every field named ``seed`` non-negative integers; ``log_evals`` must be >= 0.
    """
    missing = [field for field in SCHEDULE_FIELDS if field not in config]
    if missing:
        raise ConfigError(f"config lacks {missing}: the runner reads {SCHEDULE_FIELDS}.")
    for path, value in _leaves(config):
        name = path.rsplit(".", 1)[-1]
        if name in positive:
            _check_positive(f"config.{path}", value)
        if name == "seed" and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                      for s in as_tuple(value)):
            raise ConfigError(f"config.{path} must be non-negative integers, got {value!r}.")
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
# The compiled program.


class TrainState(NamedTuple):
    """State of one member (stacked along a leading axis for a vmapped group)."""

    params: Any  # pytree of arrays.
    opt_state: Any  # optax state; typed PRNG keys inside.
    failed: jax.Array  # bool scalar: went non-finite; params frozen at the last good evaluation.


@dataclasses.dataclass(frozen=True)
class _Program:
    """Static description of a group's program (hashable: equal programs share compilations)."""

    method: Method
    loss: Callable
    metrics: Callable
    static: tuple[tuple[str, Any], ...]  # the static hyperparameters, sorted by name.
    rng_impl: str | None  # PRNG implementation of the keys (None: JAX's default).
    # Every member has the same seed, so the same PRNG keys at every step: the vmapped program
    # draws each direction once for all members (common random numbers) instead of once each.
    shared_keys: bool = False


def _optimizer(program: _Program, traced) -> optax.GradientTransformationExtraArgs:
    hparams = {**dict(program.static), **traced}
    key = jax.random.key(hparams.get("seed", 0), impl=program.rng_impl)
    return optax.with_extra_args_support(program.method.optimizer(key, hparams))


def _num_nonfinite(opt_state) -> jax.Array:
    """Sum of every ``num_nonfinite`` counter in an optax state (0 when there is none)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "num_nonfinite")
    return sum((count for _, count in found), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _init(program: _Program, params, traced) -> TrainState:
    def init(traced):
        opt_state = _optimizer(program, traced).init(params)
        return TrainState(params, opt_state, jnp.zeros((), bool))

    return jax.vmap(init)(traced)


def _member_chunk(program: _Program, state: TrainState, gaps, data, traced):
    """Runs ``gaps[i]`` steps then evaluates the metrics, for each ``i``; one member.

    The scan records the state at every evaluation; the metrics are computed after it, vmapped
    over the chunk's evaluations (the test-set products of a linear model then make one pass over
    the test matrix per chunk instead of one per evaluation; memory: ``len(gaps)`` copies of the
    state). An evaluation fails when its loss is not finite or the estimator skipped a
    non-finite step (``num_nonfinite`` grew); from the first failure on, the metrics are NaN and
    the member leaves the chunk with its last good state (its PRNG keys move on: with shared keys
    they are the same for every member).
    """
    optimizer = _optimizer(program, traced)

    value_fn = zojax.estimators.bind(program.loss, *data)  # keeps a line form (linear models)

    def step(_, carry):
        params, opt_state = carry
        grads = jax.grad(value_fn)(params) if program.method.uses_gradient else None
        updates, opt_state = optimizer.update(grads, opt_state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), opt_state

    def segment(carry, gap):
        carry = jax.lax.fori_loop(0, gap, step, carry)
        return carry, carry

    (_, last_opt_state), (params, opt_states) = jax.lax.scan(
        segment, (state.params, state.opt_state), gaps)
    metrics = jax.vmap(lambda p: dict(program.metrics(p, *data)))(params)
    skipped = jax.vmap(_num_nonfinite, axis_size=gaps.shape[0])(opt_states) > 0
    bad = ~jnp.isfinite(metrics["loss"]) | skipped
    failed = state.failed | (jnp.cumsum(bad) > 0)
    good = jnp.sum(~failed) - 1  # the last good evaluation (failures are final), or -1
    pick = functools.partial(
        jax.tree.map, lambda old, new, final: final if _is_key(final)
        else jnp.where(good < 0, old, new[jnp.maximum(good, 0)]))
    last_params = jax.tree.map(lambda x: x[-1], params)
    state = TrainState(pick(state.params, params, last_params),
                       pick(state.opt_state, opt_states, last_opt_state), failed[-1])
    return state, {k: jnp.where(failed, jnp.nan, v) for k, v in metrics.items()}


@functools.partial(jax.jit, static_argnums=0)
def _train_chunk(program: _Program, state: TrainState, gaps, data, traced):
    """One chunk of every member (axis 0 of ``state`` and ``traced``); metrics (M, K).

    Members are vmapped (the batched matrix products of large problems). A single member runs
    unbatched: a batch of one gives XLA no speed-up, and on CPU can pick slower layouts for its
    matrix products.
    """
    chunk = functools.partial(_member_chunk, program)
    size = jax.tree.leaves(state)[0].shape[0]
    if size == 1:  # one member: its standalone program, unbatched
        squeeze = functools.partial(jax.tree.map, lambda x: x[0])
        state, metrics = chunk(squeeze(state), gaps, data, squeeze(traced))
        return jax.tree.map(lambda x: x[None], (state, metrics))
    # Shared keys enter (and leave) the vmap unbatched: one draw per step for all members.
    axes = jax.tree.map(lambda x: None if program.shared_keys and _is_key(x) else 0, state)
    state = jax.tree.map(lambda x, axis: x if axis == 0 else x[0], state, axes)
    state, metrics = jax.vmap(chunk, in_axes=(axes, None, None, 0), out_axes=(axes, 0))(
        state, gaps, data, traced)
    state = jax.tree.map(lambda x, axis: x if axis == 0 else jnp.broadcast_to(x, (size, *x.shape)),
                         state, axes)
    return state, metrics


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


# ---------------------------------------------------------------------------------------------
# Host side.


@dataclasses.dataclass
class _Group:
    """Members run by one compiled program, with their state and history on the host."""

    program: _Program
    problem: Problem
    members: list[Member]
    traced: dict[str, jax.Array]  # the traced hyperparameters, stacked.
    data: tuple = ()  # the problem's data, as arrays.
    state: TrainState | None = None
    run_chunk: Callable | None = None  # the compiled program.
    wall_seconds: float = 0.0  # execution time of the program, cumulative across resumes.
    history: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)  # (M, n)


def _make_groups(experiment: Experiment, rng_impl: str | None = None,
                 batching: str = "vmap") -> list[_Group]:
    """Members grouped by problem, method and static hyperparameters (``batching="vmap"``), or
    one group per member (``"separate"``: equal programs then share one compilation)."""
    names = [member.name for member in experiment.members]
    if not names or len(set(names)) < len(names):
        raise ConfigError(f"an experiment needs members with distinct names, got {names}.")
    groups: dict[tuple, _Group] = {}
    for member in experiment.members:
        if member.method not in experiment.methods:
            raise ConfigError(f"member {member.name!r}: unknown method {member.method!r}; "
                             f"known methods: {sorted(experiment.methods)}.")
        for name in POSITIVE_FIELDS:
            if name in member.hparams:
                _check_positive(f"member {member.name!r}: {name}", member.hparams[name])
        method = experiment.methods[member.method]
        traced = tuple(k for k in method.traced if k in member.hparams)
        static = tuple(sorted((k, v) for k, v in member.hparams.items() if k not in traced))
        program = _Program(method, member.problem.loss, member.problem.metrics, static, rng_impl)
        key = (id(member.problem), program, traced,
               member.name if batching == "separate" else None)
        if key not in groups:
            data = jax.tree.map(jnp.asarray, tuple(member.problem.data))
            groups[key] = _Group(program, member.problem, [], {}, data)
        groups[key].members.append(member)
    for (_, _, traced, _), group in groups.items():
        group.traced = {k: jnp.asarray([m.hparams[k] for m in group.members]) for k in traced}
        seeds = {m.hparams.get("seed", 0) for m in group.members}
        group.program = dataclasses.replace(group.program, shared_keys=len(seeds) == 1)
    return list(groups.values())


def eval_steps(config) -> np.ndarray:
    """Steps with metrics: 0, every ``eval_every``, ``num_steps``, and ``log_evals`` log-spaced."""
    steps = set(range(0, config.num_steps, config.eval_every)) | {config.num_steps}
    if config.get("log_evals", 0):
        steps |= set(np.geomspace(1, config.num_steps, config.log_evals).round().astype(int))
    return np.array(sorted(int(s) for s in steps))


def chunk_size(num_evals: int, evals_per_chunk: int) -> int:
    """Evaluations per compiled chunk: the fewest chunks of at most ``evals_per_chunk``, of equal
    size (only the last is padded, by fewer evaluations than there are chunks)."""
    return -(-num_evals // -(-num_evals // evals_per_chunk))


def _compile(groups: list[_Group], size: int, pool: concurrent.futures.Executor) -> list:
    """Starts compiling every group's chunk program in ``pool``; returns the futures (one per
    group; groups with equal programs and shapes share one)."""
    gaps = np.zeros(size, np.int32)

    def shapes(tree):  # compile for shapes only: restored (committed) arrays hit the cache too
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    futures = {}
    for g in groups:
        args = shapes((g.state, gaps, g.data, g.traced))
        key = (g.program, jax.tree.structure(args), tuple(jax.tree.leaves(args)))
        if key not in futures:
            futures[key] = pool.submit(_train_chunk.lower(g.program, *args).compile)
        g.run_chunk = futures[key]
    return [g.run_chunk for g in groups]


def _run_chunk(group: _Group, gaps: np.ndarray, size: int) -> None:
    padded = np.zeros(size, np.int32)  # trailing zero gaps re-evaluate the last point.
    padded[:len(gaps)] = gaps
    start = time.perf_counter()
    group.state, metrics = group.run_chunk(group.state, padded, group.data, group.traced)
    metrics = jax.device_get(metrics)
    group.wall_seconds += time.perf_counter() - start
    group.history.append({k: np.asarray(v[:, :len(gaps)], np.float64) for k, v in metrics.items()})


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _metric_and_reference(metrics, name, reference, params, data):
    return metrics(params, *data)[name], reference(params, *data)


def _start_cross_check(groups: list[_Group], when: str, pool: concurrent.futures.Executor,
                       rtol: float = 1e-4) -> concurrent.futures.Future:
    """Compares metrics with their reference implementations on every member's current params.

    Runs in ``pool`` (the future raises RuntimeError on a mismatch) alongside compilation or
    plotting: the references (exact traces) are slow. Members are checked one at a time, so each
    problem and metric compiles one program, shared by the first and the last evaluation; at the
    first evaluation every member of a problem starts from the same point, so one is checked.
    Diverged members are skipped.
    """
    by_problem: dict[int, list[_Group]] = {}
    for group in groups:
        by_problem.setdefault(id(group.problem), []).append(group)
    jobs = []  # what to check, read now: the groups' states move on while the checks run
    for problem_groups in by_problem.values():
        members = [(params, bool(failed)) for g in problem_groups for params, failed in zip(
            _unstack(g.state.params, len(g.members)), np.asarray(g.state.failed))]
        jobs.append((problem_groups[0].problem, problem_groups[0].data,
                     [params for params, failed in members[:1 if when == "first" else None]
                      if not failed]))

    def check():
        for problem, data, members in jobs:
            for name, reference in problem.reference_metrics.items():
                worst = 0.0
                for params in members:
                    ours, theirs = map(float, _metric_and_reference(
                        problem.metrics, name, reference, params, data))
                    worst = max(worst, abs(ours - theirs) / max(abs(theirs), 1e-30))
                if worst > rtol:
                    raise RuntimeError(f"{name} at the {when} evaluation differs from its "
                                       f"reference by {worst:.2e} (relative).")
                logging.info("cross-check at the %s evaluation: %s matches its reference (max "
                             "relative difference %.1e).", when, name, worst)

    return pool.submit(check)


def _unstack(tree, size: int) -> list:
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size)]


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after checkpointing the steps done; run again to resume."""

    def __init__(self, signum: int, step: int, workdir: pathlib.Path):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in "
                         f"{workdir}; run the same command again to resume.")


class NonFiniteError(RuntimeError):
    """Some members went non-finite (the others finished); results.json has their nulls."""


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between chunks; a second signal stops at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _jsonable(x):
    """Config and results as strict JSON: tuples as lists, non-finite floats as None."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple | list | np.ndarray):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _prepare_workdir(workdir: pathlib.Path, name: str, config: dict, overwrite: bool):
    """Checks ``workdir`` against the config; returns the finished results, if any."""
    saved_path = workdir / "config.json"
    if overwrite:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        for file in ("config.json", "results.json", f"{name}.png", f"{name}.pdf"):
            (workdir / file).unlink(missing_ok=True)
    elif saved_path.exists():
        saved = _flatten(json.loads(saved_path.read_text()))
        current = _flatten({"experiment": name, "config": config})
        differing = [
            f"  {key.removeprefix('config.')}: {saved.get(key, '<absent>')!r} in the workdir, "
            f"{current.get(key, '<absent>')!r} now"
            for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]
        if differing:
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config:\n" + "\n".join(differing)
                + "\nPass --overwrite to replace it, or choose another --workdir.")
        if (workdir / "results.json").exists():
            return json.loads((workdir / "results.json").read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(saved_path, {"experiment": name, "config": config})
    return None


def _postfix(groups: list[_Group], names: Sequence[str]) -> str:
    parts = []
    for name in names:
        latest = [g.history[-1][name][:, -1] for g in groups if name in g.history[-1]]
        values = np.concatenate(latest) if latest else np.array([np.nan])
        if np.isfinite(values).any():
            lo, hi = np.nanmin(values), np.nanmax(values)
            parts.append(f"{name} {lo:.3g}" + (f"..{hi:.3g}" if hi != lo else ""))
    return ", ".join(parts)


def _results(experiment: Experiment, config: dict, groups: list[_Group],
             steps: np.ndarray) -> dict:
    runs = {}
    for group in groups:
        history = {k: np.concatenate([h[k] for h in group.history], axis=1)
                   for k in group.history[0]}
        for i, member in enumerate(group.members):
            queries = group.program.method.queries_per_step(member.hparams)
            runs[member.name] = {
                "name": member.name,
                "method": member.method,
                "hparams": dict(member.hparams),
                "steps": steps.tolist(),
                "metrics": {k: v[i].tolist() for k, v in history.items()},
                "num_queries": (steps * queries).tolist(),
                "wall_seconds": group.wall_seconds,
            }
    return _jsonable({"experiment": experiment.name, "config": config,
                      "runs": [runs[m.name] for m in experiment.members]})


def non_finite_members(results: dict) -> dict[str, int]:
    """``{name: first step with a null loss}`` for the members that went non-finite."""
    return {run["name"]: next(s for s, v in zip(run["steps"], run["metrics"]["loss"]) if v is None)
            for run in results["runs"] if None in run["metrics"]["loss"]}


def summarize(results: dict, metrics: Sequence[str] | None = None) -> str:
    """A table of each run's first and last value of every metric."""
    runs = results["runs"]
    metrics = metrics or list(runs[0]["metrics"])
    width = max(len(r["name"]) for r in runs) + 2
    lines = [f"{results['experiment']}: start -> end over {runs[0]['steps'][-1]} steps"]
    for run in runs:
        cells = []
        for name in metrics:
            values = run["metrics"].get(name)
            if values:
                start, end = values[0], values[-1]
                cells.append(f"{name} {_fmt(start)} -> {_fmt(end)}")
        lines.append(f"  {run['name']:<{width}}" + "   ".join(cells))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "null" if value is None else f"{value:.4g}"


def _draw(experiment: Experiment, results: dict, workdir: pathlib.Path) -> None:
    if experiment.plot is not None:
        figure = experiment.plot(results)
        for suffix in (".png", ".pdf"):
            figure.savefig(workdir / f"{experiment.name}{suffix}", dpi=150)


def _report(experiment: Experiment, results: dict, workdir: pathlib.Path) -> dict:
    """Prints the summary; raises NonFiniteError for diverged members."""
    print((experiment.summary or summarize)(results))
    failed = non_finite_members(results)
    if failed:
        raise NonFiniteError(
            "non-finite values: " + "; ".join(f"{name!r} from step {step}"
                                             for name, step in failed.items())
            + f" (metrics null from then on in {workdir / 'results.json'}; the other members "
            "finished).")
    return results


def run(experiment: Experiment, config, workdir, *, overwrite: bool = False) -> dict:
    """Trains every member of ``experiment``; returns (and writes) the results.

    ``workdir/results.json``::

        {"experiment": str, "config": {...},
         "runs": [{"name": str, "method": str, "hparams": {...}, "steps": [int],
                   "metrics": {"loss": [...], ...}, "num_queries": [int],
                   "wall_seconds": float}]}

    ``steps`` starts at 0 and is shared by every metric; ``num_queries`` counts the optimizer's
    objective evaluations (metrics excluded); ``wall_seconds`` is the execution time of the
    compiled program that ran the member (shared by vmapped members, compilation excluded),
    cumulative across resumes; non-finite numbers are null.

    Raises:
        ConfigError: a non-positive step count, λ or η (a ValueError naming the field).
        ConfigMismatchError: ``workdir`` holds a different config and not ``overwrite``.
        Interrupted: SIGINT/SIGTERM (after checkpointing).
        NonFiniteError: some members went non-finite (after writing the results).
        RuntimeError: a metric differs from its reference (results.json is not written).
    """
    validate(config)
    workdir = pathlib.Path(workdir)
    config_dict = _jsonable(config.to_dict())
    with _StopSignals() as stop:  # from the start, so a signal during compilation is kept
        results = _prepare_workdir(workdir, experiment.name, config_dict, overwrite)
        if results is not None:
            logging.info("%s is finished: printing its summary and redrawing its plot.", workdir)
            _draw(experiment, results, workdir)
        else:
            if experiment.plot is not None:  # ~0.5 s of imports, overlapping compilation
                _import_in_background("matplotlib.figure", "matplotlib.backends.backend_agg",
                                      "matplotlib.backends.backend_pdf")
            with concurrent.futures.ThreadPoolExecutor(1) as checker:
                results, last_check = _train(experiment, config, config_dict, workdir, stop,
                                             checker)
                _draw(experiment, results, workdir)  # while the last cross-check runs
                last_check.result()
            _write_json(workdir / "results.json", results)
    return _report(experiment, results, workdir)


def _train(experiment: Experiment, config, config_dict: dict, workdir: pathlib.Path,
           stop: _StopSignals, checker: concurrent.futures.Executor
           ) -> tuple[dict, concurrent.futures.Future]:
    """The chunk loop, resumed from the last checkpoint; returns the results and the cross-check
    of the last evaluation (still running in ``checker``)."""
    steps = eval_steps(config)
    gaps = np.diff(steps, prepend=0).astype(np.int32)  # steps before each evaluation
    size = chunk_size(len(steps), config.evals_per_chunk)
    groups = _make_groups(experiment, config.get("rng_impl"), config.get("batch_members", "vmap"))
    for group in groups:
        group.state = _init(group.program, group.problem.init_params, group.traced)

    def reached(done: int) -> int:  # the last step evaluated after ``done`` evaluations.
        return int(steps[done - 1]) if done else 0

    with concurrent.futures.ThreadPoolExecutor() as pool:  # compiles while the rest is set up
        started = time.perf_counter()
        compiling = _compile(groups, size, pool)
        first_check = _start_cross_check(groups, "first", checker)
        checkpoints = _checkpointer(workdir)
        done = 0  # evaluations
        if (latest := checkpoints.latest_step()) is not None:
            states, progress = checkpoints.restore(latest, [g.state for g in groups])
            done = int(np.searchsorted(steps, latest)) + 1
            for group, state, wall, history in zip(groups, states, progress["wall_seconds"],
                                                   progress["history"]):
                group.state, group.wall_seconds = state, wall
                group.history = [{k: np.array(v, np.float64).reshape(len(group.members), -1)
                                  for k, v in history.items()}]
            logging.info("Resuming %s from step %d.", workdir, latest)
        for group, compiled in zip(groups, compiling):
            group.run_chunk = compiled.result()
        first_check.result()  # before training: the checks would slow it down more than they take
    logging.info("Compiled %d program(s) for %d members in %.1f s.", len(groups),
                 len(experiment.members), time.perf_counter() - started)

    def save(done: int) -> None:
        history = [{k: np.concatenate([h[k] for h in g.history], axis=1) for k in g.history[0]}
                   for g in groups]
        progress = {"evaluations": done, "wall_seconds": [g.wall_seconds for g in groups],
                    "history": history}
        checkpoints.save(reached(done), [g.state for g in groups], _jsonable(progress))

    import tqdm  # lazy

    # Programs of different groups run side by side: XLA releases the GIL, and one program's
    # matrix-vector products leave CPU cores idle.
    workers = min(len(groups), os.cpu_count() or 1)
    try:
        with (tqdm.tqdm(total=config.num_steps, initial=reached(done), unit="step",
                        desc=experiment.name) as bar,
              concurrent.futures.ThreadPoolExecutor(workers) as pool):
            chunks = 0
            while done < len(steps):
                chunk = gaps[done:done + size]
                list(pool.map(functools.partial(_run_chunk, gaps=chunk, size=size), groups))
                done, chunks = done + len(chunk), chunks + 1
                bar.update(reached(done) - bar.n)
                bar.set_postfix_str(_postfix(groups, experiment.progress_metrics), refresh=False)
                if stop.signum or chunks % config.checkpoint_every == 0 or done == len(steps):
                    save(done)
                if stop.signum:
                    raise Interrupted(stop.signum, reached(done), workdir)
    finally:
        checkpoints.close()  # waits for the last save
    return (_results(experiment, config_dict, groups, steps),
            _start_cross_check(groups, "last", checker))


def load_params(experiment: Experiment, config, workdir, step: int | None = None) -> dict:
    """``{member name: params}`` restored from a checkpoint of ``workdir`` (default: the last).

    The groups are rebuilt as :func:`run` builds them (same grouping, PRNG implementation and
    starting point as templates), so ``experiment`` and ``config`` must be those of the run, e.g.
    ``get_experiment(ml_collections.ConfigDict(results["config"]))``. A finished run's last
    checkpoint holds the final params; a member that went non-finite holds its last good ones.

    Raises:
        FileNotFoundError: ``workdir`` has no checkpoint (or not ``step``).
    """
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}.")
    groups = _make_groups(experiment, config.get("rng_impl"), config.get("batch_members", "vmap"))
    templates = [_init(g.program, g.problem.init_params, g.traced) for g in groups]
    checkpoints = _checkpointer(pathlib.Path(workdir))
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None or not (directory / str(step)).is_dir():
            raise FileNotFoundError(f"no checkpoint of step {step} in {directory}.")
        states, _ = checkpoints.restore(step, templates)
    finally:
        checkpoints.close()
    params = {member.name: params for group, state in zip(groups, states)
              for member, params in zip(group.members, _unstack(state.params, len(group.members)))}
    return {member.name: params[member.name] for member in experiment.members}


def _import_in_background(*modules: str) -> None:
    def load():
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=load, daemon=True).start()


def _checkpointer(workdir: pathlib.Path):
    from experiments import checkpointing  # lazy: imports orbax

    return checkpointing.Checkpointer(workdir / "checkpoints")
