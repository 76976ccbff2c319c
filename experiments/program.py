"""The compiled program of a group of members: init and one chunk of training and metrics.

A chunk runs ``len(gaps)`` evaluations as a ``lax.scan``: ``gaps[i]`` steps (each drawing its
minibatch, when the problem has a ``batch_fn``, and calling the optimizer), then the metrics.
The metrics are computed inside the scan: every ``metrics_batch`` evaluations the scan
vmaps them over the params stored since the last ones, so a chunk's memory is that of
``metrics_batch`` states, whatever its length (default 1; a larger value lets cheap problems
batch their metrics' matrix products).
"""

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import zojax
from experiments.spec import (
    POSITIVE_FIELDS,
    ConfigError,
    Experiment,
    Member,
    Method,
    Problem,
    check_positive,
    chunk_size,
    eval_steps,
)

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float, complex)


@dataclasses.dataclass(frozen=True)
class Static:
    """The non-array part of a pytree (structure and other leaves), hashable.

    :func:`split` separates a pytree into its arrays (program arguments) and this (part of the
    program's identity); :meth:`merge` puts them back together inside the program.
    """

    treedef: Any
    others: tuple[tuple[int, Any], ...]  # (position, leaf) of the non-array leaves.

    def merge(self, arrays: list):
        leaves, arrays, others = [], iter(arrays), dict(self.others)
        for i in range(self.treedef.num_leaves):
            leaves.append(others[i] if i in others else next(arrays))
        return self.treedef.unflatten(leaves)


def split(tree) -> tuple[list, Static]:
    """(array leaves as jax arrays, the rest as a hashable :class:`Static`)."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [jnp.asarray(x) for x in leaves if isinstance(x, ARRAY_TYPES)]
    others = tuple((i, x) for i, x in enumerate(leaves) if not isinstance(x, ARRAY_TYPES))
    return arrays, Static(treedef, others)


class TrainState(NamedTuple):
    """State of one member (stacked along a leading axis for a vmapped group)."""

    params: Any  # pytree of arrays.
    opt_state: Any  # optax state; typed PRNG keys inside.
    failed: jax.Array  # bool scalar: went non-finite; params frozen at the last good evaluation.


@dataclasses.dataclass(frozen=True)
class Program:
    """Static description of a group's program (hashable: equal programs share compilations)."""

    method: Method
    loss: Callable
    metrics: Callable
    static: tuple[tuple[str, Any], ...]  # the static hyperparameters, sorted by name.
    rng_impl: str | None  # PRNG implementation of the keys (None: JAX's default).
    data: Static  # the static parts of the problem's data, eval data and batch_fn.
    eval_data: Static | None = None  # None: the metrics see ``data``.
    batch_fn: Static | None = None  # None: full batch.
    extra_args: Callable | None = None
    metrics_batch: int = 1
    # Every member has the same seed, so the same PRNG keys at every step: the vmapped program
    # draws each direction once for all members (common random numbers) instead of once each.
    shared_keys: bool = False
    # config.mesh_shape: the sharding the estimators split their directions with (given to
    # the method as hparams["directions_sharding"]) and the one of the members axis.
    directions_sharding: NamedSharding | None = None
    members_sharding: NamedSharding | None = None


class Arrays(NamedTuple):
    """The array arguments of a program: the problem's data, eval data and batch_fn arrays."""

    data: list
    eval_data: list | None
    batch_fn: list | None


def _optimizer(program: Program, traced) -> optax.GradientTransformationExtraArgs:
    hparams = {**dict(program.static), **traced}
    if program.directions_sharding is not None:
        hparams["directions_sharding"] = program.directions_sharding
    key = jax.random.key(hparams.get("seed", 0), impl=program.rng_impl)
    return optax.with_extra_args_support(program.method.optimizer(key, hparams))


