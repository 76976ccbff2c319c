r"""ZO-I vs ZO-coordinate vs ZO-NP (natural perturbations) at equal query budgets.

Every method perturbs one block of the flattened parameters per step, with Q perturbations and
one-sided differences from one shared f(x) (Q + 1 loss queries a step), and steps with Adam:

- ``zo_i``: ``zojax.block_two_point(direction="gaussian")``, δθ = r ~ N(0, I) on the block;
- ``zo_co``: ``zojax.block_two_point(direction="coordinate")``, one-hot √N_b e_j;
- ``zo_np``: ``zojax.natural``, δθ = L_b r with L_b L_bᵀ = (1 + ρ)(F_b + ρI)⁻¹, the block's Fisher
  refreshed every ``update_every`` steps from zeroth-order Jacobians of the logits of the first
  ``fisher_inputs`` rows of the minibatch: (N_b + 1)·fisher_inputs output queries a refresh.

A member's budget is ``query_budget`` queries, Jacobian probes included, so ZO-NP runs fewer
steps (:func:`num_steps`); the recorded ``num_queries`` are the optimizer state's counts. Each
(dataset, model, method, Q) runs its seeds vmapped in one program. Metrics at every evaluation:
loss and accuracy on (a fixed subset of) the train set and on the test set; every run's labels
hold the compiled peak memory of one step (``peak_memory_bytes``, argument + output + temp −
alias, state donated).

    python -m experiments.natural_perturbations --config configs/natural_perturbations.py \
        --workdir /tmp/zojax/natural_perturbations
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import zojax
from experiments import runner
from experiments.models import CNN, MLP, MLPMixer, accuracy, cross_entropy, digits_data, logits

NAME = "natural_perturbations"
DATASETS = ("digits", "mnist", "fashion_mnist")  # config.datasets
MODELS = ("cnn", "mlp", "mixer")  # config.models
METHOD_NAMES = ("zo_i", "zo_co", "zo_np")  # config.methods
LABELS = {"zo_i": "ZO-I", "zo_co": "ZO-co", "zo_np": "ZO-NP"}


# ---------------------------------------------------------------------------------------------
# Methods: the runner's registry, each estimator chained with Adam.

_NATURAL = ("damping", "ema", "update_every", "fisher_inputs", "jacobian", "max_fisher_blocks")
METHODS = {
    "zo_i": runner.method("block_two_point", step="adam", direction="gaussian"),
    "zo_co": runner.method("block_two_point", step="adam", direction="coordinate"),
    "zo_np": runner.method("natural", step="adam"),
}


def refresh_queries(hparams) -> int:
    """Output queries of one Fisher refresh of a full block: (N + 1) calls of fisher_inputs rows
    (``"autodiff"``: one call)."""
    calls = hparams["max_block_size"] + 1 if hparams["jacobian"] == "zeroth_order" else 1
    return calls * hparams["fisher_inputs"]


def num_steps(method: str, hparams, budget: int) -> int:
    """The steps of a member within ``budget`` queries: ``budget // (Q + 1)``; for ZO-NP the
    largest T with T·(Q + 1) + ⌈T / update_every⌉·(refresh queries) <= budget (full blocks:
    the last, shorter block costs less, so the count recorded may stay below the budget)."""
    per_step = METHODS[method].queries_per_step(hparams)
    if method != "zo_np":
        return budget // per_step
    every, refresh = hparams["update_every"], refresh_queries(hparams)
    cycles, rest = divmod(budget, every * per_step + refresh)
    return cycles * every + max(0, min(every, (rest - refresh) // per_step))


# ---------------------------------------------------------------------------------------------
# Problems.


def load(config, name: str):
    """``((x_train, y_train), (x_test, y_test))`` of a dataset: digits (8×8, an 80/20 split),
    MNIST or FashionMNIST (28×28, from IDX files under ``config.data_dir``)."""
    if name == "digits":
        x, y, x_test, y_test = digits_data(config.data_seed)
        return (x.reshape(-1, 8, 8), y), (x_test.reshape(-1, 8, 8), y_test)
    (x, y), (x_test, y_test) = zojax.datasets.load_idx(name, config.data_dir)
    return (jnp.asarray(x), jnp.asarray(y)), (jnp.asarray(x_test), jnp.asarray(y_test))


def build_model(config, name: str, image_size: int):
    fields = config[name]
    if name == "cnn":
        return CNN(tuple(fields.features))
    if name == "mlp":
        return MLP(tuple(fields.hidden))
    return MLPMixer(10, fields.patch_size if image_size % fields.patch_size == 0 else 1,
                    fields.hidden_dim, fields.tokens_mlp_dim, fields.channels_mlp_dim,
                    fields.depth)


def _batch_loss(params, batch, model):
    return cross_entropy(params, model, *batch)


def _metrics(params, model, x, y, x_test, y_test):
    return {"loss": cross_entropy(params, model, x, y), "train_accuracy": accuracy(
        params, model, x, y), "test_loss": cross_entropy(params, model, x_test, y_test),
        "test_accuracy": accuracy(params, model, x_test, y_test)}


def _fisher_outputs(rows: int):
    """``extra_args(batch, model)``: the logits of the batch's first ``rows`` inputs."""
    def extra_args(batch, model):
        return {"output_fn": lambda p: logits(p, model, batch[0][:rows])}

    return extra_args


