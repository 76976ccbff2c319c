"""Natural perturbations (ZO-NP) and ZO-I / ZO-coordinate on the same blocks: partition, the
sampled covariance, the mean estimate, block Jacobians and Fishers, the factorization, the slot
policy, query counts and bad input. The optax contract battery is in test_transforms.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import zojax
from zojax import blocks

Z_MAX = 4.5  # |mean − expected| / standard error


def _params(dtype=jnp.float32):
    # 12 entries: blocks of 5 at max_block_size=5 are [0, 5), [5, 10), [10, 12); the first
    # straddles the leaves "a" (3) and "b" (4).
    return {"a": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.arange(4.0, dtype=dtype) / 4,
            "c": jnp.linspace(-1, 1, 5, dtype=dtype)}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _spd(key, n, scale=1.0):
    m = jax.random.normal(key, (n, n))
    return scale * (m @ m.T / n)


def _sigma(fisher, damping):
    fisher = np.asarray(fisher, np.float64)
    return (1 + damping) * np.linalg.inv(fisher + damping * np.eye(fisher.shape[0]))


def _with_fisher(state, slot, fisher, damping):
    """``state`` whose slot ``slot`` holds ``fisher`` and its factor."""
    pair = jnp.stack([fisher, blocks.covariance_factor(fisher, damping)])
    return state._replace(matrices=state.matrices.at[slot].set(pair))


def _logits(params, x):
    return x @ params["w"] + params["b"]


def _key_for_block(lay, block):
    """A step key whose prepared block is ``block``."""
    for i in range(1000):
        key = jax.random.key(i)
        if int(blocks.block_index(key, lay)) == block:
            return key
    raise AssertionError("no key found")


# ---------------------------------------------------------------------------------------------
# Blocks


def test_partition_blocks_covers_every_entry_once_across_leaves():
    params = _params()
    parts = zojax.partition_blocks(params, 5)
    assert parts == [(0, 5), (5, 10), (10, 12)]
    assert zojax.partition_blocks(params, 100) == [(0, 12)]
    assert zojax.partition_blocks(params, 1) == [(i, i + 1) for i in range(12)]
    # The paper's count: 1,706,762 parameters at 512 are 3,334 blocks (read from shapes).
    mixer = {"w": jax.ShapeDtypeStruct((1_706_762,), jnp.float32)}
    parts = zojax.partition_blocks(mixer, 512)
    assert len(parts) == 3334 and parts[-1] == (3333 * 512, 1_706_762)
    flat, _ = jax.flatten_util.ravel_pytree(params)
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in zojax.partition_blocks(params, 5)])
    np.testing.assert_array_equal(covered, np.arange(flat.size))


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_partition_blocks_rejects_a_bad_size(bad):
    with pytest.raises(ValueError, match="max_block_size"):
        zojax.partition_blocks(_params(), bad)


def test_blocks_follow_ravel_pytree_order():
    """A block's entries are those of ravel_pytree: the sampled direction is zero elsewhere."""
    params = _params()
    perturbation = blocks.block_perturbation(5)
    lay = blocks.layout(params, 5)
    for block, (lo, hi) in enumerate(zojax.partition_blocks(params, 5)):
        key = _key_for_block(lay, block)
        context = perturbation.prepare(key, params, ())
        u = jax.flatten_util.ravel_pytree(perturbation.sample(jax.random.key(3), params, (),
                                                              context))[0]
        assert np.all(u[lo:hi] != 0)
        assert np.all(np.delete(np.asarray(u), np.arange(lo, hi)) == 0)


# ---------------------------------------------------------------------------------------------
# Covariance and the mean estimate


def _sampled_block(perturbation, state, params, key, block_slice, n):
    context = perturbation.prepare(key, params, state)
    sample = jax.vmap(lambda i: _flat_jnp(perturbation.sample(jax.random.fold_in(key, i),
                                                              params, state, context)))
    return np.asarray(sample(jnp.arange(n)), np.float64)[:, block_slice]


