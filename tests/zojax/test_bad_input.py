"""Bad input gets a clear error at construction (or at the first call, for params and outputs)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import zojax

LOSS = lambda p: jnp.sum(p**2)


@pytest.mark.parametrize("smoothing", [0.0, -1.0, float("nan"), float("inf"), "0.1", None])
@pytest.mark.parametrize("factory", [
    lambda s: zojax.two_point(s),
    lambda s: zojax.zo_grad(LOSS, smoothing=s),
    lambda s: zojax.zo_value_and_grad(LOSS, smoothing=s),
    lambda s: zojax.zo_sgd(0.1, s),
])
def test_bad_smoothing(factory, smoothing):
    with pytest.raises(ValueError, match="smoothing"):
        factory(smoothing)


@pytest.mark.parametrize("num_directions", [0, -3, 1.5, True])
def test_bad_num_directions(num_directions):
    with pytest.raises(ValueError, match="num_directions"):
        zojax.two_point(0.1, num_directions)
    with pytest.raises(ValueError, match="num_directions"):
        zojax.zo_grad(LOSS, smoothing=0.1, num_directions=num_directions)
    with pytest.raises(ValueError, match="num_directions"):
        zojax.forward_gradient(num_directions)


def test_bad_direction_scheme_chunk_size():
    with pytest.raises(ValueError, match=r"direction must be one of .*gaussian.*sphere"):
        zojax.two_point(0.1, direction="normal")
    with pytest.raises(ValueError, match=r"scheme must be one of \('central', 'forward'\)"):
        zojax.two_point(0.1, scheme="backward")
    with pytest.raises(ValueError, match="chunk_size"):
        zojax.two_point(0.1, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        zojax.zo_grad(LOSS, smoothing=0.1, chunk_size=-1)


def test_bad_learning_rate():
    with pytest.raises(ValueError, match="learning_rate"):
        zojax.zo_sgd(-0.1, 0.1)
    zojax.zo_sgd(optax.constant_schedule(0.1), 0.1)  # schedules are fine


def test_update_without_value_fn_shows_how():
    opt = zojax.two_point(0.1)
    state = opt.init(jnp.ones(2))
    with pytest.raises(ValueError, match=r"value_fn=lambda p: loss\(p, batch\)"):
        opt.update(None, state, jnp.ones(2))


def test_non_scalar_objective_names_the_shape():
    opt = zojax.two_point(0.1)
    state = opt.init(jnp.ones(3))
    with pytest.raises(ValueError, match=r"value_fn must return a scalar.*\(3,\)"):
        opt.update(None, state, jnp.ones(3), value_fn=lambda p: p**2)
    with pytest.raises(ValueError, match=r"scalar.*\(3,\)"):
        zojax.zo_grad(lambda p: p**2, smoothing=0.1)(jax.random.key(0), jnp.ones(3))
    with pytest.raises(ValueError, match=r"scalar.*\(3,\)"):
        zojax.hessian_trace(lambda p: p**2, jnp.ones(3))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_params_raise_type_error(dtype):
    params = {"w": jnp.ones(3, dtype)}
    with pytest.raises(TypeError, match=r"\['w'\].*" + jnp.dtype(dtype).name):
        zojax.two_point(0.1).init(params)
    with pytest.raises(TypeError, match="floating-point"):
        zojax.zo_grad(lambda p: jnp.sum(p["w"]), smoothing=0.1)(jax.random.key(0), params)


def test_curvature_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        zojax.hutchinson_trace(LOSS, jax.random.key(0), jnp.ones(2), num_samples=0)
    with pytest.raises(ValueError, match="delta"):
        zojax.zo_trace(LOSS, jax.random.key(0), jnp.ones(2), delta=0.0, num_samples=4)
    with pytest.raises(ValueError, match="num_iters"):
        zojax.hessian_top_eigenvalue(LOSS, jax.random.key(0), jnp.ones(2), num_iters=0)
    with pytest.raises(ValueError, match="chunk_size"):
        zojax.hessian_trace(LOSS, jnp.ones(2), chunk_size=0)


def _never_called(params, *args):
    raise AssertionError("the objective must not be traced before the arguments are checked")


KEY = jax.random.key(0)


_TOOLKIT_CALLS = [
    ("num_samples", lambda n: zojax.hutchinson_diagonal(_never_called, KEY, jnp.ones(2),
                                                         num_samples=n)),
    ("num_samples", lambda n: zojax.hessian_square_trace(_never_called, KEY, jnp.ones(2),
                                                          num_samples=n)),
    ("num_samples", lambda n: zojax.hessian_square_trace(_never_called, KEY, jnp.ones(2),
                                                          num_samples=n, exact=True)),
    ("num_samples", lambda n: zojax.hessian_spectrum(_never_called, KEY, jnp.ones(2),
                                                      num_iters=2, num_samples=n)),
    ("num_iters", lambda n: zojax.hessian_spectrum(_never_called, KEY, jnp.ones(2),
                                                    num_iters=n, num_samples=2)),
    ("chunk_size", lambda n: zojax.hessian_diagonal(_never_called, jnp.ones(2), chunk_size=n)),
    ("chunk_size", lambda n: zojax.hutchinson_diagonal(_never_called, KEY, jnp.ones(2),
                                                        num_samples=2, chunk_size=n)),
    ("chunk_size", lambda n: zojax.hessian_square_trace(_never_called, KEY, jnp.ones(2),
                                                         num_samples=2, chunk_size=n)),
    ("chunk_size", lambda n: zojax.hessian_square_trace(_never_called, KEY, jnp.ones(2),
                                                         num_samples=2, exact=True,
                                                         chunk_size=n)),
]


@pytest.mark.parametrize("name, call, bad", [
    (name, call, bad) for name, call in _TOOLKIT_CALLS
    for bad in [0, -3, 1.5, True] + ([] if name == "chunk_size" else [None])])
def test_flatness_toolkit_integer_arguments(name, call, bad):
    """Checked at the call, before the objective is traced (it raises if it is)."""
    with pytest.raises(ValueError, match=name):
        call(bad)


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan"), float("inf"), "0.3", None])
def test_spectral_density_arguments(width):
    nodes, weights, grid = jnp.zeros((2, 3)), jnp.full((2, 3), 1 / 3), jnp.linspace(-1, 1, 5)
    with pytest.raises(ValueError, match="width"):
        zojax.spectral_density(nodes, weights, grid, width=width)
    with pytest.raises(ValueError, match="nodes and weights"):
        zojax.spectral_density(nodes, weights[:, :2], grid, width=0.1)
    with pytest.raises(ValueError, match="grid"):
        zojax.spectral_density(nodes, weights, grid[None], width=0.1)
