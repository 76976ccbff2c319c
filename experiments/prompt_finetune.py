r"""Few-shot fine-tuning the way it works: a prompt and a verbalizer scored by a causal LM's head
(MeZO's setting, the flat-minima paper's Figure 3), against zero-shot, calibrated zero-shot and
MeZO's no-prompt ablation, on SmolLM2-135M.

Each sentence is wrapped in its task's template and scored by the label words' logits at the
template's next position (:mod:`experiments.prompt_tasks`: the templates and label words, the
loss, the metrics, the calibration). MeZO's causal template for sentiment is "{x} It was";
LM-BFF's TREC template puts the label word *before* the question, which a causal LM cannot score
at the next position, so the question comes first and "Answer type:" asks for the word
(``config.template`` and ``config.verbalizer`` override both; a word the tokenizer splits is an
error naming it).

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

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import runner, text_tasks

# The task code's names stay importable from here (this module's public names before the split).
from experiments.prompt_tasks import (  # noqa: F401
    HEADS,
    MODELS,
    TASKS,
    TEMPLATES,
    Scorer,
    batch_loss,
    calibration,
    load_model,
    metrics,
    problems,
    template_of,
    token_ids,
)

NAME = "prompt_finetune"
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