def _sum_of(name: str, opt_state) -> jax.Array | None:
    """Sum of every ``name`` counter in an optax state (None when there is none)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    return sum((count for _, count in found), jnp.zeros((), jnp.int32)) if found else None


def counts_queries(opt_state) -> bool:
    """Whether an optimizer state counts its objective evaluations (``num_queries``)."""
    return bool(optax.tree_utils.tree_get_all_with_path(opt_state, "num_queries"))


def is_counter(path, x) -> bool:
    """Whether a state leaf is a step counter: an integer scalar named ``count`` (optax's
    convention, zojax's too), the same for every member of a program."""
    last = path[-1] if path else None
    name = getattr(last, "name", getattr(last, "key", None))
    return name == "count" and jnp.ndim(x) <= 1 and jnp.issubdtype(jnp.result_type(x),
                                                                    jnp.integer)


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@functools.partial(jax.jit, static_argnums=0)
def init(program: Program, params, traced) -> TrainState:
    def init(traced):
        opt_state = _optimizer(program, traced).init(params)
        return TrainState(params, opt_state, jnp.zeros((), bool))

    return jax.vmap(init)(traced)


def loss_args(program: Program, arrays: Arrays, data_key, step):
    """The arguments of the loss after params at ``step``: ``(batch, *data)`` or ``data``."""
    data = program.data.merge(arrays.data)
    if program.batch_fn is None:
        return tuple(data)
    batch_fn = program.batch_fn.merge(arrays.batch_fn)
    return (batch_fn(jax.random.fold_in(data_key, step), step), *data)


def eval_args(program: Program, arrays: Arrays) -> tuple:
    """The arguments of the metrics after params."""
    if program.eval_data is None:
        return tuple(program.data.merge(arrays.data))
    return tuple(program.eval_data.merge(arrays.eval_data))


def _member_chunk(program: Program, state: TrainState, gaps, start, data_key, arrays: Arrays,
                  traced):
    """Runs ``gaps[i]`` steps then evaluates the metrics, for each ``i``; one member.

    ``start`` is the step the chunk starts at (minibatch keys depend on it). Every
    ``program.metrics_batch`` evaluations the states reached are checked: an evaluation fails
    when its loss is not finite or the estimator skipped a non-finite step (``num_nonfinite``
    grew); from the first failure on, the metrics are NaN and the member goes on from its last
    good state (its PRNG keys and step counters move on: with shared keys they are the same for
    every member, and counters always are).
    Returns the state, the metrics and the optimizer's query count at each evaluation (-1
    without one).
    """
    optimizer = _optimizer(program, traced)
    metric_args = eval_args(program, arrays)

    def step(t, carry):
        params, opt_state = carry
        args = loss_args(program, arrays, data_key, t)
        value_fn = zojax.estimators.bind(program.loss, *args)  # keeps a line form
        extra = dict(program.extra_args(*args)) if program.extra_args is not None else {}
        grads = jax.grad(value_fn)(params) if program.method.uses_gradient else None
        updates, opt_state = optimizer.update(grads, opt_state, params, value_fn=value_fn,
                                              **extra)
        return optax.apply_updates(params, updates), opt_state

    def segment(carry, gap):
        t, inner = carry
        inner = jax.lax.fori_loop(t, t + gap, step, inner)
        return (t + gap, inner), inner

    def block(carry, gaps):  # metrics_batch evaluations
        t, state = carry
        (t, (_, last_opt_state)), (params, opt_states) = jax.lax.scan(
            segment, (t, (state.params, state.opt_state)), gaps)
        metrics = jax.vmap(lambda p: dict(program.metrics(p, *metric_args)))(params)
        nonfinite = _sum_of("num_nonfinite", opt_states)  # (m,)
        bad = ~jnp.isfinite(metrics["loss"]) | (False if nonfinite is None else nonfinite > 0)
        failed = state.failed | (jnp.cumsum(bad) > 0)
        good = jnp.sum(~failed) - 1  # the last good evaluation (failures are final), or -1
        pick = functools.partial(
            jax.tree_util.tree_map_with_path,
            lambda path, old, new, final: final if is_key(final) or is_counter(path, final)
            else jnp.where(good < 0, old, new[jnp.maximum(good, 0)]))
        last_params = jax.tree.map(lambda x: x[-1], params)
        state = TrainState(pick(state.params, params, last_params),
                           pick(state.opt_state, opt_states, last_opt_state), failed[-1])
        queries = _sum_of("num_queries", opt_states)
        queries = jnp.full(gaps.shape, -1, jnp.int32) if queries is None else queries
        return (t, state), ({k: jnp.where(failed, jnp.nan, v) for k, v in metrics.items()},
                            jnp.where(failed, -1, queries))

    blocks = gaps.reshape(-1, program.metrics_batch)
    (_, state), (metrics, queries) = jax.lax.scan(block, (start, state), blocks)
    return state, jax.tree.map(lambda x: x.reshape(-1), metrics), queries.reshape(-1)


@functools.partial(jax.jit, static_argnums=0)
def train_chunk(program: Program, state: TrainState, gaps, start, data_key, arrays: Arrays,
                traced):
    """One chunk of every member (axis 0 of ``state`` and ``traced``); metrics (M, K).

    Members are vmapped (the batched matrix products of large problems); the minibatches (one
    data key for all) are drawn once for all of them. A single member runs unbatched: a batch
    of one gives XLA no speed-up, and on CPU can pick slower layouts for its matrix products.
    """
    chunk = functools.partial(_member_chunk, program)
    size = jax.tree.leaves(state)[0].shape[0]
    if program.members_sharding is not None:  # members split over the mesh (also the outputs)
        constrain = functools.partial(jax.lax.with_sharding_constraint,
                                      shardings=program.members_sharding)
        state, metrics, queries = _train_chunk(program, constrain(state), gaps, start, data_key,
                                               arrays, constrain(traced), chunk, size)
        return constrain(state), metrics, queries
    return _train_chunk(program, state, gaps, start, data_key, arrays, traced, chunk, size)


def _train_chunk(program: Program, state, gaps, start, data_key, arrays, traced, chunk, size):
    if size == 1:  # one member: its standalone program, unbatched
        squeeze = functools.partial(jax.tree.map, lambda x: x[0])
        out = chunk(squeeze(state), gaps, start, data_key, arrays, squeeze(traced))
        return jax.tree.map(lambda x: x[None], out)
    # Shared keys enter (and leave) the vmap unbatched: one draw per step for all members.
    # So do step counters (every member steps together): a branch on one (a Fisher refresh
    # every k steps) stays a branch, where a batched predicate would run it at every step.
    axes = jax.tree_util.tree_map_with_path(
        lambda path, x: None if (program.shared_keys and is_key(x)) or is_counter(path, x)
        else 0, state)
    state = jax.tree.map(lambda x, axis: x if axis == 0 else x[0], state, axes)
    state, metrics, queries = jax.vmap(chunk, in_axes=(axes, None, None, None, None, 0),
                                       out_axes=(axes, 0, 0))(
        state, gaps, start, data_key, arrays, traced)
    state = jax.tree.map(lambda x, axis: x if axis == 0 else jnp.broadcast_to(x, (size, *x.shape)),
                         state, axes)
    return state, metrics, queries


@functools.partial(jax.jit, static_argnums=(0, 1))
def _final_metrics(program: Program, fn: Callable, params, arrays: Arrays):
    return fn(params, *eval_args(program, arrays))


def final_metrics(group: "Group") -> list:
    """``problem.final_metrics`` of each member's current params, on the host (None for a
    member that went non-finite, or every member when the problem has none)."""
    fn = group.problem.final_metrics
    if fn is None:
        return [None] * len(group.members)
    failed = np.asarray(group.state.failed)
    return [None if bad else jax.device_get(_final_metrics(group.program, fn, params,
                                                           group.arrays))
            for params, bad in zip(unstack(group.state.params, len(group.members)), failed)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def metric_and_reference(program: Program, name: str, reference: Callable, params,
                         arrays: Arrays):
    """A metric and its reference implementation at ``params`` (the cross-check)."""
    args = eval_args(program, arrays)
    return program.metrics(params, *args)[name], reference(params, *args)


# ---------------------------------------------------------------------------------------------
# Groups: members that one program runs, with their state on the host.


@dataclasses.dataclass
class Group:
    """Members run by one compiled program, with their state and history on the host."""

    program: Program
    problem: Problem
    members: list[Member]
    indices: list[int]  # the members' positions in the experiment.
    traced: dict[str, jax.Array]  # the traced hyperparameters, stacked.
    arrays: Arrays  # the problem's array arguments.
    steps: np.ndarray | None = None  # evaluation steps (None: no schedule given).
    size: int = 0  # evaluations per chunk, a multiple of program.metrics_batch.
    counts_queries: bool = False  # the optimizer state has a num_queries counter.
    state: TrainState | None = None
    run_chunk: Callable | None = None  # the compiled program.
    done: int = 0  # evaluations done.
    wall_seconds: float = 0.0  # execution time of the program, cumulative across resumes.
    compile_seconds: float = 0.0  # compilation time of the program, cumulative across resumes.
    history: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)  # (M, n)

    def reached(self, done: int | None = None) -> int:
        """The last step evaluated after ``done`` (default: all done) evaluations."""
        done = self.done if done is None else done
        return int(self.steps[done - 1]) if done else 0

    @property
    def finished(self) -> bool:
        return self.done == len(self.steps)


def describe(problem: Problem, members: Sequence[Member]) -> str:
    """How error messages name a problem."""
    return (f"problem {problem.name!r}" if problem.name
            else f"the problem of {[m.name for m in members]}")


def check_batch(problem: Problem, members: Sequence[Member]) -> None:
    """ConfigError naming the problem and the shapes when the loss fails on its batches."""
    if problem.batch_fn is None:
        return
    batch = jax.eval_shape(problem.batch_fn, jax.random.key(0), jnp.zeros((), jnp.int32))
    try:
        value = jax.eval_shape(lambda p, b: problem.loss(p, b, *problem.data),
                               problem.init_params, batch)
        if jnp.shape(value) != ():
            raise ValueError(f"the loss returned shape {jnp.shape(value)}, not a scalar")
    except Exception as error:  # any failure to trace it (shape errors of jnp, flax, ...)
        shapes = jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", batch)
        data = jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape")
                            else type(x).__name__, problem.data)
        raise ConfigError(f"{describe(problem, members)}: loss(params, batch, *data) fails on the "
                          f"batches of its batch_fn, shaped {shapes} (data {data}): "
                          f"{error}") from None