def problem(config, dataset: str, model_name: str):
    """The :class:`runner.Problem` of a model on a dataset, its model and its example batch."""
    (x, y), (x_test, y_test) = load(config, dataset)
    model = build_model(config, model_name, x.shape[1])
    params = model.init(jax.random.key(config.init_seed), x[:1])["params"]
    subset = min(len(y), config.metrics_train_rows)
    return runner.Problem(
        _batch_loss, _metrics, params, (model,),
        batch_fn=runner.Minibatches((x, y), config.batch_size),
        eval_data=(model, x[:subset], y[:subset], x_test, y_test),
        extra_args=_fisher_outputs(config.zo_np.fisher_inputs),
        name=f"{dataset}/{model_name}"), (x[:config.batch_size], y[:config.batch_size])


def peak_memory(method: runner.Method, hparams, problem: runner.Problem, batch) -> int:
    """argument + output + temp − alias bytes of one compiled step, optimizer state donated
    (:func:`runner.step_memory`)."""
    return runner.step_memory(method, hparams, problem, batch, donate_params=False)


# ---------------------------------------------------------------------------------------------
# The experiment.


def _check_config(config) -> None:
    """ConfigError naming the field before anything is built."""
    runner.validate(config, runner.POSITIVE_FIELDS + (
        "query_budget", "batch_size", "max_block_size", "damping", "ema", "update_every",
        "fisher_inputs", "metrics_train_rows"))
    runner.check_choices(config, {"datasets": DATASETS, "models": MODELS,
                                  "methods": METHOD_NAMES, "num_perturbations": None})
    for q in runner.as_tuple(config.num_perturbations):
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise runner.ConfigError(f"config.num_perturbations must be ints >= 1 (Q, the "
                                     f"perturbations per step), got {config.num_perturbations!r}.")
    if not 0 < config.zo_np.ema <= 1:
        raise runner.ConfigError(f"config.zo_np.ema must be in (0, 1], got {config.zo_np.ema!r}.")
    if config.zo_np.jacobian not in zojax.blocks.JACOBIANS:
        raise runner.ConfigError(f"config.zo_np.jacobian must be one of "
                                 f"{zojax.blocks.JACOBIANS}, got {config.zo_np.jacobian!r}.")
    if config.zo_np.fisher_inputs > config.batch_size:
        raise runner.ConfigError(f"config.zo_np.fisher_inputs ({config.zo_np.fisher_inputs}) "
                                 f"exceeds config.batch_size ({config.batch_size}): the Fisher "
                                 "takes its rows from the minibatch.")


