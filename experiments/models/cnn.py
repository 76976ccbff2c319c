"""A small CNN: 3×3 convolutions (tanh) with 2×2 average pooling → logits."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


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