def make_groups(experiment: Experiment, rng_impl: str | None = None, batching: str = "vmap",
                 config=None) -> list[Group]:
    """Members grouped by problem, method, static hyperparameters and budget
    (``batching="vmap"``), or one group per member (``"separate"``: equal programs then share
    one compilation). With ``config``, each group gets its schedule."""
    names = [member.name for member in experiment.members]
    if not names or len(set(names)) < len(names):
        raise ConfigError(f"an experiment needs members with distinct names, got {names}.")
    metrics_batch = config.get("metrics_batch", 1) if config is not None else 1
    mesh = make_mesh(config.get("mesh_shape")) if config is not None else None
    groups: dict[tuple, Group] = {}
    problems: dict[int, tuple] = {}  # id -> (arrays, static parts), split and checked once
    for index, member in enumerate(experiment.members):
        if member.method not in experiment.methods:
            raise ConfigError(f"member {member.name!r}: unknown method {member.method!r}; "
                              f"known methods: {sorted(experiment.methods)}.")
        method = experiment.methods[member.method]
        method.check(member.name, member.method, member.hparams)
        for name in POSITIVE_FIELDS:
            if member.hparams.get(name) is not None:
                check_positive(f"member {member.name!r}: {name}", member.hparams[name])
        if member.num_steps is not None:
            check_positive(f"member {member.name!r}: num_steps", member.num_steps)
        traced = tuple(k for k in method.traced if k in member.hparams)
        static = tuple(sorted((k, v) for k, v in member.hparams.items() if k not in traced))
        problem = member.problem
        if id(problem) not in problems:
            check_batch(problem, [m for m in experiment.members if m.problem is problem])
            parts = [(None, None) if tree is None else split(tree) for tree in (
                tuple(problem.data), problem.eval_data and tuple(problem.eval_data),
                problem.batch_fn)]
            problems[id(problem)] = (Arrays(*(arrays for arrays, _ in parts)),
                                     [static for _, static in parts])
        arrays, (data_def, eval_def, batch_def) = problems[id(problem)]
        program = Program(method, problem.loss, problem.metrics, static, rng_impl, data_def,
                          eval_def, batch_def, problem.extra_args)
        key = (id(problem), program, traced, member.num_steps,
               member.name if batching == "separate" else None)
        if key not in groups:
            groups[key] = Group(program, problem, [], [], {}, arrays)
        groups[key].members.append(member)
        groups[key].indices.append(index)
    for (_, _, traced, num_steps, _), group in groups.items():
        group.traced = {k: jnp.asarray([m.hparams[k] for m in group.members]) for k in traced}
        seeds = {m.hparams.get("seed", 0) for m in group.members}
        group.program = dataclasses.replace(group.program, shared_keys=len(seeds) == 1)
        if config is not None:
            group.program = dataclasses.replace(
                group.program, **shardings(mesh, len(group.members)))
            group.steps = eval_steps(config, num_steps)
            size = chunk_size(len(group.steps), config.evals_per_chunk)
            batch = min(metrics_batch, size)
            group.size = -(-size // batch) * batch
            group.program = dataclasses.replace(group.program, metrics_batch=batch)
    return list(groups.values())


MESH_AXES = ("directions", "members")


def make_mesh(mesh_shape) -> jax.sharding.Mesh | None:
    """The mesh of ``config.mesh_shape`` (axis name → size, names in :data:`MESH_AXES`) on the
    first devices, or None (one device) when it is None or empty.

    Raises:
        ConfigError: an unknown axis name (the message lists the known ones), a size that is not
            a positive int, more devices than there are.
    """
    if not mesh_shape:
        return None
    shape = dict(mesh_shape)
    unknown = [name for name in shape if name not in MESH_AXES]
    if unknown:
        raise ConfigError(f"config.mesh_shape: unknown axis {unknown[0]!r}; the axes are "
                          f"{MESH_AXES}.")
    for name, size in shape.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"config.mesh_shape.{name} must be a positive int, got {size!r}.")
    needed, available = int(np.prod(list(shape.values()))), jax.device_count()
    if needed > available:
        raise ConfigError(f"config.mesh_shape {shape} needs {needed} devices; there are "
                          f"{available} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count"
                          f"={needed} makes more).")
    # Auto axes: the runner's programs index and reshape member-stacked arrays freely, and
    # XLA places them (explicit axes would make every such op state its output sharding).
    return jax.make_mesh(tuple(shape.values()), tuple(shape),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:needed])


