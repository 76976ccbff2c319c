"""Flax linen models for the experiments and benchmarks (functional params: ``model.init`` and
``model.apply({"params": params}, x)``), and the loss and outputs of a classifier.

They live here, next to the experiments, not in :mod:`zojax`: the library holds estimators and
curvature for any model; these are the fixtures its experiments train.

- :class:`MLP`: flattened inputs → tanh hidden layers → logits.
- :class:`CNN`: 3×3 convolutions (tanh) with 2×2 average pooling → logits; images (n, H, W) or
  (n, H, W, C).
- :class:`MLPMixer` (Tolstikhin et al., 2021): patches embedded by one Dense layer (the same
  parameters as a patch-strided Conv, but a plain matmul, also when the parameters are vmapped
  over perturbations), ``depth`` mixer blocks (LayerNorm, token-mixing MLP, residual; LayerNorm,
  channel-mixing MLP, residual), a final LayerNorm, global average pooling and a Dense head.
  :func:`mixer_1_7m` is the CIFAR-10 configuration with the parameter count of the natural
  perturbations paper's MLP-Mixer.
- :func:`cross_entropy`, :func:`accuracy`, :func:`logits`: a classifier's loss (``value_fn``)
  and outputs (``output_fn``, the logits natural perturbations take their Fisher from);
  :func:`digits_data`, scikit-learn's embedded digits split once.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
    """Inputs (n, ...) flattened → ``hidden`` tanh layers → ``num_classes`` logits."""

    hidden: int | Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in (self.hidden,) if isinstance(self.hidden, int) else self.hidden:
            x = jnp.tanh(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Images (n, H, W[, C]) → per entry of ``features``: 3×3 conv (same padding), tanh, 2×2
    average pooling → flattened → ``num_classes`` logits."""

    features: Sequence[int] = (8,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x[..., None] if x.ndim == 3 else x
        for width in self.features:
            x = jnp.tanh(nn.Conv(width, (3, 3), padding="SAME")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MlpBlock(nn.Module):
    """Dense(hidden) → GELU → Dense(back to the input width), on the last axis."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.hidden, name="in")(x))
        return nn.Dense(x.shape[-1], name="out")(y)


class MixerBlock(nn.Module):
    """Token mixing then channel mixing, each pre-LayerNorm with a residual; (n, tokens, C)."""

    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = jnp.swapaxes(nn.LayerNorm(name="token_norm")(x), 1, 2)
        x = x + jnp.swapaxes(MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y), 1, 2)
        y = nn.LayerNorm(name="channel_norm")(x)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


class MLPMixer(nn.Module):
    """Images (n, H, W, channels) → logits (n, num_classes); H and W multiples of patch_size."""

    num_classes: int
    patch_size: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    depth: int

    @nn.compact
    def __call__(self, x):
        n, height, width, channels = x.shape
        p = self.patch_size
        patches = x.reshape(n, height // p, p, width // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * channels)
        x = nn.Dense(self.hidden_dim, name="stem")(patches)
        for i in range(self.depth):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="pre_head_norm")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


def mixer_1_7m(num_classes: int = 10) -> MLPMixer:
    """The MLP-Mixer of 1,706,762 parameters on CIFAR-10 (32×32×3 inputs, 10 classes), the count
    of the natural perturbations paper's model (whose exact shape is not published): 4×4
    patches (64 tokens), hidden width 192, token MLP 160, channel MLP 384, depth 10."""
    return MLPMixer(num_classes=num_classes, patch_size=4, hidden_dim=192, tokens_mlp_dim=160,
                    channels_mlp_dim=384, depth=10)


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
