"""Directions and sweep members sharded over 8 devices: equal to one device, partitioned, cheap
in communication, and bad input.

Needs 8 devices: ``tests/test_multidevice.py`` runs this file in its own pytest session with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8 fake CPU devices); in a session
with fewer devices every test here is skipped. Run it alone with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import zojax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # experiments/, benchmarks/

from benchmarks.sharding import collective_bytes  # noqa: E402
from experiments import runner  # noqa: E402
from experiments.runner import groups as runner_groups  # noqa: E402
from experiments.runner import program  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: run with XLA_FLAGS="
    "--xla_force_host_platform_device_count=8 (tests/test_multidevice.py does)")

Q = 64


def _mesh(shape=(8,), names=("directions",), auto=False):
    types = (AxisType.Auto,) * len(shape) if auto else None
    return jax.make_mesh(shape, names, axis_types=types, devices=jax.devices()[:np.prod(shape)])


def _sharding(**kwargs):
    return NamedSharding(_mesh(**kwargs), PartitionSpec("directions"))


def _params(dtype=jnp.float32):
    return {"a": jnp.linspace(-1.0, 1.0, 10, dtype=dtype), "b": jnp.ones((3, 4), dtype) / 2}


def _loss(p):  # well conditioned: values O(1), so rounding stays at rounding level
    return jnp.mean(jnp.sin(p["a"]) ** 2) + jnp.mean(jnp.cos(p["b"]) * p["b"])


def _logits(p):
    return jnp.stack([p["a"][:3], p["b"][0, :3]], axis=1)  # (3 inputs, 2 classes)


def _softmax_loss(p):
    return -jnp.mean(jax.nn.log_softmax(_logits(p))[:, 0])


def _update(transform, value_fn, params, **extra):
    def step(params):
        return transform.update(None, transform.init(params), params, value_fn=value_fn,
                                **extra)

    grads, state = jax.jit(step)(params)
    state = state if hasattr(state, "value") else state[0]  # an alias: chain(estimate, sgd)
    return grads, state.value, state.num_queries


# name -> build(directions_sharding) -> a function of (key, params) returning a pytree
ESTIMATORS = {
    "zo_grad central": lambda s: zojax.zo_grad(_loss, smoothing=0.1, num_directions=Q,
                                               directions_sharding=s),
    "zo_grad forward chunked": lambda s: zojax.zo_grad(
        _loss, smoothing=0.1, num_directions=Q, scheme="forward", chunk_size=3,
        directions_sharding=s),
    "zo_grad rademacher chunk 1": lambda s: zojax.zo_grad(
        _loss, smoothing=0.1, num_directions=Q, direction="rademacher", chunk_size=1,
        directions_sharding=s),
    "zo_value_and_grad sphere": lambda s: zojax.zo_value_and_grad(
        _loss, smoothing=0.1, num_directions=Q, direction="sphere", directions_sharding=s),
    "tilted_grad": lambda s: zojax.tilted_grad(_loss, smoothing=0.1, tilt=5.0,
                                               num_directions=2 * Q, directions_sharding=s),
    "tilted_grad points chunked": lambda s: zojax.tilted_grad(
        _loss, smoothing=0.1, tilt=5.0, num_directions=Q, antithetic=False, chunk_size=4,
        directions_sharding=s),
}

TRANSFORMS = {
    "two_point": lambda s: (zojax.two_point(0.1, Q, directions_sharding=s), {}),
    "zo_adam": lambda s: (zojax.zo_adam(0.1, 0.1, Q, directions_sharding=s), {}),
    "tilted": lambda s: (zojax.tilted(0.1, 2.0, 2 * Q, directions_sharding=s), {}),
    "zest": lambda s: (zojax.zest(0.1, 0.1, 2.0, 2 * Q, directions_sharding=s), {}),
    "block_two_point": lambda s: (zojax.block_two_point(0.1, Q, max_block_size=5,
                                                        directions_sharding=s), {}),
    "natural": lambda s: (zojax.natural(0.1, Q, max_block_size=5, update_every=1,
                                        directions_sharding=s), {"output_fn": _logits}),
    "fzoo": lambda s: (zojax.fzoo(0.1, Q, directions_sharding=s), {}),
    "hizoo": lambda s: (zojax.hizoo(0.1, Q, hessian_smooth=0.5, directions_sharding=s), {}),
    "lozo": lambda s: (zojax.lozo(0.1, 2, refresh_every=3, num_directions=Q,
                                  directions_sharding=s), {}),
    "sparse_two_point": lambda s: (zojax.sparse_two_point(0.1, Q, sparsity=0.5,
                                                          directions_sharding=s), {}),
}


def _max_difference(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_sharded_estimators_equal_one_device(name):
    key, params = jax.random.key(3), _params()
    one = jax.jit(ESTIMATORS[name](None))(key, params)
    sharded = jax.jit(ESTIMATORS[name](_sharding()))(key, params)
    assert _max_difference(one, sharded) < 1e-5


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_sharded_transforms_equal_one_device(name):
    value_fn = _softmax_loss if name == "natural" else _loss
    one, extra = TRANSFORMS[name](None)
    sharded, _ = TRANSFORMS[name](_sharding())
    a, b = (_update(t, value_fn, _params(), **extra) for t in (one, sharded))
    assert _max_difference(a[:2], b[:2]) < 1e-5
    assert int(a[2]) == int(b[2])  # the same queries, counted once


@pytest.mark.parametrize("name", ["zo_grad central", "tilted_grad", "zo_grad forward chunked"])
def test_sharded_estimators_equal_one_device_in_float64(name, x64):
    key, params = jax.random.key(3), _params(jnp.float64)
    one = jax.jit(ESTIMATORS[name](None))(key, params)
    sharded = jax.jit(ESTIMATORS[name](_sharding()))(key, params)
    assert _max_difference(one, sharded) < 1e-12


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_each_device_evaluates_its_share_of_the_directions(chunk_size):
    """The compiled program is partitioned 8 ways and its direction batches hold q/8 (or the
    chunk size) directions, never q."""
    fn = jax.jit(zojax.zo_grad(lambda w: jnp.mean(jnp.sin(w) ** 2), smoothing=0.1,
                               num_directions=Q, chunk_size=chunk_size,
                               directions_sharding=_sharding()))
    hlo = fn.lower(jax.random.key(0), jnp.ones(10)).compile().as_text()
    assert "num_partitions=8" in hlo
    batch = Q // 8 if chunk_size is None else chunk_size
    assert f"f32[{batch},10]" in hlo and f"f32[{Q},10]" not in hlo
    if chunk_size is not None:  # each device scans over its own chunks
        assert "while" in hlo


def test_communication_is_a_gradient_and_the_values_not_directions_times_params():
    d = 1000
    fn = jax.jit(zojax.zo_value_and_grad(lambda w: jnp.mean(jnp.sin(w) ** 2), smoothing=0.1,
                                         num_directions=Q, directions_sharding=_sharding()))
    moved = collective_bytes(fn.lower(jax.random.key(0), jnp.ones(d)).compile().as_text())
    assert 0 < moved <= 4 * 4 * (Q + d)  # a psum of the gradient, a few scalars, the values


@pytest.mark.parametrize("auto", [True, False])
def test_sharded_params_stay_sharded_and_so_do_their_directions(auto):
    mesh = _mesh((2, 4), ("directions", "model"), auto=auto)
    params = jax.device_put(jnp.linspace(-1.0, 1.0, 64), NamedSharding(mesh,
                                                                        PartitionSpec("model")))
    loss = lambda w: jnp.mean(jnp.sin(w) ** 2)  # noqa: E731
    key = jax.random.key(1)
    one = jax.jit(zojax.zo_grad(loss, smoothing=0.1, num_directions=8))(key, np.asarray(params))
    fn = jax.jit(zojax.zo_grad(loss, smoothing=0.1, num_directions=8,
                               directions_sharding=NamedSharding(mesh,
                                                                 PartitionSpec("directions"))))
    assert _max_difference(one, fn(key, params)) < 1e-5
    hlo = fn.lower(key, params).compile().as_text()
    # the perturbed copies are (directions/2, 64/4) per device: drawn and used sharded
    assert "f32[4,16]" in hlo and "f32[4,64]" not in hlo


# ---------------------------------------------------------------------------------------------
# Sweeps through the runner.


def _sweep_experiment():
    x = jax.random.normal(jax.random.key(1), (64, 10))
    y = jnp.sign(x @ jnp.linspace(-1.0, 1.0, 10) + 0.5 * jax.random.normal(jax.random.key(2),
                                                                           (64,)))

    def loss(w, x, y):
        return jnp.mean(jax.nn.softplus(-y * (x @ w)))

    problem = runner.Problem(loss, lambda w, x, y: {"loss": loss(w, x, y)}, jnp.zeros(10),
                             data=(x, y))
    members = runner.sweep("zo", {"learning_rate": tuple(np.linspace(0.05, 0.5, 16)),
                                  "smoothing": (0.1, 0.01), "num_directions": 8,
                                  "seed": (0, 1)}, problem)
    return runner.Experiment("sweep", members)  # 64 members, one program


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(num_steps=40, eval_every=10, log_evals=0,
                                            evals_per_chunk=2, checkpoint_every=100))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def unsharded_sweep(tmp_path_factory):
    return runner.run(_sweep_experiment(), _config(), tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("mesh_shape", [{"members": 8}, {"directions": 4, "members": 2},
                                        {"directions": 8}])
def test_sharded_sweeps_equal_the_unsharded_sweep(unsharded_sweep, mesh_shape, tmp_path):
    results = runner.run(_sweep_experiment(), _config(mesh_shape=mesh_shape), tmp_path)
    assert len(results["runs"]) == 64
    for ours, theirs in zip(results["runs"], unsharded_sweep["runs"], strict=True):
        assert ours["name"] == theirs["name"] and ours["num_queries"] == theirs["num_queries"]
        np.testing.assert_allclose(ours["metrics"]["loss"], theirs["metrics"]["loss"],
                                   rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["mesh_shape"] == \
        mesh_shape


def test_members_are_split_over_the_members_axis(tmp_path):
    experiment = _sweep_experiment()
    groups = runner_groups.make_groups(experiment, config=_config(mesh_shape={"members": 8}))
    (group,) = groups
    assert group.program.members_sharding.spec == PartitionSpec("members")
    group.state = program.init(group.program, group.problem.init_params, group.traced)
    runner_groups.place(group)
    shard = jax.tree.leaves(group.state.params)[0].addressable_shards[0]
    assert shard.data.shape == (8, 10)  # 64 members / 8 devices


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("make", [
    lambda s: zojax.zo_grad(_loss, smoothing=0.1, num_directions=12, directions_sharding=s),
    lambda s: zojax.zo_value_and_grad(_loss, smoothing=0.1, num_directions=4,
                                      directions_sharding=s),
    lambda s: zojax.two_point(0.1, 12, directions_sharding=s),
    lambda s: zojax.zo_sgd(0.1, 0.1, 12, directions_sharding=s),
    lambda s: zojax.tilted(0.1, 1.0, 16 + 8, directions_sharding=s),  # 12 pairs
    lambda s: zojax.tilted_grad(_loss, smoothing=0.1, tilt=1.0, num_directions=12,
                                antithetic=False, directions_sharding=s),
    lambda s: zojax.block_two_point(0.1, 12, max_block_size=4, directions_sharding=s),
    lambda s: zojax.natural(0.1, 12, max_block_size=4, directions_sharding=s),
])
def test_an_uneven_split_is_an_error_at_construction(make):
    with pytest.raises(ValueError, match="does not split evenly over the 8 devices"):
        make(_sharding())


def test_an_unknown_axis_name_is_an_error_naming_the_axes():
    with pytest.raises(ValueError, match="not found in mesh.*directions"):
        zojax.zo_grad(_loss, smoothing=0.1, num_directions=8,
                      directions_sharding=NamedSharding(_mesh(), PartitionSpec("direction")))
    with pytest.raises(ValueError, match="partitions no mesh axis.*directions"):
        zojax.two_point(0.1, 8, directions_sharding=NamedSharding(_mesh(), PartitionSpec()))
    with pytest.raises(ValueError, match="NamedSharding"):
        zojax.two_point(0.1, 8, directions_sharding=PartitionSpec("directions"))


@pytest.mark.parametrize("mesh_shape, match", [
    ({"device": 8}, r"unknown axis 'device'; the axes are \('directions', 'members'\)"),
    ({"members": 16}, "needs 16 devices; there are 8"),
    ({"members": 0}, "mesh_shape.members must be a positive int"),
])
def test_bad_mesh_shapes_are_config_errors(mesh_shape, match, tmp_path):
    with pytest.raises(runner.ConfigError, match=match):
        runner.run(_sweep_experiment(), _config(mesh_shape=mesh_shape), tmp_path)


def test_a_sweep_whose_directions_do_not_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="num_directions=8 does not split evenly over the 3"):
        runner.run(_sweep_experiment(), _config(mesh_shape={"directions": 3}), tmp_path)


def test_optax_chains_keep_the_sharded_estimate():
    opt = optax.chain(zojax.two_point(0.1, Q, directions_sharding=_sharding()),
                      optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    params = _params()
    updates, state = jax.jit(lambda p: opt.update(None, opt.init(p), p, value_fn=_loss))(params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    assert int(state[0].num_queries) == 2 * Q