def shardings(mesh: jax.sharding.Mesh | None, num_members: int) -> dict:
    """The :class:`Program` shardings of a group of ``num_members`` on ``mesh``: directions over
    its ``directions`` axis; members over its ``members`` axis when they split evenly over it
    (a group that does not, a single member for one, runs replicated on that axis)."""
    if mesh is None:
        return {}
    out = {}
    if "directions" in mesh.axis_names:
        out["directions_sharding"] = NamedSharding(mesh, PartitionSpec("directions"))
    members = mesh.shape.get("members", 1)
    if members > 1 and num_members > 1 and num_members % members == 0:
        out["members_sharding"] = NamedSharding(mesh, PartitionSpec("members"))
    return out


def place(group: "Group") -> None:
    """Puts the group's state and traced hyperparameters on its members sharding (if any)."""
    sharding = group.program.members_sharding
    if sharding is not None:
        group.state, group.traced = jax.device_put((group.state, group.traced), sharding)


def step_memory(method: Method, hparams, problem: Problem, batch, *,
                donate_params: bool = True) -> int:
    """Compiled bytes of one step of ``method`` (its ``hparams``) on ``problem`` at ``batch``:
    argument + output + temp − alias, the optimizer state donated (and the params, with
    ``donate_params``). Compiled for shapes alone: nothing is allocated."""
    opt = optax.with_extra_args_support(
        method.optimizer(jax.random.key(hparams.get("seed", 0)), hparams))

    def step(opt_state, params, batch):
        args = (batch, *problem.data)
        value_fn = zojax.estimators.bind(problem.loss, *args)
        extra = dict(problem.extra_args(*args)) if problem.extra_args is not None else {}
        grads = jax.grad(value_fn)(params) if method.uses_gradient else None
        updates, opt_state = opt.update(grads, opt_state, params, value_fn=value_fn, **extra)
        return optax.apply_updates(params, updates), opt_state

    params, batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 (problem.init_params, batch))
    stats = jax.jit(step, donate_argnums=(0, 1) if donate_params else 0).lower(
        jax.eval_shape(opt.init, params), params, batch).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def lower_and_compile(program: Program, args) -> tuple[Callable, float]:
    start = time.perf_counter()
    compiled = train_chunk.lower(program, *args).compile()
    return compiled, time.perf_counter() - start


