"""A classifier's loss (``value_fn``) and outputs (``output_fn``), and the digits data."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax


def logits(params, model: nn.Module, inputs):
    """``model.apply({"params": params}, inputs)``: the outputs a Fisher is taken from."""
    return model.apply({"params": params}, inputs)


def cross_entropy(params, model: nn.Module, inputs, labels):
    """The mean softmax cross-entropy of integer ``labels``: a classifier's ``value_fn``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits(params, model, inputs), labels))


def accuracy(params, model: nn.Module, inputs, labels):
    """The fraction of ``inputs`` whose largest logit is the label."""
    return jnp.mean(jnp.argmax(logits(params, model, inputs), axis=-1) == labels)


def digits_data(seed: int = 0):
    """scikit-learn's digits (embedded): pixels / 16, a fixed 80/20 split by ``seed``."""
    from sklearn.datasets import load_digits  # lazy: only this problem needs it

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    inputs = (digits.data[order] / 16.0).astype(np.float32)
    labels = digits.target[order].astype(np.int32)
    cut = int(0.8 * len(labels))
    return (jnp.asarray(inputs[:cut]), jnp.asarray(labels[:cut]), jnp.asarray(inputs[cut:]),
            jnp.asarray(labels[cut:]))
