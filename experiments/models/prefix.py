r"""Prefix tuning (Li & Liang, 2021) for the two transformer ports: trainable keys and values
that every token of every layer attends to, as if ``prefix_length`` tokens preceded the text.

With ``prefix_length`` = P > 0 in the model's config (:class:`~experiments.models.minilm.
BertConfig`, :class:`~experiments.models.llama.LlamaConfig`; default 0, the model without
prefix), each layer's attention owns a :class:`Prefix` submodule, params ``prefix/key`` and
``prefix/value`` of shape (P, number of key/value heads × head width): projected keys and values,
the entries of Hugging Face's ``past_key_values`` (PEFT's prefix tuning without its
reparametrization). They are concatenated before the layer's keys and values and attended to by
every token (the causal Llama's too); the text's positions are unchanged.

The attention mask of the ports may cover the prefix, as Hugging Face's does with a cache: a
mask of ``P + length`` columns whose first P say which prefix entries are attended to
(:func:`split_mask`); a mask of ``length`` columns attends to the whole prefix. Masking the
prefix out gives the model without prefix.

Initialization: the model's ``init`` draws the prefix like its other weights (normal, standard
deviation 0.02); ``with_prefix`` of each port (:func:`experiments.models.minilm.with_prefix`,
:func:`experiments.models.llama.with_prefix`) adds a prefix to loaded params, initialized with the
keys and values of real tokens (random ids of the vocabulary run through the model, Li &
Liang's and MeZO's initialization: the prefix starts where real keys and values lie).

Training the prefix alone: :func:`select` is the trained part, and
``zojax.lora.freeze(loss, params)`` the objective of it, the rest frozen::

    prefix = select(params)                             # trained
    value_fn = zojax.objective.bind(zojax.lora.freeze(loss, params), batch)
"""

import flax.linen as nn
import jax.numpy as jnp

import zojax

PATHS = r"(.*/)?prefix/(key|value)"  # the prefix leaves of every layer


class Prefix(nn.Module):
    """A layer's prefix: ``() -> (key, value)``, params ``key`` and ``value`` (length, width)."""

    length: int
    width: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(0.02)
        shape, dtype = (self.length, self.width), jnp.dtype(self.dtype)
        return self.param("key", init, shape, dtype), self.param("value", init, shape, dtype)


def split_mask(mask, length: int, prefix_length: int):
    """``(token mask (n, length), prefix mask (n, prefix_length))`` from a mask of ``length``
    columns (the prefix all attended to) or of ``prefix_length + length`` (the prefix first).

    Raises:
        ValueError: any other number of columns.
    """
    if mask.shape[1] == length:
        return mask, jnp.ones((mask.shape[0], prefix_length), mask.dtype)
    if mask.shape[1] == prefix_length + length:
        return mask[:, prefix_length:], mask[:, :prefix_length]
    raise ValueError(f"the mask has {mask.shape[1]} columns; ids have {length} and the prefix "
                     f"{prefix_length}: give {length} or {prefix_length + length}.")


def attach(prefix, x, n: int):
    """``prefix`` (length, heads × width) before ``x`` (n, tokens, heads, width) on axis 1."""
    p = prefix.reshape(prefix.shape[0], *x.shape[2:]).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(p, (n, *p.shape)), x], axis=1)


def select(params) -> dict:
    """The prefix leaves of ``params`` (what prefix tuning trains), a subset for
    ``zojax.lora.combine`` and ``zojax.lora.freeze``.

    Raises:
        ValueError: ``params`` have no prefix (a model with ``prefix_length`` 0).
    """
    return zojax.lora.select(params, PATHS)