def compile_groups(groups: list[Group], data_key, pool: concurrent.futures.Executor) -> list:
    """Starts compiling every group's chunk program in ``pool``; returns the futures of
    ``(compiled, seconds)``, one per group (groups with equal programs and shapes share one)."""

    def shapes(tree, sharding=None):  # compile for shapes only: restored arrays hit the cache too
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)

    futures, out = {}, []
    for g in groups:
        members = g.program.members_sharding
        args = (shapes(g.state, members), *shapes((np.zeros(g.size, np.int32), np.int32(0),
                                                   data_key, g.arrays)), shapes(g.traced, members))
        key = (g.program, jax.tree.structure(args), tuple(jax.tree.leaves(args)))
        if key not in futures:
            futures[key] = pool.submit(lower_and_compile, g.program, args)
        out.append(futures[key])
    return out


def run_chunk(group: Group, data_key) -> None:
    gaps = np.diff(group.steps, prepend=0).astype(np.int32)[group.done:group.done + group.size]
    padded = np.zeros(group.size, np.int32)  # trailing zero gaps re-evaluate the last point.
    padded[:len(gaps)] = gaps
    start = time.perf_counter()
    group.state, metrics, queries = group.run_chunk(
        group.state, padded, np.int32(group.reached()), data_key, group.arrays, group.traced)
    metrics, queries = jax.device_get((metrics, queries))
    group.wall_seconds += time.perf_counter() - start
    n = len(gaps)
    group.history.append({**{k: np.asarray(v[:, :n], np.float64) for k, v in metrics.items()},
                          "num_queries": np.asarray(queries[:, :n], np.int64)})
    group.done += n


def unstack(tree, size: int) -> list:
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size)]
