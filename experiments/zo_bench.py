r"""A ZO-Bench-style table: 12 methods at equal query budgets on logistic regression and on the
few-shot fine-tuning of all-MiniLM-L6-v2 (``configs/zo_bench.py`` describes the setup).

Methods (``config.methods``): first-order SGD and Adam (``jax.grad``), ZO-SGD, ZO-Adam and
ZO-sign (``zojax.zo_sgd``, ``zo_adam``, ``zo_sign_sgd``), the forward gradient (a jvp per
step), ZEST (``zojax.zest``, one ± pair) and the literature's stages of :mod:`zojax.variants`,
each chained with ``optax.sgd``: HiZOO, LOZO, Sparse-MeZO, FZOO and ZO-SVRG (its large batch,
the whole training set, given by the problem's extra update arguments). Each member runs
``query_budget // queries_per_step`` steps (ZO-SVRG: an average over its snapshot period),
so every method makes about the same number of objective evaluations. Recorded per member:
the metrics against steps and queries (results.json's ``num_queries``), the execution time
per step and, as a label, the compiled memory of one step (argument + output + temp − alias,
params and state donated).

    python -m experiments.zo_bench --config configs/zo_bench.py --config.data_dir=DATA_DIR \
        --workdir /tmp/zojax/zo_bench
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import zojax
from experiments import runner, text_tasks

NAME = "zo_bench"
PROBLEMS = ("logistic", "minilm")  # config.problems
LABELS = {"fo_sgd": "FO-SGD", "fo_adam": "FO-Adam", "zo_sgd": "ZO-SGD (MeZO)",
          "zo_adam": "ZO-Adam", "zo_sign": "ZO-sign", "forward_grad": "forward gradient",
          "zest": "ZEST", "hizoo": "HiZOO", "lozo": "LOZO", "sparse_mezo": "Sparse-MeZO",
          "fzoo": "FZOO", "zo_svrg": "ZO-SVRG"}
FIRST_ORDER = ("fo_sgd", "fo_adam")  # deterministic given the batches: seed 0 only


# ---------------------------------------------------------------------------------------------
# Methods: the runner's registry, one direction at a time (chunk_size=1: MeZO's memory); the
# estimators are chained with optax.sgd.

METHODS = {
    "fo_sgd": runner.method("sgd"),
    "fo_adam": runner.method("adam"),
    "zo_sgd": runner.method("zo_sgd", chunk_size=1),
    "zo_adam": runner.method("zo_adam", chunk_size=1),
    "zo_sign": runner.method("zo_sign_sgd", chunk_size=1),
    "forward_grad": runner.method("forward_gradient"),
    "zest": runner.method("zest", chunk_size=1),
    "hizoo": runner.method("hizoo", chunk_size=1),
    "lozo": runner.method("lozo", chunk_size=1),
    "sparse_mezo": runner.method("sparse_two_point", chunk_size=1),
    "fzoo": runner.method("fzoo", chunk_size=1),
    "zo_svrg": runner.method("zo_svrg", chunk_size=1),
}


# ---------------------------------------------------------------------------------------------
# Problems (module-level functions: the runner caches programs on them).


def _logits(params, inputs):
    return inputs @ params["w"] + params["b"]


def _cross_entropy(params, inputs, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_logits(params, inputs),
                                                                    labels))


def logistic_loss(params, batch, full):
    del full  # the large batch of ZO-SVRG (extra_args)
    return _cross_entropy(params, *batch)


def logistic_extra_args(batch, full):
    del batch
    return {"full_value_fn": lambda params: _cross_entropy(params, *full)}


def logistic_metrics(params, train_inputs, train_labels, test_inputs, test_labels):
    def accuracy(inputs, labels):
        return jnp.mean(jnp.argmax(_logits(params, inputs), -1) == labels)

    return {"loss": _cross_entropy(params, train_inputs, train_labels),
            "train_accuracy": accuracy(train_inputs, train_labels),
            "test_loss": _cross_entropy(params, test_inputs, test_labels),
            "test_accuracy": accuracy(test_inputs, test_labels)}


def logistic_problem(config) -> tuple[runner.Problem, dict]:
    """Multinomial logistic regression on a LIBSVM dataset's raw inputs, two classes."""
    name = config.logistic.dataset
    if name.startswith("synthetic-"):
        data = zojax.datasets.synthetic_libsvm(0, like=name.partition("-")[2])
    else:
        try:
            data = zojax.datasets.load_libsvm(name, data_dir=config.data_dir)
        except FileNotFoundError as error:
            raise runner.ConfigError(f"config.logistic.dataset: {error}") from None
    train = (jnp.asarray(data.train_inputs), jnp.asarray(data.train_labels > 0, jnp.int32))
    test = (jnp.asarray(data.test_inputs), jnp.asarray(data.test_labels > 0, jnp.int32))
    if config.logistic.batch_size > train[0].shape[0]:
        raise runner.ConfigError(f"config.logistic.batch_size ({config.logistic.batch_size}) "
                                 f"exceeds the {train[0].shape[0]} training rows.")
    w_key, b_key = jax.random.split(jax.random.key(config.data_seed))
    scale = config.logistic.init_scale
    params = {"w": scale * jax.random.normal(w_key, (train[0].shape[1], 2)),
              "b": scale * jax.random.normal(b_key, (2,))}
    problem = runner.Problem(
        logistic_loss, logistic_metrics, params, (train,),
        batch_fn=runner.Minibatches(train, config.logistic.batch_size), eval_data=(*train, *test),
        extra_args=logistic_extra_args, name=name)
    return problem, {"dataset": name, "params": zojax.directions.num_params(params),
                     "num_train": int(train[0].shape[0]), "num_test": int(test[0].shape[0])}


