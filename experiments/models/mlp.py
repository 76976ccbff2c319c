"""A multilayer perceptron: flattened inputs → tanh hidden layers → logits."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


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
