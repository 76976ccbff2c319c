"""Groups: the members one compiled program runs, with their state and history on the host.

:func:`make_groups` groups an experiment's members (by problem, method, static hyperparameters
and budget), :func:`compile_groups` compiles their chunk programs, :func:`run_chunk` runs one
chunk of a group; :func:`make_mesh` and :func:`shardings` place them with ``config.mesh_shape``.
"""

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.runner.config import (
    POSITIVE_FIELDS,
    ConfigError,
    check_positive,
    chunk_size,
    eval_steps,
)
from experiments.runner.program import (
    Arrays,
    Program,
    TrainState,
    final_metrics_of,
    split,
    train_chunk,
    unstack,
)
from experiments.runner.spec import Experiment, Member, Problem
from experiments.runner.tuning import tuned_problem


def final_metrics(group: "Group") -> list:
    """``problem.final_metrics`` of each member's current params, on the host (None for a
    member that went non-finite, or every member when the problem has none)."""
    fn = group.problem.final_metrics
    if fn is None:
        return [None] * len(group.members)
    failed = np.asarray(group.state.failed)
    return [None if bad else jax.device_get(final_metrics_of(group.program, fn, params,
                                                           group.arrays))
            for params, bad in zip(unstack(group.state.params, len(group.members)), failed)]


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
    one compilation). With ``config``, each group gets its schedule. A member that tunes part of
    the parameters runs on :func:`experiments.runner.tuning.tuned_problem`."""
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
        if member.num_steps is not None and not (
                isinstance(member.num_steps, int) and not isinstance(member.num_steps, bool)
                and member.num_steps >= 0):  # 0: an evaluation-only member (zero-shot)
            raise ConfigError(f"member {member.name!r}: num_steps must be a non-negative int, "
                              f"got {member.num_steps!r}.")
        traced = tuple(k for k in method.traced if k in member.hparams)
        static = tuple(sorted((k, v) for k, v in member.hparams.items() if k not in traced))
        problem = tuned_problem(member)  # its own, or its adapters' or subset's
        if id(problem) not in problems:
            check_batch(problem, [m for m in experiment.members if m.problem is member.problem])
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
