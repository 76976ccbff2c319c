"""The Flax models of experiments/models: shapes and parameter counts (from shapes only)."""

import jax
import jax.numpy as jnp

from experiments.models import MLPMixer, mixer_1_7m
from zojax.directions import num_params


def test_mixer_1_7m_has_the_papers_parameter_count():
    model = mixer_1_7m()
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert num_params(params) == 1_706_762
    assert jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x).shape == (2, 10)


def test_small_mixer_runs():
    model = MLPMixer(num_classes=3, patch_size=4, hidden_dim=8, tokens_mlp_dim=4,
                     channels_mlp_dim=8, depth=1)
    x = jnp.ones((2, 8, 8, 1))
    params = model.init(jax.random.key(0), x)["params"]
    out = model.apply({"params": params}, x)
    assert out.shape == (2, 3) and bool(jnp.all(jnp.isfinite(out)))
