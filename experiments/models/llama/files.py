"""Reading Llama weights: a GGUF file (llama.cpp's format, dequantized to float32 with the
``gguf`` package) or a Hugging Face checkpoint directory (``safetensors``), and writing a
loaded model as such a directory.

Layouts. Hugging Face stores each linear layer's weight as (out, in) and the query/key rows of
each head in the half-split rotary layout (row i pairs with row i + head_dim / 2), which the
Flax model uses. llama.cpp's converter permutes those rows into its interleaved layout (row 2i
pairs with row 2i + 1): :func:`half_split` undoes it. GGUF lists a tensor's shape innermost
first (``ne``): the numpy arrays of ``gguf`` are already (rows, columns).
"""

import json
import pathlib

import jax
import numpy as np

from experiments.models.llama.model import Llama, LlamaConfig, Loaded, RopeScaling
from experiments.models.llama.tokenizer import from_file, from_gguf_metadata, require

GGUF_INSTALL = "pip install gguf"
SAFETENSORS_INSTALL = "pip install safetensors"
# The tensor types read (and dequantized to float32): floats and llama.cpp's block formats.
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
              "Q4_K", "Q5_K", "Q6_K")
CHECKPOINT_FILES = ("config.json", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

# Hugging Face tensor name (after "model.layers.{i}.") → path in a layer's params.
_LINEAR = {"self_attn.q_proj": ("self_attn", "q_proj"), "self_attn.k_proj": ("self_attn", "k_proj"),
           "self_attn.v_proj": ("self_attn", "v_proj"), "self_attn.o_proj": ("self_attn", "o_proj"),
           "mlp.gate_proj": ("mlp", "gate_proj"), "mlp.up_proj": ("mlp", "up_proj"),
           "mlp.down_proj": ("mlp", "down_proj")}
_NORMS = ("input_layernorm", "post_attention_layernorm")
# llama.cpp's names of the same tensors ("blk.{i}." + name + ".weight").
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def half_split(w: np.ndarray, heads: int) -> np.ndarray:
    """The rows of a query/key weight (heads · head_dim, ...) from llama.cpp's interleaved
    rotary layout into Hugging Face's half-split one (the inverse of :func:`interleave`)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's half-split query/key rows into llama.cpp's interleaved layout."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def params_from_tensors(tensors, config: LlamaConfig, source: str) -> dict:
    """The Flax params from Hugging Face's tensors (``tensors[name]`` → (out, in) numpy, any
    float dtype), cast to ``config.dtype``. A missing tensor: ValueError naming it."""
    def get(name):
        try:
            return np.asarray(tensors[name], np.float32)
        except KeyError:
            raise ValueError(f"{source} has no tensor {name!r}.") from None

    def linear(name, bias):
        return {"kernel": get(f"{name}.weight").T,
                **({"bias": get(f"{name}.bias")} if bias else {})}

    params = {"embed_tokens": {"embedding": get("model.embed_tokens.weight")},
              "norm": {"scale": get("model.norm.weight")}}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"embedding": get("lm_head.weight")}
    for i in range(config.num_layers):
        layer = {"self_attn": {}, "mlp": {}}
        for name, (block, proj) in _LINEAR.items():
            bias = config.attention_bias if block == "self_attn" else config.mlp_bias
            layer[block][proj] = linear(f"model.layers.{i}.{name}", bias)
        for name in _NORMS:
            layer[name] = {"scale": get(f"model.layers.{i}.{name}.weight")}
        params[f"layers_{i}"] = layer
    return jax.tree.map(lambda x: jax.numpy.asarray(x, config.dtype), params)


def tensors_from_params(params: dict, config: LlamaConfig) -> dict:
    """Hugging Face's tensors (float32 numpy, weights (out, in)) of the Flax params."""
    out = {"model.embed_tokens.weight": params["embed_tokens"]["embedding"],
           "model.norm.weight": params["norm"]["scale"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"]["embedding"]
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        for name, (block, proj) in _LINEAR.items():
            for field, value in layer[block][proj].items():
                key = f"model.layers.{i}.{name}.{'weight' if field == 'kernel' else 'bias'}"
                out[key] = value.T if field == "kernel" else value
        for name in _NORMS:
            out[f"model.layers.{i}.{name}.weight"] = layer[name]["scale"]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# GGUF.


def _field(reader, name, default=None):
    field = reader.fields.get(name)
    if field is None:
        if default is None:
            raise ValueError(f"{reader.data.filename}: no metadata field {name!r}.")
        return default
    return field.contents()


def _decimal(value) -> float:
    """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _tensor(tensors, name, path):
    if name not in tensors:
        raise ValueError(f"{path} has no tensor {name!r}.")
    return tensors[name]


def load_gguf(path, dtype: str = "float32") -> Loaded:
    """A Llama from a GGUF file (architecture "llama", tensors of :data:`GGUF_TYPES`, the
    byte-level BPE vocabularies of :mod:`~experiments.models.llama.tokenizer`), dequantized to
    float32 and cast to ``dtype``."""
    gguf = require("gguf", GGUF_INSTALL)
    try:
        reader = gguf.GGUFReader(str(path))
    except ValueError as error:  # not GGUF's magic number, or a version it does not read
        raise ValueError(f"{path} is not a GGUF file gguf reads: {error}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not 'llama'.")
    heads = int(_field(reader, "llama.attention.head_count"))
    width = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", width // heads))
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise NotImplementedError(f"{path}: rotary embeddings on part of each head.")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors or "llama.rope.scaling.type" in reader.fields:
        raise NotImplementedError(f"{path}: rotary frequency scaling in a GGUF file (tensor "
                                  "rope_freqs or llama.rope.scaling.*) is not read; load the "
                                  "Hugging Face checkpoint directory instead.")
    layers = int(_field(reader, "llama.block_count"))
    config = LlamaConfig(
        vocab_size=int(_tensor(tensors, "token_embd.weight", path).shape[1]),  # ne order
        hidden_size=width, num_layers=layers, num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim, intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=_decimal(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_decimal(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors, dtype=dtype)

    def read(name):
        t = _tensor(tensors, name, path)
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            raise NotImplementedError(f"{path}: tensor {name!r} has GGUF type {kind}, which is "
                                      f"not read (only {', '.join(GGUF_TYPES)}).")
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return w.reshape(tuple(int(n) for n in reversed(t.shape))).astype(np.float32)

    hf = {"model.embed_tokens.weight": read("token_embd.weight"),
          "model.norm.weight": read("output_norm.weight")}
    if not config.tie_word_embeddings:
        hf["lm_head.weight"] = read("output.weight")
    for i in range(layers):
        for name, short in GGUF_NAMES.items():
            hf[f"model.layers.{i}.{name}.weight"] = read(f"blk.{i}.{short}.weight")
        for name, n in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            hf[key] = half_split(hf[key], n)
    metadata = {k: _field(reader, k) for k in reader.fields if k.startswith("tokenizer.ggml.")}
    tokenizer = from_gguf_metadata(metadata, config.max_position_embeddings)
    name = _field(reader, "general.name", pathlib.Path(path).stem)
    return Loaded(Llama(config), params_from_tensors(hf, config, str(path)), tokenizer, name)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories.


def config_from_json(hf: dict, source: str, dtype: str = "float32") -> LlamaConfig:
    """The :class:`LlamaConfig` of a ``config.json`` (``model_type`` "llama")."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'llama' (only "
                         "the Llama architecture is ported).")
    rope = hf.get("rope_parameters") or {}  # newer transformers move rope_theta/rope_type here
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                         else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3"):
            raise NotImplementedError(f"{source}: rope_scaling of type {kind!r} is not "
                                      "implemented (only 'linear' and 'llama3').")
        scaling = RopeScaling(kind, float(scaling["factor"]),
                              float(scaling.get("low_freq_factor", 1.0)),
                              float(scaling.get("high_freq_factor", 4.0)),
                              int(scaling.get("original_max_position_embeddings", 8192)))
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=scaling, tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        dtype=dtype)


