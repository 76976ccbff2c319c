"""Byte-level BPE tokenizers (``tokenizers``): from a GGUF file's vocabulary, from a checkpoint's
``tokenizer.json``, and the embedded default's small vocabulary.

Each encodes with its checkpoint's own rule for special tokens (SmolLM2 adds none; a
``tokenizer.json`` with a post-processor, e.g. Llama 3's beginning-of-text token, adds its own)
and truncates from the start of the text.
"""

import dataclasses
import importlib
import importlib.util

import numpy as np

# The pre-tokenizers of llama.cpp's byte-level vocabularies that are rebuilt here: GPT-2's
# split (contractions, letters, digits, punctuation, spaces), and SmolLM2's, which first
# splits every digit alone (as its tokenizer.json does).
GGUF_PRE_TOKENIZERS = ("smollm", "gpt-2")
_CONTROL = 3  # llama.cpp's token type of special (control) tokens


def require(module: str, install: str):
    """``importlib.import_module(module)``, or ModuleNotFoundError saying to ``pip install``."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise ModuleNotFoundError(f"{module} is needed to load a Llama model: {install}")
    return importlib.import_module(module)


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """``tokenizer.encode(texts) -> list of id lists`` and ``tokenizer(texts, length=None) ->
    (ids, mask)``, int32 (n, length), padded on the right.

    Texts longer than ``max_length`` tokens (the context), or than ``length``, are truncated
    **from the start**: the end of a text survives, so a prompt template appended to it (e.g.
    "{x} It was") is kept whole. Special tokens the checkpoint adds (a beginning-of-text token)
    are kept too.
    """

    backend: object  # a tokenizers.Tokenizer
    max_length: int  # the model's context
    pad_id: int = 0  # the id of padded positions (masked out)

    def encode(self, texts, max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, at most ``max_length`` (default: the context) kept from the
        end."""
        if isinstance(texts, str) or not len(texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}.")
        self.backend.enable_truncation(max_length or self.max_length, direction="left")
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def __call__(self, texts, length: int | None = None):
        """``(ids, mask)``, int32 (n, width): width is ``length``, or the longest row when
        None; rows padded on the right with ``pad_id`` (mask 0), truncated from the start."""
        if length is not None and not 1 <= length <= self.max_length:
            raise ValueError(f"length must be None or in [1, {self.max_length}], got {length}.")
        rows = self.encode(texts, length)
        width = length or max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    def token_ids(self, words) -> list[int]:
        """The id of each word (e.g. " great"), which must be a single token (an error names
        the first that is not): the label words of a verbalizer."""
        ids = []
        for word in words:
            encoded = self.backend.encode(word, add_special_tokens=False).ids
            if len(encoded) != 1:
                raise ValueError(f"{word!r} is not one token: {len(encoded)} tokens "
                                 f"{self.backend.encode(word, add_special_tokens=False).tokens}.")
            ids.append(encoded[0])
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def byte_level(vocab: dict, merges: list, special: list, digits: bool, max_length: int,
               pad_id: int) -> Tokenizer:
    """A byte-level BPE :class:`Tokenizer` (GPT-2's split, every digit alone with ``digits``;
    no prefix space) of ``vocab`` {token: id}, ``merges`` [(left, right)] in rank order and
    the ``special`` tokens (never split, skipped by nothing)."""
    tk = require("tokenizers", "pip install tokenizers")
    backend = tk.Tokenizer(tk.models.BPE(vocab, merges))
    split = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True), split]) if digits else split)
    backend.decoder = tk.decoders.ByteLevel()
    backend.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t in special])
    return Tokenizer(backend, max_length, pad_id)


def from_gguf_metadata(fields: dict, max_length: int) -> Tokenizer:
    """The tokenizer of a GGUF file's ``tokenizer.ggml.*`` fields (``fields``: name → value):
    model "gpt2" (byte-level BPE) with a pre-tokenizer of :data:`GGUF_PRE_TOKENIZERS`; a
    beginning-of-text token when ``add_bos_token`` says so."""
    model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2" or pre not in GGUF_PRE_TOKENIZERS:
        raise NotImplementedError(
            f"the GGUF tokenizer model {model!r} with pre-tokenizer {pre!r} is not supported (only "
            f"byte-level BPE 'gpt2' with {GGUF_PRE_TOKENIZERS}); load the model from a Hugging "
            "Face checkpoint directory instead (its tokenizer.json is read as it is).")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    special = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
    eos = fields.get("tokenizer.ggml.eos_token_id", 0)
    tokenizer = byte_level({t: i for i, t in enumerate(tokens)}, merges, special,
                           pre == "smollm", max_length,
                           int(fields.get("tokenizer.ggml.padding_token_id", eos)))
    if fields.get("tokenizer.ggml.add_bos_token", False):
        tk = require("tokenizers", "pip install tokenizers")
        bos = tokens[fields["tokenizer.ggml.bos_token_id"]]
        tokenizer.backend.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, fields["tokenizer.ggml.bos_token_id"])])
    return tokenizer


def from_file(path, max_length: int, pad_id: int | None = None) -> Tokenizer:
    """The tokenizer of a ``tokenizer.json`` as it is (its normalizer, pre-tokenizer and
    post-processor); its padding is turned off (:class:`Tokenizer` pads)."""
    tk = require("tokenizers", "pip install tokenizers")
    backend = tk.Tokenizer.from_file(str(path))
    backend.no_padding()
    return Tokenizer(backend, max_length, 0 if pad_id is None else pad_id)


def _byte_alphabet() -> list[str]:
    """The 256 characters that stand for the bytes 0..255 in byte-level BPE (GPT-2's table:
    printable bytes are themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# The embedded default's whole words (each one token, after a space): MeZO's and LM-BFF's
# templates and label words, and a few common words.
DEFAULT_WORDS = (
    "It was great terrible good bad okay Description Entity Expression Human Location Number "
    "Answer type the a an movie film is and of to not very this that it I you he she they we "
    "in on with for as but what who where when how why").split()
DEFAULT_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def default_tokenizer(max_length: int) -> Tokenizer:
    """A small byte-level BPE (needs no file): the special tokens of SmolLM2 (ids 0, 1, 2), the
    256 bytes, and merges that make each of :data:`DEFAULT_WORDS` after a space (" great") one
    token; any other text falls back to fewer merges or bytes."""
    alphabet = _byte_alphabet()
    vocab = {t: i for i, t in enumerate([*DEFAULT_SPECIAL, *alphabet])}
    merges = []
    for word in DEFAULT_WORDS:  # merges grow each word from its space: ("Ġ", "g"), ("Ġg", "r")
        token = alphabet[ord(" ")]
        for char in word:
            if token + char not in vocab:
                merges.append((token, char))
                vocab[token + char] = len(vocab)
            token += char
    return byte_level(vocab, merges, list(DEFAULT_SPECIAL), True, max_length, 2)