def _flat_jnp(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def test_sampled_covariance_matches_sigma_b():
    params = _params()
    damping = 0.1
    perturbation = blocks.natural_perturbation(5, damping=damping)
    state = perturbation.init(params)
    fisher = _spd(jax.random.key(1), 5, scale=3.0)
    state = _with_fisher(state, 1, fisher, damping)
    key = _key_for_block(blocks.layout(params, 5), 1)
    n = 40_000
    u = _sampled_block(perturbation, state, params, key, slice(5, 10), n)
    sigma = _sigma(fisher, damping)
    empirical = u.T @ u / n
    # Var(u_i u_j) = Σ_ii Σ_jj + Σ_ij² for a zero-mean Gaussian.
    stderr = np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma ** 2) / n)
    assert np.max(np.abs(empirical - sigma) / stderr) < Z_MAX
    # cov_matvec is the unconditional covariance: a uniform block, so blockdiag(Σ_b) / B.
    v = jax.random.normal(jax.random.key(2), (12,))
    got = _flat_jnp(perturbation.cov_matvec(state, jax.flatten_util.ravel_pytree(params)[1](v)))
    expected = np.asarray(v, np.float64).copy()
    expected[5:10] = sigma @ expected[5:10]
    np.testing.assert_allclose(got, expected / 3, rtol=1e-4, atol=1e-5)


