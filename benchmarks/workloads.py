"""The workloads that ``benchmarks.core`` and the workers of ``benchmarks.compare`` time.

They import zojax, so in a worker of ``benchmarks.compare`` (which loads this file by path) they
run the tree under test. Only the public API of zojax is used.
"""

import math

import jax
import jax.numpy as jnp
import optax

import zojax
from zojax.problems.linear import random_features

SMOOTHING, LEARNING_RATE = 1e-3, 0.1


def zo_step_fn(loss, num_directions, **two_point_kwargs):
    """A jitted ``params, state -> params, state`` step of chain(two_point, sgd) and its state."""
    return step_fn(loss, zojax.two_point(SMOOTHING, num_directions, **two_point_kwargs))


def step_fn(loss, estimator):
    """A jitted ``params, state -> params, state`` step of chain(estimator, sgd) and its state."""
    opt = optax.chain(estimator, optax.sgd(LEARNING_RATE))

    def step(params, state):
        updates, state = opt.update(None, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    return jax.jit(step), opt.init


def linear_problem(num_features):
    """Synthetic a5a (N = 6,414 train rows) through ``num_features`` random features."""
    data = zojax.datasets.synthetic_libsvm(0, like="a5a")
    features, _ = random_features(jax.random.key(0), data.train_inputs,
                                  num_features=num_features)
    labels = jnp.asarray(data.train_labels)
    params = 0.1 * jax.random.normal(jax.random.key(1), (num_features + 1,), jnp.float32)
    return features, labels, params


def mlp_init(key, sizes):
    """An MLP with layer widths ``sizes``: {"layerNN": {"w", "b"}}, w ~ N(0, 1/fan_in)."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i:02d}"] = {
            "w": jax.random.normal(sub, (fan_in, fan_out)) / math.sqrt(fan_in),
            "b": jnp.zeros(fan_out)}
    return params


def mlp_loss(params, inputs, labels):
    """Softmax cross-entropy of the ReLU MLP ``params`` on integer ``labels``."""
    hidden = inputs
    layers = sorted(params)
    for i, name in enumerate(layers):
        hidden = hidden @ params[name]["w"] + params[name]["b"]
        if i < len(layers) - 1:
            hidden = jax.nn.relu(hidden)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(hidden, labels))


def mlp_zo_step(num_directions, chunk_size=1, estimator=None):
    """``step(params, state, inputs, labels) -> (params, state)`` of chain(two_point(λ, q,
    chunk_size), sgd) (or of chain(estimator, sgd)) on :func:`mlp_loss` (not jitted: donate
    params when compiling), and the optimizer's ``init``."""
    if estimator is None:
        estimator = zojax.two_point(SMOOTHING, num_directions, chunk_size=chunk_size)
    opt = optax.chain(estimator, optax.sgd(LEARNING_RATE))

    def step(params, state, inputs, labels):
        updates, state = opt.update(None, state, params,
                                    value_fn=lambda p: mlp_loss(p, inputs, labels))
        return optax.apply_updates(params, updates), state

    return step, opt.init
