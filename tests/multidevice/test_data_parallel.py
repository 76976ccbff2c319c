"""Data parallel: a zojax step in ``jax.shard_map`` over a mesh axis "data", the batch split over
the devices, params and optimizer state replicated: the recipe of docs/guides/optax_flax.md, on 2
devices.

The recipe: the objective averages the loss over the devices,
``value_fn=lambda p: jax.lax.pmean(loss(p, local_batch), "data")``. Every device then draws the
same directions (the state's key is replicated), evaluates the same perturbed points, and gets
the same values (the global loss, for equal shards): so the same estimate and the same state
(``count``, ``key``, ``value``, ``num_nonfinite``, ``num_queries``, an optimizer's moments).
Nothing else needs reducing, and ``out_specs=P()`` holds, which ``shard_map`` checks
(``check_vma``, on by default: without the ``pmean`` it refuses, last test).
``num_queries`` counts evaluations of the global loss, each one forward pass of every device on
its own shard: the same count as on one device with the whole batch.

Compared with one device and the whole batch, the two runs differ by rounding only: the global
mean is summed in another order, and the estimator's arithmetic is compiled in another program.
The tolerances below bound that rounding, amplified by ``1/λ``, step by step (each step starts
both runs from the one-device state, so differences do not compound). Each step's results are
read on the host before the next step: on fake CPU devices with fewer cores than devices, steps
queued by asynchronous dispatch can deadlock XLA's CPU all-reduce (seen on 2 cores, JAX 0.10.2:
"waiting for all reduce RendezvousKey ... may be stuck", then an abort).

Needs 2 devices: ``tests/test_multidevice.py`` runs this file in its own pytest session with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; with fewer devices it is skipped.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import zojax

pytestmark = pytest.mark.skipif(
    jax.device_count() < 2, reason="needs 2 devices: run with XLA_FLAGS="
    "--xla_force_host_platform_device_count=8 (tests/test_multidevice.py does)")

N = 32  # examples in the whole batch, 16 per device
Q = 4  # directions (pairs) per step
SMOOTHING, TILT, LR, NUM_STEPS = 0.05, 1.0, 0.1, 3

# Rounding bounds (float32). Every per-example loss 0.25 (tanh(x·w + b) − y)² lies in [0, 1], so
# does every mean of them: F_MAX = 1. The two runs sum the same N per-example losses (each a few
# roundings itself) in another order; each sum is within (N + 8)·u·F_MAX of the exact mean
# (the classical (n − 1)·u bound, u = EPS/2, with room for the terms' own roundings), so two
# evaluations of one point differ by at most DELTA_F.
EPS = float(jnp.finfo(jnp.float32).eps)
F_MAX = 1.0
DELTA_F = (N + 8) * EPS * F_MAX
U_MAX = 6.0  # |u_ij|, a Gaussian direction's entries: P(|N(0, 1)| > 6) = 2e-9 per draw
# Two-point: ĝ = (1/q) Σ_i (f₊ − f₋)/(2λ) u_i changes by ≤ DELTA_F/λ · U_MAX from the values,
# and by the rounding of its own q-term sum in the other program: ≤ (q + 2)·EPS·F_MAX/(2λ)·U_MAX.
E_TWO_POINT = U_MAX / SMOOTHING * (DELTA_F + (Q + 2) * EPS * F_MAX / 2)
# Tilted, over 2q points: ĝ = (1/(tλ)) Σ_m w_m s_m u_m, w = softmax(t f), ∂ĝ/∂f_m =
# (w_m/λ)(s_m u_m − tλĝ) with |tλĝ| ≤ U_MAX: ≤ 2 U_MAX/λ · DELTA_F from the values, and
# (2q + 3)·EPS·U_MAX/(tλ) from the roundings of the weights (a softmax of 2q values).
E_TILTED = 2 * U_MAX / SMOOTHING * DELTA_F + (2 * Q + 3) * EPS * U_MAX / (TILT * SMOOTHING)


def _mesh():
    return Mesh(np.array(jax.devices()[:2]), ("data",))


def _problem():
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (N, 4))
    y = jnp.tanh(x @ jax.random.normal(kt, (4,)))
    params = {"w": 0.1 * jax.random.normal(kw, (4,)), "b": jnp.zeros(())}
    return params, (x, y)


def loss(params, batch):
    x, y = batch
    return 0.25 * jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def _data_parallel(opt, per_device=False):
    """The recipe: ``(params, state, batch) -> (updates, state)``, the batch split over "data";
    ``per_device``: every device's copy, stacked (``out_specs=P("data")``), to compare them."""

    def step(params, state, batch):  # batch: this device's shard
        value_fn = lambda p: jax.lax.pmean(loss(p, batch), "data")  # noqa: E731
        updates, state = opt.update(None, state, params, value_fn=value_fn)
        if per_device:
            updates, state = jax.tree.map(lambda x: x[None], (updates, state))
        return updates, state

    return jax.jit(jax.shard_map(step, mesh=_mesh(), in_specs=(P(), P(), P("data")),
                                 out_specs=P("data") if per_device else P()))


