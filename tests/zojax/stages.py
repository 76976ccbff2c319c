"""Test-local estimator stages, shared by the test modules (``from stages import ...``)."""

import jax
import jax.numpy as jnp

import zojax
from zojax.directions import Perturbation


def diagonal_perturbation(decay=0.5):
    """A test-local stateful perturbation: u = σ ⊙ z, z ~ N(0, I), so Σ = diag(σ²).

    ``update`` moves σ² toward 1 + tanh|mean loss value| (an EMA driven by the step's values).
    """

    def init(params):
        return {"variance": jax.tree.map(lambda p: jnp.full(p.shape, 2.0, p.dtype), params),
                "steps": jnp.zeros((), jnp.int32)}

    def prepare(key, params, state):
        del key, params, state
        return ()

    def sample(key, params, state, context):
        del context
        z = zojax.directions.gaussian(key, params)
        return jax.tree.map(lambda v, x: jnp.sqrt(v) * x, state["variance"], z)

    def update(state, key, params, values, **extra_args):
        del key, params, extra_args
        target = 1.0 + jnp.tanh(jnp.abs(jnp.mean(values)))
        variance = jax.tree.map(lambda v: decay * v + (1 - decay) * target.astype(v.dtype),
                                state["variance"])
        return {"variance": variance, "steps": state["steps"] + 1}

    def cov_matvec(state, v):
        return jax.tree.map(jnp.multiply, state["variance"], v)

    return Perturbation(init, prepare, sample, update, cov_matvec)