def _hparams(config, method: str, q: int) -> dict:
    shared = {"learning_rate": config.learning_rate, "smoothing": config.smoothing,
              "num_directions": q, "max_block_size": config.max_block_size,
              "seed": tuple(runner.as_tuple(config.seeds))}
    if method != "zo_np":
        return shared
    return {**shared, **{k: config.zo_np[k] for k in _NATURAL if config.zo_np.get(k) is not None}}


def _check_budget(config) -> None:
    for method in runner.as_tuple(config.methods):
        for q in runner.as_tuple(config.num_perturbations):
            hparams = _hparams(config, method, q)
            if num_steps(method, hparams, config.query_budget) < 1:
                raise runner.ConfigError(
                    f"config.query_budget ({config.query_budget:,}) is below one step of "
                    f"{method} at Q = {q} ({METHODS[method].queries_per_step(hparams)} loss queries"
                    + (f" + {refresh_queries(hparams):,} for the first Fisher refresh"
                       if method == "zo_np" else "") + ").")


def get_experiment(config) -> runner.Experiment:
    """Every method at every Q on every (dataset, model), each within ``config.query_budget``."""
    _check_config(config)
    _check_budget(config)
    members = []
    for dataset in runner.as_tuple(config.datasets):
        try:
            loaded = [problem(config, dataset, m) for m in runner.as_tuple(config.models)]
        except FileNotFoundError as error:
            if dataset == "digits" or not config.skip_missing:
                raise runner.ConfigError(f"config.datasets: {error}") from error
            logging.warning("skipping %s (config.skip_missing): %s", dataset, error)
            continue
        for model_name, (prob, batch) in zip(runner.as_tuple(config.models), loaded):
            for method in runner.as_tuple(config.methods):
                for q in runner.as_tuple(config.num_perturbations):
                    hparams = _hparams(config, method, q)
                    steps = num_steps(method, hparams, config.query_budget)
                    one = {k: v[0] if isinstance(v, tuple) else v for k, v in hparams.items()}
                    labels = {"dataset": dataset, "model": model_name,
                              "params": zojax.directions.num_params(prob.init_params),
                              "peak_memory_bytes": peak_memory(METHODS[method], one, prob,
                                                               batch)}
                    members += runner.sweep(method, hparams, prob,
                                            f"{dataset}/{model_name}/{method}/Q={q}",
                                            labels=labels, num_steps=steps)
    if not members:
        raise runner.ConfigError("config.datasets: none of the datasets is available.")
    return runner.Experiment(NAME, members, plot=plot, summary=summary, methods=METHODS,
                             progress_metrics=("loss", "test_accuracy"))


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) the comparison in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Tables and plots.


def _final(run, metric):
    values = run["metrics"].get(metric)
    return None if not values or values[-1] is None else values[-1]


