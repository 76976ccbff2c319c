"""MLP-Mixer (Tolstikhin et al., 2021), and :func:`mixer_1_7m`, the natural perturbations
paper's parameter count on CIFAR-10."""

import flax.linen as nn
import jax.numpy as jnp


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
