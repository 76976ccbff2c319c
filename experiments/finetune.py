r"""Few-shot fine-tuning of all-MiniLM-L6-v2 on SST-2, SST-5 and TREC: GD vs ZO vs ZEST, with
the expected-sharpness trace (the paper's Figure 3, on CPU).

A linear classification head sits on the mean-pooled, L2-normalized sentence embedding. The
checkpoint has no masked-LM head, so the paper's prompt-based head (a verbalizer over MLM logits)
is not possible here. The head starts from a linear probe on the frozen embeddings
(scikit-learn's logistic regression, ``C = config.probe_c``). Then the whole model is
fine-tuned: every encoder parameter, the word embeddings included, and the head. Methods:

- ``sgd`` and ``adam``: backprop (``jax.grad``) with optax's SGD or Adam;
- ``zo``: ``zojax.zo_sgd`` with MeZO's settings (central differences, one direction,
  λ = 1e-3, ``chunk_size=1``: the direction is regenerated, never stored);
- ``zest``: ``zojax.zest`` (t = 1 by default) on one antithetic pair: the same two loss
  queries a step as ``zo``.

Minibatches of ``batch_size`` (16) rows, float32. At every evaluation the program records the
training loss and accuracy on the whole few-shot train set, the test loss and accuracy, and
three curvature measures on a fixed training batch (the first ``batch_size`` rows of a
``data_seed`` permutation):

- ``zo_trace`` (± ``zo_trace_stderr``): ``zojax.zo_trace``, the paper's zeroth-order "expected
  sharpness" 2(mean f(x ± δz) − f(x))/δ² over ``zo_trace.num_samples`` antithetic Gaussian pairs
  on all parameters. The paper's δ = 1e-4 moves a float32 loss of about 0.5 by less than its
  resolution, so δ = ``zo_trace.delta`` = 1e-2 (16 pairs, 33 forward passes) is used. It is the
  trace of the Hessian smoothed at that scale: an O(δ²) bias;
- ``head_hessian_trace``: the exact ``zojax.hessian_trace`` over the head's parameters (770 for
  two classes), with the embeddings held fixed;
- ``last_layer_trace`` (± ``last_layer_trace_stderr``): ``zojax.hutchinson_trace`` over the
  last encoder layer's parameters (1.8M in all-MiniLM-L6-v2), ``hutchinson_samples``
  Rademacher probes, the lower layers held fixed.

Data (``config.data_dir``, else ``$ZOJAX_DATA_DIR``, else ``~/.cache/zojax``, holding ``text/``):
the LM-BFF 16-shot splits under ``text/k-shot/`` (``config.split``, default 16-42), or, with
``split=None``, K = ``config.k`` examples per class sampled with ``data_seed`` from the original
train file. The test set is used whole when it has at most 1,000 examples (SST-2 872, TREC 500),
otherwise 1,000 are sampled with ``data_seed`` (SST-5). Training and test inputs are cut and
padded to ``max_length`` = 64 tokens (covering every test sentence); :func:`embed` still
truncates at 256. ``task="synthetic"`` is an embedded two-class task of made-up reviews (one
sentiment word among filler words). With ``model="default"`` (the random 2-layer stand-in of
:func:`experiments.models.minilm.default`) it needs neither data nor the model package: the smoke
test.

    python -m experiments.finetune --config configs/finetune.py --config.data_dir=../shared/data \
        --workdir /tmp/zojax/finetune

The tasks, the model's loss and metrics and the problem are in :mod:`experiments.text_tasks`
(shared with :mod:`experiments.zo_bench`; their names are re-exported here). :func:`embed` gives
all-MiniLM-L6-v2's sentence embeddings (the model and its loading are in
:mod:`experiments.models.minilm`).
"""

import math

import numpy as np
from absl import logging

from experiments import runner
from experiments.text_tasks import (  # noqa: F401 (the tasks' names, re-exported)
    MAX_TEST,
    MODELS,
    NUM_CLASSES,
    SPLIT_K,
    SPLITS,
    TASKS,
    Curvature,
    Task,
    batch_loss,
    batched,
    embed,
    linear_probe,
    load_model,
    load_task,
    metrics,
    minilm,
    probe_accuracy,
    problem,
    read_rows,
    synthetic_task,
)

NAME = "finetune"
METHOD_NAMES = ("sgd", "adam", "zo", "zest")  # config.methods
LABELS = {"sgd": "GD (SGD)", "adam": "GD (Adam)", "zo": "ZO (MeZO)", "zest": "ZEST"}
GRADIENT_METHODS = ("sgd", "adam")  # run config.gd_steps; the others config.num_steps