def minilm_loss(params, batch, model, full):
    del full
    return text_tasks.batch_loss(params, batch, model)


def minilm_extra_args(batch, model, full):
    del batch
    return {"full_value_fn": lambda params: text_tasks.batch_loss(params, full, model)}


def minilm_problem(config) -> tuple[runner.Problem, dict]:
    """The fine-tuning experiment's problem (its probed head), the whole train set as ZO-SVRG's
    large batch."""
    fields = ml_collections.ConfigDict({**config.minilm.to_dict(),
                                        "data_seed": config.data_seed})
    loaded = text_tasks.load_model(fields)
    task = text_tasks.load_task(fields.task, fields.k, fields.split, config.data_dir,
                              config.data_seed)
    if fields.batch_size > len(task.train_labels):
        raise runner.ConfigError(f"config.minilm.batch_size ({fields.batch_size}) exceeds the "
                                 f"{len(task.train_labels)} training rows of {task.name}.")
    problem, labels = text_tasks.problem(fields, task, loaded)
    full = problem.batch_fn.arrays
    problem = dataclasses.replace(problem, loss=minilm_loss, data=(*problem.data, full),
                                  extra_args=minilm_extra_args)
    return problem, labels


# ---------------------------------------------------------------------------------------------
# The experiment.


def _check_config(config) -> None:
    runner.validate(config, runner.POSITIVE_FIELDS + (
        "query_budget", "batch_size", "eval_batch_size", "max_length", "probe_c", "rank",
        "refresh_every", "snapshot_every", "init_scale"))
    runner.check_choices(config, {"problems": PROBLEMS, "methods": tuple(METHODS),
                                  "seeds": None})


