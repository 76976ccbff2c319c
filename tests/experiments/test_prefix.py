"""Prefix tuning of the two transformer ports (experiments.models.prefix), on their small random
stand-ins: the model without prefix unchanged, a masked-out prefix changing nothing, a prefix
changing the outputs otherwise, Llama's rotated prefix keys. (Training a subset through
zojax.lora.freeze: tests/zojax/test_lora.py and, with the runner, tests/experiments/
test_tuning.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zojax
from experiments.models import llama, minilm, prefix

PREFIX = 3
IDS = jnp.asarray(np.random.default_rng(0).integers(5, 400, (2, 7)), jnp.int32)
MASK = jnp.ones_like(IDS).at[1, 5:].set(0)  # the second row padded on the right
ROUNDING = 1e-5  # relative: softmaxes over P more (zero) weights reduce in another order


def minilm_default():
    """``minilm.default()``, its init jitted (the same params; eager, it takes seconds)."""
    model = minilm.BertEncoder(minilm.DEFAULT_CONFIG)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    return minilm.Loaded(model, params, None, "default")


@pytest.fixture(scope="module", params=["minilm", "llama"])
def port(request):
    """(the model without prefix, with one) of a port."""
    if request.param == "minilm":
        base = minilm_default()
        return base, minilm.with_prefix(base, PREFIX)
    base = llama.default()
    return base, llama.with_prefix(base, PREFIX)


def hidden(loaded, params, ids, mask):
    return jax.jit(loaded.hidden)(params, ids, mask)


def assert_close(a, b):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=ROUNDING * scale)


def test_without_prefix_the_model_and_params_are_unchanged(port):
    base, with_prefix = port
    assert base.model.config.prefix_length == 0
    assert not any("prefix" in zojax.lora.path_name(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(base.params)[0])
    with pytest.raises(ValueError, match="prefix"):
        prefix.select(base.params)
    # with_prefix adds the prefix leaves alone, of shape (P, key/value width)
    added = prefix.select(with_prefix.params)
    config = base.model.config
    width = (config.hidden_size if isinstance(config, minilm.BertConfig)
             else config.num_kv_heads * config.head_dim)
    assert {x.shape for x in jax.tree.leaves(added)} == {(PREFIX, width)}
    assert len(jax.tree.leaves(added)) == 2 * config.num_layers
    rest = zojax.lora.combine(with_prefix.params, added)
    assert jax.tree.structure(rest) == jax.tree.structure(with_prefix.params)


def test_a_masked_out_prefix_changes_nothing_and_an_attended_one_does(port):
    base, with_prefix = port
    expected = hidden(base, base.params, IDS, MASK)
    masked_out = jnp.concatenate([jnp.zeros((2, PREFIX), MASK.dtype), MASK], axis=1)
    assert_close(hidden(with_prefix, with_prefix.params, IDS, masked_out), expected)
    attended = hidden(with_prefix, with_prefix.params, IDS, MASK)  # the prefix attended
    full_mask = jnp.concatenate([jnp.ones((2, PREFIX), MASK.dtype), MASK], axis=1)
    np.testing.assert_array_equal(hidden(with_prefix, with_prefix.params, IDS, full_mask),
                                  attended)
    changed = jnp.abs(attended - expected)[MASK.astype(bool)]
    assert float(jnp.min(jnp.max(changed, axis=-1))) > 1e-3  # every token's output moves
    with pytest.raises(ValueError, match="columns"):
        hidden(with_prefix, with_prefix.params, IDS, MASK[:, :-1])


def test_llama_prefix_is_the_tokens_it_was_made_of_placed_before_the_text():
    """Causal: the keys and values of P tokens do not depend on the text after them, so a
    prefix made of them (keys rotated to −P .. −1) reads as those tokens before the text (the
    last position's logits, which attend to every position; the mask covers the prefix)."""
    base = llama.default()
    tokens = jnp.asarray([11, 97, 203], jnp.int32)
    with_prefix = llama.with_prefix(base, 3, ids=tokens)
    before = jnp.concatenate([jnp.broadcast_to(tokens, (2, 3)), IDS], axis=1)
    words = base.tokenizer.token_ids((" great", " terrible"))
    expected = jax.jit(base.label_logits)(base.params, before, jnp.pad(MASK, ((0, 0), (3, 0)),
                                                                       constant_values=1), words)
    assert_close(jax.jit(with_prefix.label_logits)(
        with_prefix.params, IDS, jnp.pad(MASK, ((0, 0), (3, 0)), constant_values=1), words),
        expected)


def test_the_model_init_draws_a_prefix():
    config = dataclasses.replace(llama.DEFAULT_CONFIG, prefix_length=2)
    params = llama.default(config=config).params
    assert params["layers_0"]["self_attn"]["prefix"]["key"].shape == (2, 32)