def test_identity_fisher_gives_identity_sigma_and_the_zo_i_estimate():
    factor = blocks.covariance_factor(jnp.eye(6), 0.1)
    np.testing.assert_allclose(factor, np.eye(6), atol=1e-6)
    params = _params()
    loss = lambda p: jnp.sum(jnp.sin(_flat_jnp(p)) ** 2)
    natural = zojax.natural(0.01, 4, max_block_size=5, update_every=10_000)
    zo_i = zojax.block_two_point(0.01, 4, max_block_size=5)
    out = lambda p: jnp.stack([_flat_jnp(p)] * 2)
    for _ in range(2):
        g_np, s_np = natural.update(None, natural.init(params), params, value_fn=loss,
                                    output_fn=out)
        g_i, s_i = zo_i.update(None, zo_i.init(params), params, value_fn=loss)
        for a, b in zip(jax.tree.leaves(g_np), jax.tree.leaves(g_i)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mean_estimate_is_sigma_b_grad_on_a_quadratic(x64):
    """Given F_b, E[ĝ | b] = Σ_b ∇_b f on block b and zero elsewhere (forward differences are
    unbiased on quadratics for Gaussian r: the third moments vanish)."""
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    a = np.asarray(_spd(jax.random.key(4), 12, scale=2.0), np.float64) + np.eye(12)
    c = np.linspace(-1, 1, 12)
    loss = lambda p: 0.5 * _flat_jnp(p) @ a @ _flat_jnp(p) + c @ _flat_jnp(p)
    damping, smoothing, n = 0.1, 0.05, 40_000
    perturbation = blocks.natural_perturbation(5, damping=damping)
    fisher = _spd(jax.random.key(5), 5, scale=4.0).astype(jnp.float64)
    state = _with_fisher(perturbation.init(params), 0, fisher, damping)
    key = _key_for_block(blocks.layout(params, 5), 0)
    u = _sampled_block(perturbation, state, params, key, slice(None), n)
    base = float(loss(params))
    values = np.asarray(jax.vmap(lambda v: loss(unravel(flat + smoothing * v)))(jnp.asarray(u)))
    samples = ((values - base) / smoothing)[:, None] * u
    grad = a @ np.asarray(flat) + c
    expected = np.zeros(12)
    expected[:5] = _sigma(fisher, damping) @ grad[:5]
    stderr = samples.std(0) / np.sqrt(n)
    assert np.all(samples[:, 5:] == 0)
    assert np.max(np.abs(samples.mean(0)[:5] - expected[:5]) / stderr[:5]) < Z_MAX
    # The pure estimator over the same directions gives the samples' mean.
    grad_fn = zojax.zo_grad(loss, smoothing=smoothing, num_directions=n, direction=perturbation,
                            scheme="forward", chunk_size=4096)
    got = _flat_jnp(grad_fn(key, params, perturbation_state=state))
    np.testing.assert_allclose(got, samples.mean(0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("block_coordinate", [True, False])
def test_coordinate_blocks_are_isotropic_one_hots(block_coordinate):
    params = _params()
    perturbation = blocks.block_perturbation(5, "coordinate", block_coordinate=block_coordinate)
    key = _key_for_block(blocks.layout(params, 5), 2)
    context = perturbation.prepare(key, params, ())
    u = np.asarray(jax.vmap(lambda i: _flat_jnp(perturbation.sample(
        jax.random.fold_in(key, i), params, (), context)))(jnp.arange(4000)))
    if block_coordinate:  # block 2 has 2 entries: √2 e_j, j uniform
        assert np.all(u[:, :10] == 0) and np.all(np.sum(u != 0, axis=1) == 1)
        np.testing.assert_allclose(np.abs(u[u != 0]), np.sqrt(2), rtol=1e-6)
    else:  # one coordinate of all, √d e_i
        assert np.all(np.sum(u != 0, axis=1) == 1)
        np.testing.assert_allclose(np.abs(u[u != 0]), np.sqrt(12), rtol=1e-6)
    second = u.T @ u / len(u)
    np.testing.assert_allclose(np.diag(second)[u.any(0)], 1.0, atol=0.12)
    assert np.allclose(second - np.diag(np.diag(second)), 0)


# ---------------------------------------------------------------------------------------------
# Jacobians, Fishers, the factorization


def _network(magnitude=False):
    """A small tanh network (params, output_fn); with ``magnitude``, also the sum of the absolute
    terms of its outputs' computation (the scale of their rounding errors)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (6, 4)) / 2, "b1": jnp.full(4, 0.1),
              "w2": jax.random.normal(k2, (4, 3)) / 2}
    x = jax.random.normal(k3, (7, 6))
    output_fn = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    if not magnitude:
        return params, output_fn
    return params, output_fn, lambda p: (
        (jnp.abs(x) @ jnp.abs(p["w1"]) + jnp.abs(p["b1"]) + 1) @ jnp.abs(p["w2"]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zeroth_order_block_jacobian_matches_jacfwd(dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    params, output_fn, magnitude = _network(magnitude=True)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    scale = np.asarray(magnitude(params))  # rounding of o: a few ε times this
    size = 16
    exact = jax.jacfwd(lambda z: output_fn(unravel(z)))(flat)  # (7, 3, d)
    eps = float(jnp.finfo(dtype).eps)
    for block, (lo, hi) in enumerate(zojax.partition_blocks(params, size)):
        base, jac = blocks.block_jacobian(output_fn, params, block, size)
        assert jac.shape == (size, *base.shape)
        np.testing.assert_array_equal(jac[hi - lo:], 0)  # the padding
        # Forward differences: |error_j| ≤ (h_j / 2)·|∂²o/∂θ_j²| + 2δ/h_j, h_j = √ε·max(1, |θ_j|),
        # δ = 8ε·S the rounding of o (S: its absolute terms, 8: the depth of its sums and tanh);
        # second derivatives by jax, a factor 2 of slack.
        for j in range(hi - lo):
            e = jnp.zeros_like(flat).at[lo + j].set(1)
            first = lambda z, e=e: jax.jvp(lambda y: output_fn(unravel(y)), (z,), (e,))[1]
            second = jax.jvp(first, (flat,), (e,))[1]
            h = np.sqrt(eps) * max(1.0, abs(float(flat[lo + j])))
            bound = 2 * (h / 2 * np.abs(second) + 2 * 8 * eps * scale / h)
            err = np.abs(np.asarray(jac[j]) - np.asarray(exact[..., lo + j]))
            assert np.all(err <= bound), (block, j, err.max(), bound.max())
        _, auto = blocks.block_jacobian(output_fn, params, block, size, jacobian="autodiff")
        np.testing.assert_allclose(auto[:hi - lo], np.moveaxis(exact[..., lo:hi], -1, 0),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fisher", ["softmax", "gaussian"])
def test_fisher_is_the_symmetric_psd_expected_outer_product(fisher):
    params, output_fn = _network()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    size, block = 16, 1
    got, finite, queries = blocks.block_fisher(output_fn, params, block, size, fisher=fisher,
                                               jacobian="autodiff", num_fisher_inputs=5)
    assert bool(finite) and int(queries) == 7  # autodiff: the one primal call of 7 rows
    jac = jax.jacfwd(lambda z: output_fn(unravel(z)))(flat)[..., 16:32][:5]  # (5, 3, 16)
    logits = output_fn(params)[:5]
    p = jax.nn.softmax(logits)
    g = (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :] if fisher == "softmax"
         else jnp.broadcast_to(jnp.eye(3), (5, 3, 3)))
    expected = jnp.einsum("ncj,ncd,ndk->jk", jac, g, jac) / 5
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got, got.T)
    assert np.linalg.eigvalsh(np.asarray(got, np.float64)).min() > -1e-6
    # Zeroth-order probes: (N_b + 1) calls of 7 rows; the Fisher agrees to the FD accuracy.
    zo, finite, queries = blocks.block_fisher(output_fn, params, block, size, fisher=fisher,
                                              num_fisher_inputs=5)
    assert bool(finite) and int(queries) == 17 * 7
    np.testing.assert_allclose(zo, got, atol=1e-3 * float(jnp.max(jnp.abs(got))))


def test_fisher_on_the_padding_of_the_last_block_is_the_identity():
    params, output_fn = _network()  # 6·4 + 4 + 4·3 = 40 entries: blocks of 16, 16, 8
    fisher, finite, queries = blocks.block_fisher(output_fn, params, 2, 16, jacobian="autodiff")
    np.testing.assert_array_equal(fisher[8:, 8:], np.eye(8))
    np.testing.assert_array_equal(fisher[:8, 8:], 0)
    _, _, queries = blocks.block_fisher(output_fn, params, 2, 16)
    assert int(queries) == 9 * 7


@pytest.mark.parametrize("case", ["huge", "tiny", "rank_deficient", "zero", "huge_rank_one",
                                  "max_float"])
def test_the_factorization_cannot_fail(case):
    """L is finite, lower triangular with a positive diagonal, and L Lᵀ is a damped inverse:
    its eigenvalues lie in [0, (1 + ρ)/ρ]. Where float32 resolves A = F + ρI (condition number
    κ below ~1/ε) L Lᵀ = Σ to an inverse's rounding error, κ ε relative (1e-3 where that is
    smaller: "huge" has κ = 5.5e5, and its error is 9e-5 where LLVM contracts a·b + c into FMAs,
    3e-3 where it does not, as under tests' jax_disable_most_optimizations); beyond (rank-one F
    of 1e20 and 3e37), the huge directions are damped to their (1 + ρ)/λ and the null space,
    below float32's resolution there, is not claimed."""
    n, damping = 64, 0.1
    v = jax.random.normal(jax.random.key(0), (n, 3))
    fisher = {"huge": 1e12 * _spd(jax.random.key(1), n), "tiny": 1e-30 * jnp.eye(n),
              "rank_deficient": v @ v.T, "zero": jnp.zeros((n, n)),
              "huge_rank_one": 1e20 * jnp.outer(v[:, 0], v[:, 0]),
              "max_float": jnp.full((n, n), 3e37)}[case]
    factor = np.asarray(blocks.covariance_factor(fisher, damping), np.float64)
    assert np.all(np.isfinite(factor))
    np.testing.assert_array_equal(np.triu(factor, 1), 0)  # lower triangular
    assert np.all(np.diag(factor) > 0)
    got = factor @ factor.T
    eigenvalues = np.linalg.eigvalsh(got)
    assert eigenvalues.min() > -1e-6 and eigenvalues.max() <= (1 + damping) / damping * 1.001
    if case in ("huge_rank_one", "max_float"):
        direction = np.asarray(v[:, 0] if case == "huge_rank_one" else jnp.ones(n), np.float64)
        top = direction @ np.asarray(fisher, np.float64) @ direction / (direction @ direction)
        assert direction @ got @ direction / (direction @ direction) <= 2 * (1 + damping) / top
    else:
        sigma = _sigma(fisher, damping)
        a = np.asarray(fisher, np.float64) + damping * np.eye(n)
        rtol = max(1e-3, np.linalg.cond(a) * np.finfo(np.float32).eps)
        assert np.linalg.norm(got - sigma) <= rtol * np.linalg.norm(sigma)


# ---------------------------------------------------------------------------------------------
# The transform: refreshes, slots, queries


def _softmax_problem(n=20, dim=6, classes=3):
    k1, k2 = jax.random.split(jax.random.key(3))
    x = jax.random.normal(k1, (n, dim))
    y = jax.random.randint(k2, (n,), 0, classes)
    params = {"w": jnp.zeros((dim, classes)), "b": jnp.zeros(classes)}

    def loss(p):
        logp = jax.nn.log_softmax(_logits(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    return params, loss, lambda p: _logits(p, x)


@pytest.mark.parametrize("jacobian", ["zeroth_order", "autodiff"])
def test_queries_count_loss_and_jacobian_probes(jacobian):
    params, loss, output_fn = _softmax_problem()  # 21 entries: blocks of 8, 8, 5
    opt = zojax.natural(0.01, 4, max_block_size=8, update_every=3, jacobian=jacobian,
                        num_fisher_inputs=10)
    state = opt.init(params)
    step = jax.jit(lambda s: opt.update(None, s, params, value_fn=loss, output_fn=output_fn)[1])
    sizes = [8, 8, 5]
    expected = 0
    for t in range(7):
        key = jax.random.split(state.key)[1]
        block = int(blocks.block_index(key, blocks.layout(params, 8)))
        state = step(state)
        expected += 5  # q + 1
        if t % 3 == 0:
            expected += 20 * ((sizes[block] + 1) if jacobian == "zeroth_order" else 1)
        assert int(state.num_queries) == expected
    assert int(state.perturbation_state.num_refreshes) == 3
    assert int(state.perturbation_state.count) == 7


def test_a_refresh_moves_the_fisher_by_ema():
    params, loss, output_fn = _softmax_problem()
    opt = zojax.natural(0.01, 4, max_block_size=8, update_every=1, ema=0.25,
                        jacobian="autodiff")
    state = opt.init(params)
    key = jax.random.split(state.key)[1]
    block = int(blocks.block_index(key, blocks.layout(params, 8)))
    _, state = opt.update(None, state, params, value_fn=loss, output_fn=output_fn)
    fresh, _, _ = blocks.block_fisher(output_fn, params, block, 8, jacobian="autodiff")
    natural_state = state.perturbation_state
    np.testing.assert_allclose(natural_state.fisher[block], 0.25 * fresh + 0.75 * np.eye(8),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(natural_state.factor[block],
                               blocks.covariance_factor(natural_state.fisher[block], 0.1),
                               rtol=1e-5, atol=1e-6)
    untouched = [b for b in range(3) if b != block]
    np.testing.assert_array_equal(natural_state.fisher[np.array(untouched)],
                                  np.broadcast_to(np.eye(8), (2, 8, 8)))


def test_max_fisher_blocks_keeps_the_most_recently_refreshed():
    params, loss, output_fn = _softmax_problem(dim=10)  # 33 entries: 9 blocks of 4 (last 1)
    opt = zojax.natural(0.01, 2, max_block_size=4, update_every=1, max_fisher_blocks=2)
    state = opt.init(params)
    assert state.perturbation_state.fisher.shape == (2, 4, 4)
    step = jax.jit(lambda s: opt.update(None, s, params, value_fn=loss, output_fn=output_fn)[1])
    lay = blocks.layout(params, 4)
    refreshed = []
    for _ in range(12):
        refreshed.append(int(blocks.block_index(jax.random.split(state.key)[1], lay)))
        state = step(state)
        s = state.perturbation_state
        held = [int(b) for b in s.block_of_slot if b >= 0]
        # The slots hold the last two distinct blocks refreshed.
        recent = list(dict.fromkeys(reversed(refreshed)))[:2]
        assert sorted(held) == sorted(recent)
        for slot, b in enumerate(s.block_of_slot):
            if b >= 0:
                assert int(s.slot_of_block[b]) == slot
        assert int(jnp.sum(s.slot_of_block >= 0)) == len(held)
    assert int(state.perturbation_state.num_refreshes) == 12


def test_all_blocks_at_once():
    params, loss, output_fn = _softmax_problem()
    opt = zojax.natural(0.01, 3, max_block_size=8, update_every=2, block_coordinate=False)
    state = opt.init(params)
    g, state = opt.update(None, state, params, value_fn=loss, output_fn=output_fn)
    assert int(state.perturbation_state.num_refreshes) == 3
    assert int(state.num_queries) == 4 + 20 * (9 + 9 + 6)
    assert all(np.all(leaf != 0) for leaf in jax.tree.leaves(g))  # every block perturbed
    assert not np.allclose(state.perturbation_state.fisher, np.eye(8))
    with pytest.raises(ValueError, match="max_fisher_blocks"):
        zojax.natural(0.01, 3, max_block_size=8, block_coordinate=False,
                      max_fisher_blocks=2).init(params)


def test_softmax_regression_on_digits_trains_with_zeroth_order_jacobians():
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16, jnp.float32), jnp.asarray(y, jnp.int32)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def loss(p, xb, yb):
        logp = jax.nn.log_softmax(_logits(p, xb))
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))

    opt = optax.chain(zojax.natural(1e-3, 20, max_block_size=128, update_every=10, ema=0.5),
                      optax.adam(0.01))

    def step(carry, i):
        p, s = carry
        idx = jax.random.randint(jax.random.key(i), (100,), 0, 1500)
        xb, yb = x_train[idx], y_train[idx]
        u, s = opt.update(None, s, p, value_fn=functools.partial(loss, xb=xb, yb=yb),
                          output_fn=lambda q: _logits(q, xb))
        return (optax.apply_updates(p, u), s), loss(p, xb, yb)

    (final, state), losses = jax.jit(lambda p: jax.lax.scan(
        step, (p, opt.init(p)), jnp.arange(1500)))(params)
    accuracy = float(jnp.mean(jnp.argmax(_logits(final, x_test), 1) == y_test))
    assert accuracy > 0.8, accuracy
    assert float(losses[-100:].mean()) < 0.2 * float(losses[:20].mean())
    assert int(state[0].num_nonfinite) == 0
    assert int(state[0].perturbation_state.num_refreshes) == 150
    assert not np.allclose(state[0].perturbation_state.fisher, np.eye(128), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name,value", [
    ("max_block_size", 0), ("max_block_size", 1.5), ("damping", 0.0), ("damping", -1.0),
    ("damping", float("nan")), ("damping", float("inf")), ("ema", 0.0), ("ema", 1.5),
    ("ema", float("nan")), ("update_every", 0), ("update_every", 2.5),
    ("num_fisher_inputs", 0), ("max_fisher_blocks", 0), ("fisher", "kl"),
    ("jacobian", "finite"), ("block_coordinate", "yes"), ("smoothing", 0.0),
    ("num_directions", 0)])
def test_natural_rejects_bad_arguments_naming_them(name, value):
    kwargs = dict(smoothing=0.01, num_directions=2, max_block_size=4)
    with pytest.raises(ValueError, match=name):
        zojax.natural(**{**kwargs, name: value})


@pytest.mark.parametrize("name,value", [("max_block_size", 0), ("direction", "sphere"),
                                        ("smoothing", -1.0), ("num_directions", 0),
                                        ("block_coordinate", 1)])
def test_block_two_point_rejects_bad_arguments_naming_them(name, value):
    kwargs = dict(smoothing=0.01, num_directions=2, max_block_size=4)
    with pytest.raises(ValueError, match=name):
        zojax.block_two_point(**{**kwargs, name: value})


def test_missing_output_fn_says_how_to_pass_it():
    params, loss, _ = _softmax_problem()
    opt = zojax.natural(0.01, 2, max_block_size=8)
    with pytest.raises(ValueError, match="output_fn=lambda p"):
        opt.update(None, opt.init(params), params, value_fn=loss)


@pytest.mark.parametrize("bad", ["outputs", "loss"])
def test_nonfinite_outputs_or_losses_leave_the_fisher_untouched(bad):
    params, loss, output_fn = _softmax_problem()
    if bad == "outputs":
        output_fn_used, loss_used = (lambda p: output_fn(p) * jnp.nan), loss
    else:
        output_fn_used, loss_used = output_fn, (lambda p: loss(p) + jnp.inf)
    opt = zojax.natural(0.01, 2, max_block_size=8, update_every=1)
    state = opt.init(params)
    step = jax.jit(lambda s: opt.update(None, s, params, value_fn=loss_used,
                                        output_fn=output_fn_used))
    for _ in range(3):
        updates, state = step(state)
        assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
    natural_state = state.perturbation_state
    assert int(state.num_nonfinite) == 3
    assert int(natural_state.num_refreshes) == 0
    np.testing.assert_array_equal(natural_state.fisher, np.broadcast_to(np.eye(8), (3, 8, 8)))
    np.testing.assert_array_equal(natural_state.factor, natural_state.fisher)
    # A good step afterwards refreshes and moves the parameters.
    updates, state = jax.jit(lambda s: opt.update(None, s, params, value_fn=loss,
                                                  output_fn=output_fn))(state)
    assert int(state.perturbation_state.num_refreshes) == 1
    assert any(np.any(u != 0) for u in jax.tree.leaves(updates))


def test_huge_outputs_keep_the_factor_finite():
    params, loss, output_fn = _softmax_problem()
    params = jax.tree.map(lambda p: p + 0.3, params)
    # Gaussian: F ~ 1e30; softmax: saturated probabilities, F ~ 0 (logits far beyond 1e6 lose
    # the softmax itself to rounding: then the step counts as non-finite).
    for fisher, scale in (("gaussian", 1e15), ("softmax", 1e6)):
        opt = zojax.natural(0.01, 2, max_block_size=8, update_every=1, fisher=fisher,
                            jacobian="autodiff")
        state = opt.init(params)
        huge = lambda p, scale=scale: scale * output_fn(p)
        for _ in range(3):
            updates, state = opt.update(None, state, params, value_fn=loss, output_fn=huge)
        assert int(state.num_nonfinite) == 0
        assert np.all(np.isfinite(state.perturbation_state.factor))
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_the_docs_example_trains():
    """The ZO-NP guide's example runs; its printed accuracy is what the page says (±0.02)."""
    import contextlib
    import io
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guides" / "natural.md"
    section = page.read_text()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    claimed = float(re.search(r"prints `train accuracy ([0-9.]+)", section).group(1))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(page), "exec"), {})
    got = float(re.search(r"train accuracy ([0-9.]+)", out.getvalue()).group(1))
    assert abs(got - claimed) <= 0.02, out.getvalue()