def get_experiment(config) -> runner.Experiment:
    """Every method on every problem, for every seed (first-order: seed 0), at the problem's
    query budget."""
    _check_config(config)
    builders = {"logistic": logistic_problem, "minilm": minilm_problem}
    members = []
    for name in runner.as_tuple(config.problems):
        problem, labels = builders[name](config)
        budget = config[name].query_budget
        for method in runner.as_tuple(config.methods):
            fields = config[name].hparams[method].to_dict()
            spec = METHODS[method]
            steps = max(1, int(budget // spec.queries_per_step(fields)))
            memory = runner.step_memory(spec, fields, problem,
                                         problem.batch_fn(jax.random.key(0), 0))
            seeds = (0,) if method in FIRST_ORDER else runner.as_tuple(config.seeds)
            for seed in seeds:
                members += runner.sweep(
                    method, {**fields, "seed": seed}, problem,
                    f"{name}/{method}" + (f"/seed={seed}" if len(seeds) > 1 else ""),
                    labels={**labels, "problem": name, "query_budget": budget,
                            "step_memory_bytes": memory}, num_steps=steps)
    return runner.Experiment(NAME, members, plot=plot, summary=summary, methods=METHODS,
                             progress_metrics=("loss", "test_accuracy"))


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) the comparison in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Tables and plots.


def rows(results: dict) -> list[dict]:
    """Per (problem, method): the seeds' final test accuracy (mean, std), train loss, queries,
    steps, ms per step and step memory."""
    grouped = {}
    for run in results["runs"]:
        grouped.setdefault((run["hparams"]["problem"], run["method"]), []).append(run)
    out = []
    for (problem, method), runs in grouped.items():
        accuracy = np.array([runner.metric_at(r, "test_accuracy") for r in runs])
        steps = runs[0]["steps"][-1]
        queries = runs[0]["num_queries"][-1]
        out.append({
            "problem": problem, "method": method, "seeds": len(runs), "steps": steps,
            "queries": queries, "test_accuracy": float(np.mean(accuracy)),
            "test_accuracy_std": float(np.std(accuracy)),
            "start_accuracy": runs[0]["metrics"]["test_accuracy"][0],
            "loss": float(np.mean([runner.metric_at(r, "loss") for r in runs])),
            # Seeds in one program share its time: each distinct time once, over all their steps.
            "ms_per_step": 1e3 * sum({r["wall_seconds"] for r in runs}) / max(steps, 1)
            / len(runs),
            "memory_mb": runs[0]["hparams"]["step_memory_bytes"] / 1e6})
    return out


def table(results: dict) -> str:
    lines = ["| problem | method | seeds | steps | queries | test accuracy (start → end) | "
             "train loss | ms / step | step memory (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows(results):
        lines.append(
            f"| {r['problem']} | {LABELS[r['method']]} | {r['seeds']} | {r['steps']} | "
            f"{r['queries']} | {r['start_accuracy']:.3f} → {r['test_accuracy']:.3f} ± "
            f"{r['test_accuracy_std']:.3f} | {r['loss']:.4f} | {r['ms_per_step']:.1f} | "
            f"{r['memory_mb']:.3g} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    return f"{NAME}: 12 methods at equal query budgets\n{table(results)}"


def plot(results: dict):
    """Per problem: test accuracy against queries, and final accuracy against step memory."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    problems = list(dict.fromkeys(r["hparams"]["problem"] for r in results["runs"]))
    figure = Figure(figsize=(10, 3.4 * len(problems)), layout="constrained")
    axes = figure.subplots(len(problems), 2, squeeze=False)
    colors = {m: f"C{i % 10}" for i, m in enumerate(METHODS)}
    styles = {m: ("-" if i < 10 else "--") for i, m in enumerate(METHODS)}
    for run in results["runs"]:
        ax = axes[problems.index(run["hparams"]["problem"]), 0]
        accuracy = [math.nan if v is None else v for v in run["metrics"]["test_accuracy"]]
        queries = [math.nan if q is None else q for q in run["num_queries"]]
        first = run["name"].endswith("seed=0") or "seed=" not in run["name"]
        ax.plot(queries, accuracy, styles[run["method"]], color=colors[run["method"]], lw=1,
                label=LABELS[run["method"]] if first else None)
    for r in rows(results):
        ax = axes[problems.index(r["problem"]), 1]
        ax.errorbar(r["memory_mb"], r["test_accuracy"], yerr=r["test_accuracy_std"], fmt="o",
                    color=colors[r["method"]])
        ax.annotate(LABELS[r["method"]], (r["memory_mb"], r["test_accuracy"]), fontsize=6)
    for i, problem in enumerate(problems):
        axes[i, 0].set(title=f"{problem}: test accuracy", xlabel="queries (objective evaluations)")
        axes[i, 1].set(title=f"{problem}: final accuracy vs step memory",
                       xlabel="compiled step memory (MB)", ylabel="test accuracy")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small", ncol=2)
    return figure


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)

