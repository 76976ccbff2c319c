"""The random curvature functions called without their key: a TypeError naming it and the call.

Before, ``hessian_top_eigenvalue(loss, params, x, y)`` raised ``KeyError: None`` and
``hutchinson_trace(loss, params, x, y, ...)`` "unexpected PRNG key type <class 'dict'>".
Every check runs before the objective is traced (``_never_called`` raises if it is).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zojax

PARAMS = {"w": jnp.zeros(3)}
X, Y = jnp.ones((4, 3)), jnp.ones(4)


def _never_called(params, *args):
    raise AssertionError("the objective must not be traced before the key is checked")


def _loss(params, x, y):
    return jnp.sum((x @ params["w"] - y) ** 2)


def _message(signature):
    return re.escape(signature) + r": the second argument, key, must be a PRNG key"


def _left_out(call, signature, **kwargs):
    """``call`` without its key: params in the key's place, x in params'."""
    with pytest.raises(TypeError, match=_message(signature) + r".*got a dict\. Was the key left"):
        call(_never_called, PARAMS, X, Y, **kwargs)


def test_hutchinson_trace_without_key():
    signature = ("hutchinson_trace(fun, key, params, *args, num_samples, chunk_size=None, "
                 "direction='rademacher', **kwargs)")
    _left_out(zojax.hutchinson_trace, signature, num_samples=4)
    # A batch of keys is not one key; vmapping the call over the batch is the way.
    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(TypeError, match=_message(signature) + r".*batch of PRNG keys of shape "
                       r"\(3,\): pass one key \(jax\.vmap"):
        zojax.hutchinson_trace(_never_called, keys, PARAMS, X, Y, num_samples=4)
    estimates, _ = jax.vmap(lambda k: zojax.hutchinson_trace(_loss, k, PARAMS, X, Y,
                                                             num_samples=2))(keys)
    assert estimates.shape == (3,)


def test_hutchinson_diagonal_without_key():
    _left_out(zojax.hutchinson_diagonal, "hutchinson_diagonal(fun, key, params, *args, "
              "num_samples, chunk_size=None, direction='rademacher', **kwargs)", num_samples=4)


def test_hessian_square_trace_without_key():
    signature = ("hessian_square_trace(fun, key, params, *args, num_samples, exact=False, "
                 "chunk_size=None, direction='rademacher', **kwargs)")
    _left_out(zojax.hessian_square_trace, signature, num_samples=4)
    # exact=True uses no key and takes None, but a pytree in its place is still the mistake.
    _left_out(zojax.hessian_square_trace, signature, num_samples=1, exact=True)
    with pytest.raises(TypeError, match=_message(signature) + ".*NoneType"):
        zojax.hessian_square_trace(_never_called, None, PARAMS, X, Y, num_samples=4)
    estimate, _ = zojax.hessian_square_trace(_loss, None, PARAMS, X, Y, num_samples=1,
                                             exact=True)
    np.testing.assert_allclose(estimate, 9 * 8.0**2)  # H = 2 XᵀX = 8·1·1ᵀ (3×3): ‖H‖²_F


def test_zo_trace_without_key():
    _left_out(zojax.zo_trace, "zo_trace(fun, key, params, *args, delta, num_samples, "
              "chunk_size=None, direction='gaussian', **kwargs)", delta=0.1, num_samples=4)


def test_hessian_top_eigenvalue_without_key():
    signature = ("hessian_top_eigenvalue(fun, key, params, *args, num_iters=100, "
                 "reorthogonalize=True, **kwargs)")
    _left_out(zojax.hessian_top_eigenvalue, signature)
    # Under jit the key is a tracer: its dtype and shape are static, so the check still holds.
    with pytest.raises(TypeError, match=_message(signature) + r".*shape \(4, 3\) and dtype float"):
        jax.jit(lambda p: zojax.hessian_top_eigenvalue(_never_called, p["x"], PARAMS, Y))(
            {"x": X})
    # Raw key data (jax.random.PRNGKey) is a key too: H = 2 XᵀX = 8·1·1ᵀ (3×3), λ_max = 24.
    top = zojax.hessian_top_eigenvalue(_loss, jax.random.PRNGKey(0), PARAMS, X, Y)
    np.testing.assert_allclose(top, 24.0, rtol=1e-5)


def test_hessian_spectrum_without_key():
    signature = ("hessian_spectrum(fun, key, params, *args, num_iters, num_samples, "
                 "reorthogonalize=None, **kwargs)")
    _left_out(zojax.hessian_spectrum, signature, num_iters=2, num_samples=2)