# ---------------------------------------------------------------------------------------------
# The experiment.

METHODS = {"sgd": runner.method("sgd"), "adam": runner.method("adam"),
           "zo": runner.method("zo_sgd"), "zest": runner.method("zest")}


def _check_config(config, loaded: minilm.Loaded) -> None:
    runner.validate(config, runner.POSITIVE_FIELDS + (
        "gd_steps", "batch_size", "eval_batch_size", "max_length", "probe_c", "delta",
        "num_samples", "hutchinson_samples"))
    runner.check_choices(config, {"tasks": TASKS, "methods": METHOD_NAMES})
    if not 2 <= config.max_length <= loaded.tokenizer.max_length:
        raise runner.ConfigError(f"config.max_length must be in [2, "
                                 f"{loaded.tokenizer.max_length}], got {config.max_length!r}.")


def get_experiment(config) -> runner.Experiment:
    """Every method on every task, from one probed head per task."""
    loaded = load_model(config)
    _check_config(config, loaded)
    tasks = [load_task(name, config.k, config.split, config.data_dir, config.data_seed)
             for name in runner.as_tuple(config.tasks)]
    members = []
    for task in tasks:
        if config.batch_size > len(task.train_labels):
            raise runner.ConfigError(f"config.batch_size ({config.batch_size}) exceeds the "
                                     f"{len(task.train_labels)} training rows of {task.name}.")
        prob, labels = problem(config, task, loaded)
        logging.info("%s: linear probe test accuracy %.3f (%s)", task.name,
                     labels["probe_test_accuracy"], task.source)
        for method in runner.as_tuple(config.methods):
            steps = config.gd_steps if method in GRADIENT_METHODS else config.num_steps
            members += runner.sweep(method, config[method], prob, f"{task.name}/{method}",
                                    labels=labels, num_steps=steps)
    return runner.Experiment(NAME, members, plot=plot, summary=summary, methods=METHODS,
                             progress_metrics=("loss", "test_accuracy"))


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) the fine-tuning in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Tables and plots.

_COLORS = {"sgd": "C0", "adam": "C3", "zo": "C1", "zest": "C2"}
_PANELS = (("test_accuracy", "test accuracy", "linear"), ("loss", "train loss", "log"),
           ("zo_trace", "ZO trace (expected sharpness)", "symlog"),
           ("head_hessian_trace", "head Hessian trace", "log"),
           ("last_layer_trace", "last-layer trace (Hutchinson)", "symlog"))


def table(results: dict) -> str:
    """Markdown: per run, the probe's test accuracy, test accuracy and traces at the first and
    the last evaluation."""
    lines = ["| task | method | steps | probe | test accuracy (start → end) | train loss | "
             "ZO trace | head trace | last-layer trace |", "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        h = run["hparams"]

        def pair(metric, fmt=".3g", run=run):
            start, end = runner.metric_at(run, metric, 0), runner.metric_at(run, metric)
            return f"{start:{fmt}} → {end:{fmt}}"

        lines.append(f"| {h['task']} | {run['name'].split('/', 1)[1]} | {run['steps'][-1]} | "
                     f"{h['probe_test_accuracy']:.3f} | {pair('test_accuracy', '.3f')} | "
                     f"{pair('loss', '.3f')} | {pair('zo_trace')} | "
                     f"{pair('head_hessian_trace')} | {pair('last_layer_trace')} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    return f"{NAME}: few-shot fine-tuning, GD vs ZO vs ZEST\n{table(results)}"


def plot(results: dict):
    """Rows: tasks; columns: test accuracy, train loss and the three traces against steps."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    runs = results["runs"]
    tasks = list(dict.fromkeys(r["hparams"]["task"] for r in runs))
    figure = Figure(figsize=(3.2 * len(_PANELS), 2.6 * len(tasks) + 0.4), layout="constrained")
    axes = figure.subplots(len(tasks), len(_PANELS), squeeze=False)
    for run in runs:
        row = axes[tasks.index(run["hparams"]["task"])]
        for ax, (metric, _, _) in zip(row, _PANELS):
            values = np.asarray([math.nan if v is None else v
                                 for v in run["metrics"].get(metric, [])], float)
            if values.size:
                ax.plot(run["steps"], values, "o-", ms=3, lw=1, color=_COLORS[run["method"]],
                        label=LABELS[run["method"]] + run["name"].split(run["method"], 1)[1])
    for i, task in enumerate(tasks):
        for ax, (_, title, scale) in zip(axes[i], _PANELS):
            ax.set(title=f"{task}: {title}", xlabel="step", yscale=scale)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small")
    return figure


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