def groups(results: dict) -> dict:
    """``{(dataset, model, Q): {method: [final test accuracy of each seed]}}``."""
    out: dict = {}
    for run in results["runs"]:
        h = run["hparams"]
        key = (h["dataset"], h["model"], h["num_directions"])
        out.setdefault(key, {}).setdefault(run["method"], []).append(
            _final(run, "test_accuracy"))
    return out


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and standard error over seeds (NaN for a diverged one)."""
    values = np.asarray([np.nan if v is None else v for v in values], float)
    n = len(values)
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def table(results: dict) -> str:
    """Markdown: per (dataset, model, Q), the final test accuracy (mean ± SE over seeds) of each
    method and ZO-NP − ZO-I with its standard error."""
    methods = [m for m in METHOD_NAMES if any(m in g for g in groups(results).values())]
    lines = ["| dataset | model | Q | " + " | ".join(LABELS[m] for m in methods)
             + " | ZO-NP − ZO-I |", "|---|---|---|" + "---|" * (len(methods) + 1)]
    for (dataset, model, q), by_method in groups(results).items():
        cells = []
        for m in methods:
            mean, se = mean_and_stderr(by_method.get(m, [None]))
            cells.append(f"{mean:.3f} ± {se:.3f}")
        diff = "–"
        if "zo_np" in by_method and "zo_i" in by_method:
            a, b = (np.asarray(by_method[m], float) for m in ("zo_np", "zo_i"))
            d = a - b if len(a) == len(b) else np.asarray([a.mean() - b.mean()])
            diff = f"{d.mean():+.3f} ± {d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0:.3f}"
        lines.append(f"| {dataset} | {model} | {q} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    return f"{NAME}: final test accuracy at equal query budgets\n{table(results)}"


def plot(results: dict) -> dict:
    """``""``: test accuracy vs queries (rows: dataset/model, columns: Q); ``"_q_sweep"``: final
    test accuracy vs Q; ``"_wall_time"``: training loss vs wall time."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    runs = results["runs"]
    rows = sorted({(r["hparams"]["dataset"], r["hparams"]["model"]) for r in runs})
    qs = sorted({r["hparams"]["num_directions"] for r in runs})
    colors = {"zo_i": "C0", "zo_co": "C1", "zo_np": "C2"}
    figures = {}

    figure = Figure(figsize=(2.6 * len(qs) + 0.6, 2.4 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), len(qs), squeeze=False, sharey="row")
    for run in runs:
        h = run["hparams"]
        ax = axes[rows.index((h["dataset"], h["model"])), qs.index(h["num_directions"])]
        values = np.asarray(run["metrics"]["test_accuracy"], float)
        ax.plot(run["num_queries"], values, color=colors[run["method"]], lw=1, alpha=0.7,
                label=LABELS[run["method"]] if h["seed"] == min(
                    r["hparams"]["seed"] for r in runs) else None)
    for (i, (dataset, model)), (j, q) in ((a, b) for a in enumerate(rows) for b in enumerate(qs)):
        ax = axes[i, j]
        ax.set(title=f"{dataset}/{model}, Q={q}" if i == 0 else f"{dataset}/{model}",
               xlabel="queries" if i == len(rows) - 1 else "")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize="x-small")
    figures[""] = figure

    figure = Figure(figsize=(4.2 * len(rows) + 0.6, 3.4), layout="constrained")
    axes = figure.subplots(1, len(rows), squeeze=False)[0]
    for (dataset, model, q), by_method in groups(results).items():
        ax = axes[rows.index((dataset, model))]
        for method, values in by_method.items():
            mean, se = mean_and_stderr(values)
            ax.errorbar(q, mean, yerr=se, fmt="o", color=colors[method], capsize=2,
                        label=LABELS[method])
    for ax, (dataset, model) in zip(axes, rows):
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize="small")
        ax.set(xscale="log", xlabel="Q (perturbations per step)", ylabel="final test accuracy",
               title=f"{dataset}/{model}, equal query budgets")
        ax.grid(alpha=0.3)
    figures["_q_sweep"] = figure

    figure = Figure(figsize=(4.2 * len(rows) + 0.6, 3.4), layout="constrained")
    axes = figure.subplots(1, len(rows), squeeze=False)[0]
    for run in runs:
        h = run["hparams"]
        steps = np.asarray(run["steps"], float)
        seconds = run["wall_seconds"] * steps / max(steps[-1], 1)  # at a uniform rate
        axes[rows.index((h["dataset"], h["model"]))].plot(
            seconds, np.asarray(run["metrics"]["loss"], float), color=colors[run["method"]],
            lw=0.8, alpha=0.6)
    for ax, (dataset, model) in zip(axes, rows):
        ax.set(yscale="log", xlabel="wall seconds (program time, uniform rate)",
               ylabel="train loss", title=f"{dataset}/{model}")
        ax.grid(alpha=0.3)
    figures["_wall_time"] = figure
    return figures


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