def _safetensors(folder: pathlib.Path) -> dict:
    """Every tensor of ``model.safetensors`` or of the shards its index lists, as numpy
    (bfloat16 through ml_dtypes)."""
    safetensors = require("safetensors.flax", SAFETENSORS_INSTALL)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard} is missing (listed in {index.name}).")
        tensors.update({k: np.asarray(v) for k, v in
                        safetensors.load_file(str(folder / shard)).items()})
    return tensors


def load_checkpoint(folder, dtype: str = "float32") -> Loaded:
    """A Llama from a Hugging Face checkpoint directory: ``config.json``, ``tokenizer.json``
    and ``model.safetensors`` (or ``model.safetensors.index.json`` and its shards)."""
    folder = pathlib.Path(folder)
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise FileNotFoundError(f"{folder} is not a checkpoint directory: missing "
                                f"{', '.join(missing)}.")
    hf = json.loads((folder / "config.json").read_text())
    config = config_from_json(hf, str(folder / "config.json"), dtype)
    params = params_from_tensors(_safetensors(folder), config, str(folder))
    pad = hf.get("pad_token_id")
    eos = hf.get("eos_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    tokenizer = from_file(folder / "tokenizer.json", config.max_position_embeddings, pad)
    return Loaded(Llama(config), params, tokenizer, folder.name)


def save_checkpoint(loaded: Loaded, folder) -> pathlib.Path:
    """Writes ``loaded`` as a Hugging Face checkpoint directory (float32 ``model.safetensors``
    with the half-split query/key rows, ``config.json``, ``tokenizer.json``) that
    :func:`load_checkpoint` (and transformers) read."""
    safetensors = require("safetensors.numpy", SAFETENSORS_INSTALL)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = loaded.config
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
              "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
              "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
              "intermediate_size": c.intermediate_size,
              "max_position_embeddings": c.max_position_embeddings,
              "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
              "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
              "mlp_bias": c.mlp_bias, "hidden_act": "silu", "torch_dtype": "float32",
              "pad_token_id": loaded.tokenizer.pad_id}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        config["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor,
                                  "low_freq_factor": s.low_freq_factor,
                                  "high_freq_factor": s.high_freq_factor,
                                  "original_max_position_embeddings":
                                      s.original_max_position_embeddings}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.save_file(tensors_from_params(loaded.params, c),
                          str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded.tokenizer.backend.no_truncation()
    loaded.tokenizer.backend.save(str(folder / "tokenizer.json"))
    return folder