@jax.jit
def _adam_bounds(estimator_state, adam_state, params, batch, update, new_adam_state):
    """Bounds on the change of zo_adam's update and moments when its estimate ĝ moves by
    E_TWO_POINT, from the same state: the update's by its derivative (``jax.jvp`` of
    ``optax.adam``'s own update at the one-device ĝ), twice that, plus a few roundings of the
    update itself; Δμ ≤ (1 − β₁)E, Δν ≤ (1 − β₂)(2|ĝ| + E)E, plus a few roundings of each."""
    estimate, _ = zojax.two_point(SMOOTHING, Q).update(None, estimator_state, params,
                                                       value_fn=lambda p: loss(p, batch))
    tangent = jax.tree.map(lambda g: jnp.full_like(g, E_TWO_POINT), estimate)
    _, change = jax.jvp(lambda g: optax.adam(LR).update(g, adam_state)[0], (estimate,),
                        (tangent,))
    rounding = lambda x: 8 * EPS * jnp.abs(x)  # noqa: E731
    moments = new_adam_state[0]
    return (jax.tree.map(lambda c, u: 2 * jnp.abs(c) + rounding(u), change, update),
            jax.tree.map(lambda m: 0.1 * E_TWO_POINT + rounding(m), moments.mu),
            jax.tree.map(lambda g, v: 1e-3 * (2 * jnp.abs(g) + E_TWO_POINT) * E_TWO_POINT
                         + rounding(v), estimate, moments.nu))


def _one_device(opt):
    return jax.jit(lambda params, state, batch: opt.update(None, state, params,
                                                           value_fn=lambda p: loss(p, batch)))


def _bits(tree):
    """``tree`` with its typed PRNG keys as their key data, to compare with NumPy."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x, tree)


def _estimator_state(state):
    return state if isinstance(state, zojax.TwoPointState) else state[0]  # a chain's first


def _assert_same_estimator_state(got, want, value_tolerance):
    got, want = _estimator_state(got), _estimator_state(want)
    for field in ("count", "num_nonfinite", "num_queries"):
        assert int(getattr(got, field)) == int(getattr(want, field)), field
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(want.key))
    np.testing.assert_allclose(got.value, want.value, rtol=0, atol=value_tolerance)


def _within(got, want, tolerance):
    """Leaf by leaf ``|got − want| ≤ tolerance`` (a number or a pytree like ``want``)."""
    if isinstance(tolerance, float):
        tolerance = jax.tree.map(lambda _: tolerance, want)
    jax.tree.map(lambda g, w, t: np.testing.assert_array_less(np.abs(g - w), t), got, want,
                 tolerance)


def test_the_estimate_is_the_full_batch_estimate():
    opt = zojax.two_point(SMOOTHING, Q)
    params, batch = _problem()
    state = opt.init(params)
    data_parallel, one_device = _data_parallel(opt), _one_device(opt)
    for _ in range(NUM_STEPS):
        got, got_state = data_parallel(params, state, batch)
        want, state = one_device(params, state, batch)
        _within(got, want, E_TWO_POINT)
        _assert_same_estimator_state(got_state, state, DELTA_F + 2 * Q * EPS * F_MAX)
        params = optax.apply_updates(params, want)
    assert int(state.num_queries) == NUM_STEPS * 2 * Q  # 2q evaluations of the global loss


@pytest.mark.parametrize("name", ["zest", "zo_adam"])
def test_an_alias_steps_as_on_one_device(name):
    """zest (tilted, then SGD): a step differs by ≤ LR · E_TILTED. zo_adam (a chain): its
    update and Adam's moments within :func:`_adam_bounds`."""
    opt = {"zest": zojax.zest(LR, SMOOTHING, TILT, 2 * Q),
           "zo_adam": zojax.zo_adam(LR, SMOOTHING, Q)}[name]
    params, batch = _problem()
    state = opt.init(params)
    data_parallel, one_device = _data_parallel(opt), _one_device(opt)
    for _ in range(NUM_STEPS):
        got, got_state = data_parallel(params, state, batch)
        want, new_state = one_device(params, state, batch)
        if name == "zo_adam":  # state: (the estimator's, optax.adam's)
            bound, mu_bound, nu_bound = _adam_bounds(state[0], state[1], params, batch, want,
                                                     new_state[1])
            (got_moments, _), (want_moments, _) = got_state[1], new_state[1]
            assert int(got_moments.count) == int(want_moments.count)
            _within(got_moments.mu, want_moments.mu, mu_bound)
            _within(got_moments.nu, want_moments.nu, nu_bound)
        else:
            bound = LR * E_TILTED
        _within(got, want, bound)
        _assert_same_estimator_state(got_state, new_state, DELTA_F + 2 * Q * EPS * F_MAX)
        params, state = optax.apply_updates(params, want), new_state
    # Evaluations of the global loss: zest's 2q points (q antithetic pairs), zo_adam's 2q.
    assert int(state[0].num_queries) == NUM_STEPS * 2 * Q


def test_every_device_holds_the_same_state():
    """Nothing is reduced but the loss: each device's copy of the update and of the whole state
    of zo_adam (the estimator's and Adam's) is the same, bit for bit, step after step."""
    opt = zojax.zo_adam(LR, SMOOTHING, Q)
    params, batch = _problem()
    state = opt.init(params)
    per_device = _data_parallel(opt, per_device=True)
    for _ in range(NUM_STEPS):
        copies = per_device(params, state, batch)
        for copy in jax.tree.leaves(_bits(copies)):
            assert copy.shape[0] == 2
            np.testing.assert_array_equal(copy[0], copy[1])
        updates, state = jax.tree.map(lambda x: x[0], copies)
        params = optax.apply_updates(params, updates)


def test_without_the_pmean_shard_map_refuses():
    """Each device's own loss (no pmean) gives each its own estimate: out_specs=P() then fails
    shard_map's replication check instead of returning one device's result."""
    opt = zojax.zo_sgd(LR, SMOOTHING, Q)
    params, batch = _problem()

    def step(params, state, batch):
        return opt.update(None, state, params, value_fn=lambda p: loss(p, batch))

    mapped = jax.jit(jax.shard_map(step, mesh=_mesh(), in_specs=(P(), P(), P("data")),
                                   out_specs=(P(), P())))
    with pytest.raises(ValueError, match="out_specs"):
        mapped(params, opt.init(params), batch)
