"""The Llama architecture in Flax linen, and a loaded model's pure functions of its params.

Conventions (those of Hugging Face's ``LlamaForCausalLM``): pre-norm blocks, RMSNorm computed in
float32, rotary embeddings in the half-split layout (``rotate_half``: dimension i pairs with
i + head_dim / 2), grouped-query attention (query head h reads key/value head h // (num_heads /
num_kv_heads)), a SiLU-gated MLP, and a head tied to the token embeddings or not.

Positions come from the mask (``cumsum(mask) − 1``), so a row reads the same whether it is
padded on the right (what :class:`~experiments.models.llama.tokenizer.Tokenizer` returns) or on
the left; keys outside the mask are never attended to. The "last position" of a row is its last
position inside the mask.

With ``prefix_length`` > 0, each layer's attention has a trainable key/value prefix
(:mod:`experiments.models.prefix`) that every token attends to. Its keys are stored *rotated*
(as Hugging Face's ``past_key_values`` hold them, after RoPE) and are not rotated again; the
text keeps its positions 0, 1, ... (:func:`with_prefix` rotates the real tokens' keys it
starts from to positions −P .. −1, the offsets they would have if they preceded the text).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models import prefix
from experiments.models.prefix import Prefix


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rescaling of the rotary frequencies: ``kind`` "linear" (every frequency / factor) or
    "llama3" (Llama 3.1's: long wavelengths / factor, short ones kept, a smooth blend between
    ``original_max_position_embeddings / high_freq_factor`` and ``/ low_freq_factor``)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama decoder (defaults: SmolLM2-135M)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # params and activations: "float32" or "bfloat16"
    prefix_length: int = 0  # trainable key/value prefix of each layer (experiments.models.prefix)


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The rotary frequencies (head_dim / 2,), float32, rescaled by ``config.rope_scaling``."""
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is None:
        pass
    elif s.kind == "linear":
        inv = inv / s.factor
    elif s.kind == "llama3":
        wavelength = 2 * math.pi / inv
        old = s.original_max_position_embeddings
        blend = (old / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        medium = (1 - blend) * inv / s.factor + blend * inv
        inv = np.where(wavelength > old / s.low_freq_factor, inv / s.factor,
                       np.where(wavelength < old / s.high_freq_factor, inv, medium))
    else:
        raise NotImplementedError(f"rope_scaling of type {s.kind!r} is not implemented (only "
                                  "'linear' and 'llama3').")
    return inv.astype(np.float32)


def rotate(x, cos, sin):
    """The rotary embedding of ``x`` (n, length, heads, head_dim), half-split layout; ``cos``,
    ``sin`` (n, length, head_dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class RMSNorm(nn.Module):
    """``scale · x / sqrt(mean(x²) + eps)``, the statistic in float32."""

    eps: float
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.dtype(self.dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


def _dense(config, features, bias, name):
    return nn.Dense(features, use_bias=bias, dtype=config.dtype, param_dtype=config.dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class Attention(nn.Module):
    """Grouped-query self-attention: x (n, length, width), cos/sin (n, length, head_dim), a
    boolean ``allowed`` (n, length, prefix_length + length) of the (query, key) pairs → (n,
    length, width)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed):
        c = self.config
        n, length, _ = x.shape
        groups = c.num_heads // c.num_kv_heads
        q = _dense(c, c.num_heads * c.head_dim, c.attention_bias, "q_proj")(x)
        k = _dense(c, c.num_kv_heads * c.head_dim, c.attention_bias, "k_proj")(x)
        v = _dense(c, c.num_kv_heads * c.head_dim, c.attention_bias, "v_proj")(x)
        q = rotate(q.reshape(n, length, c.num_heads, c.head_dim), cos, sin)
        k = rotate(k.reshape(n, length, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(n, length, c.num_kv_heads, c.head_dim)
        if c.prefix_length:  # keys stored rotated
            prefix_key, prefix_value = Prefix(c.prefix_length, c.num_kv_heads * c.head_dim,
                                              c.dtype, name="prefix")()
            k, v = prefix.attach(prefix_key, k, n), prefix.attach(prefix_value, v, n)
        q = q.reshape(n, length, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("nqkgd,nskd->nkgqs", q, k) * np.asarray(c.head_dim**-0.5, x.dtype)
        scores = jnp.where(allowed[:, None, None], scores.astype(jnp.float32),
                           jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("nkgqs,nskd->nqkgd", probs, v).reshape(n, length, -1)
        return _dense(c, c.hidden_size, c.attention_bias, "o_proj")(out)


class MLP(nn.Module):
    """``down(silu(gate(x)) · up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed):
        c = self.config
        x = x + Attention(c, name="self_attn")(
            RMSNorm(c.rms_norm_eps, c.dtype, name="input_layernorm")(x), cos, sin, allowed)
        return x + MLP(c, name="mlp")(
            RMSNorm(c.rms_norm_eps, c.dtype, name="post_attention_layernorm")(x))


def last_positions(mask):
    """Each row's last position inside ``mask`` (n, length) → (n,) int32 (0 for an empty row)."""
    index = jnp.arange(mask.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), index, 0), axis=1)


class Llama(nn.Module):
    """Token ids and a mask (n, length) → the final hidden states (n, length, hidden_size),
    after the last norm; :meth:`label_logits` and :meth:`last_logits` read the head at each
    row's last position inside the mask.

    Params: ``embed_tokens`` (vocab, width), ``layers_{i}`` (``self_attn`` {q,k,v,o}_proj,
    and ``prefix`` {key,value} with a prefix; ``mlp`` {gate,up,down}_proj, the two norms),
    ``norm``, and ``lm_head`` (vocab, width) when the head is not tied; Dense kernels are (in,
    out). With a prefix, the mask may also cover it: (n, prefix_length + length), the prefix
    first (:func:`experiments.models.prefix.split_mask`).
    """

    config: LlamaConfig = LlamaConfig()

    def setup(self):
        c = self.config
        embed = dict(dtype=c.dtype, param_dtype=c.dtype,
                     embedding_init=nn.initializers.normal(0.02))
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, **embed)
        self.layers = [DecoderLayer(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Embed(c.vocab_size, c.hidden_size, **embed)

    def _token_mask(self, mask, length):
        if not self.config.prefix_length:
            return mask
        return prefix.split_mask(mask, length, self.config.prefix_length)[0]

    def __call__(self, ids, mask):
        full, mask = mask, self._token_mask(mask, ids.shape[1]).astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.float32)
        angles = positions[..., None] * jnp.asarray(inverse_frequencies(self.config))
        angles = jnp.concatenate([angles, angles], axis=-1)
        dtype = jnp.dtype(self.config.dtype)
        cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
        length = ids.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        allowed = causal[None] & mask[:, None, :]
        if self.config.prefix_length:
            p = prefix.split_mask(full, length, self.config.prefix_length)[1].astype(bool)
            allowed = jnp.concatenate(
                [jnp.broadcast_to(p[:, None, :], (ids.shape[0], length, p.shape[1])), allowed],
                axis=2)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed)
        return self.norm(x)

    def _head(self):
        return self.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def _last(self, ids, mask):
        hidden = self(ids, mask)
        return hidden[jnp.arange(ids.shape[0]),
                      last_positions(self._token_mask(mask, ids.shape[1]))]

    def label_logits(self, ids, mask, token_ids):
        """The logits (n, len(token_ids)), float32, of ``token_ids`` alone at each row's last
        position: only those rows of the head are read."""
        rows = self._head()(jnp.asarray(token_ids, jnp.int32))  # (k, width)
        return (self._last(ids, mask) @ rows.T).astype(jnp.float32)

    def last_logits(self, ids, mask):
        """The logits (n, vocab_size), float32, at each row's last position."""
        return self._head().attend(self._last(ids, mask)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
    """A model ready to score text: the module, its params (a plain nested dict), its
    tokenizer and its name. Its methods are pure functions of ``params`` (jit them as they
    are: ``jax.jit(loaded.label_logits)``)."""

    model: Llama
    params: dict
    tokenizer: object  # experiments.models.llama.tokenizer.Tokenizer
    name: str

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    def hidden(self, params, ids, mask):
        """The final hidden states (n, length, hidden_size), after the last norm."""
        return self.model.apply({"params": params}, ids, mask)

    def logprobs(self, params, ids, mask, token_ids):
        """The log-softmax over the whole vocabulary at each row's last position inside the
        mask, taken at ``token_ids``: (n, len(token_ids)), float32."""
        logits = self.model.apply({"params": params}, ids, mask, method=Llama.last_logits)
        return jax.nn.log_softmax(logits, axis=-1)[:, jnp.asarray(token_ids, jnp.int32)]

    def label_logits(self, params, ids, mask, token_ids):
        """The raw logits (n, len(token_ids)), float32, of ``token_ids`` at each row's last
        position inside the mask, reading only their rows of the head (never the full
        vocabulary): the scores of a classification loss over label words."""
        return self.model.apply({"params": params}, ids, mask, token_ids,
                                method=Llama.label_logits)


def with_prefix(loaded: Loaded, length: int, seed: int = 0, ids=None) -> Loaded:
    """``loaded`` with a trainable prefix of ``length`` entries in each layer
    (:mod:`experiments.models.prefix`), initialized with the keys and values of the token ids
    ``ids`` (length,) run through the model (default: random ids drawn from ``seed``), the keys
    rotated to positions −length .. −1: the text then attends to the prefix as to these tokens
    placed before it (see the module docstring); the other params are ``loaded``'s."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}.")
    c = loaded.config
    if ids is None:
        vocab = min(c.vocab_size, loaded.tokenizer.backend.get_vocab_size())
        ids = np.random.default_rng(seed).integers(min(100, vocab // 2), vocab, length, np.int32)
    model = Llama(dataclasses.replace(c, prefix_length=0))
    angles = np.arange(-length, 0, dtype=np.float32)[:, None] * inverse_frequencies(c)
    angles = np.concatenate([angles, angles], axis=-1)[None]

    @jax.jit
    def prefixes(params, ids):
        _, state = model.apply({"params": params}, ids, jnp.ones_like(ids),
                               capture_intermediates=lambda m, _: m.name in ("k_proj", "v_proj"),
                               mutable=["intermediates"])
        out = {}
        for i in range(c.num_layers):
            attention = state["intermediates"][f"layers_{i}"]["self_attn"]
            key, value = (attention[name]["__call__"][0][0] for name in ("k_proj", "v_proj"))
            key = rotate(key.reshape(1, length, c.num_kv_heads, c.head_dim).astype(jnp.float32),
                         np.cos(angles), np.sin(angles)).reshape(length, -1).astype(key.dtype)
            out[f"layers_{i}"] = {"key": key, "value": value}
        return out

    found = prefixes(loaded.params, jnp.asarray(ids, jnp.int32).reshape(1, length))
    params = {**loaded.params, **{name: {**loaded.params[name], "self_attn": {
        **loaded.params[name]["self_attn"], "prefix": entries}} for name, entries in found.items()}}
    return dataclasses.replace(
        loaded, model=Llama(dataclasses.replace(c, prefix_length=length)), params=params,
        name=f"{loaded.name}, prefix {length}")
