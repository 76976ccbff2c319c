"""The compiled program of a group of members: init and one chunk of training and metrics.

A chunk runs ``len(gaps)`` evaluations as a ``lax.scan``: ``gaps[i]`` steps (each drawing its
minibatch, when the problem has a ``batch_fn``, and calling the optimizer), then the metrics.
The metrics are computed inside the scan: every ``metrics_batch`` evaluations the scan
vmaps them over the params stored since the last ones, so a chunk's memory is that of
``metrics_batch`` states, whatever its length (default 1; a larger value lets cheap problems
batch their metrics' matrix products).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

import zojax
from experiments.runner.config import TUNING_FIELDS
from experiments.runner.methods import Method
from experiments.runner.spec import Member, Problem
from experiments.runner.tuning import tuned_problem

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


def optimizer(method: Method, hparams, rng_impl: str | None = None
              ) -> optax.GradientTransformationExtraArgs:
    """``method``'s optimizer for a member's ``hparams`` (without the tuning fields, which the
    runner reads), its key made from ``hparams["seed"]``."""
    key = jax.random.key(hparams.get("seed", 0), impl=rng_impl)
    hparams = {k: v for k, v in hparams.items() if k not in TUNING_FIELDS}
    return optax.with_extra_args_support(method.optimizer(key, hparams))


def _optimizer(program: Program, traced) -> optax.GradientTransformationExtraArgs:
    hparams = {**dict(program.static), **traced}
    if program.directions_sharding is not None:
        hparams["directions_sharding"] = program.directions_sharding
    return optimizer(program.method, hparams, program.rng_impl)


def train_step(method: Method, optimizer, loss: Callable, extra_args: Callable | None, params,
               opt_state, args: tuple):
    """One step of a member: the optimizer's update on ``loss(params, *args)`` (its ``value_fn``,
    with the gradient for a first-order method and the problem's extra update arguments),
    applied. Returns ``(params, opt_state)``."""
    value_fn = zojax.estimators.bind(loss, *args)  # keeps a line form
    extra = dict(extra_args(*args)) if extra_args is not None else {}
    grads = jax.grad(value_fn)(params) if method.uses_gradient else None
    updates, opt_state = optimizer.update(grads, opt_state, params, value_fn=value_fn, **extra)
    return optax.apply_updates(params, updates), opt_state


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
    opt = _optimizer(program, traced)
    metric_args = eval_args(program, arrays)

    def step(t, carry):
        return train_step(program.method, opt, program.loss, program.extra_args, *carry,
                          loss_args(program, arrays, data_key, t))

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
    # An optimizer can make one depend on the member (zojax.chain keeps the inner counter of a
    # step it skips): the program is then traced again with that leaf batched.
    batched: set[str] = set()
    while True:
        try:
            return _vmapped_chunk(program, state, gaps, start, data_key, arrays, traced, chunk,
                                  size, frozenset(batched))
        except ValueError as error:
            found = {path for path in _shared_paths(program, state)
                     if f"out_axes[0]{path}," in str(error)}
            if not found - batched:
                raise
            batched |= found


def _shared_paths(program: Program, state) -> list[str]:
    """The paths (``keystr``) of the state leaves that may enter the vmap unbatched."""
    return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(state)
            if (program.shared_keys and is_key(x)) or is_counter(path, x)]


def _vmapped_chunk(program: Program, state, gaps, start, data_key, arrays, traced, chunk, size,
                   batched: frozenset):
    shared = set(_shared_paths(program, state)) - batched
    axes = jax.tree_util.tree_map_with_path(
        lambda path, x: None if jax.tree_util.keystr(path) in shared else 0, state)
    state = jax.tree.map(lambda x, axis: x if axis == 0 else x[0], state, axes)
    state, metrics, queries = jax.vmap(chunk, in_axes=(axes, None, None, None, None, 0),
                                       out_axes=(axes, 0, 0))(
        state, gaps, start, data_key, arrays, traced)
    state = jax.tree.map(lambda x, axis: x if axis == 0 else jnp.broadcast_to(x, (size, *x.shape)),
                         state, axes)
    return state, metrics, queries


@functools.partial(jax.jit, static_argnums=(0, 1))
def final_metrics_of(program: Program, fn: Callable, params, arrays: Arrays):
    """``fn(params, *eval data)``: a problem's final metrics of one member."""
    return fn(params, *eval_args(program, arrays))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def metric_and_reference(program: Program, name: str, reference: Callable, params,
                         arrays: Arrays):
    """A metric and its reference implementation at ``params`` (the cross-check)."""
    args = eval_args(program, arrays)
    return program.metrics(params, *args)[name], reference(params, *args)


def step_memory(method: Method, hparams, problem: Problem, batch, *,
                donate_params: bool = True) -> int:
    """Compiled bytes of one step of ``method`` (its ``hparams``) on ``problem`` at ``batch``:
    argument + output + temp − alias, the optimizer state donated (and the params, with
    ``donate_params``). Compiled for shapes alone: nothing is allocated. With tuning fields in
    ``hparams``, the step of the adapters or subset (:mod:`experiments.runner.tuning`)."""
    opt = optimizer(method, hparams)
    tuned = tuned_problem(Member("step_memory", "", hparams, problem))
    # A tuned problem's base params (its last data argument): an argument, not a constant.
    frozen = () if tuned is problem else (tuned.data[-1],)
    data = tuned.data[:len(tuned.data) - len(frozen)]

    def step(opt_state, params, batch, *frozen):
        return train_step(method, opt, tuned.loss, tuned.extra_args, params, opt_state,
                          (batch, *data, *frozen))

    params, batch, frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         (tuned.init_params, batch, frozen))
    stats = jax.jit(step, donate_argnums=(0, 1) if donate_params else 0).lower(
        jax.eval_shape(opt.init, params), params, batch, *frozen).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def unstack(tree, size: int) -> list:
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size)]
