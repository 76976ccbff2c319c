r"""The sharpness ZEST penalizes: GD, ZO and ZEST across tilts t, on four problems.

ZEST descends the tilted objective :math:`L_t(x) = \frac1t \log \mathbb{E} e^{t f(x + \lambda u)}`
(``zojax.zest``). At a minimizer with Hessian H, small t penalizes the trace (plain ZO's
:math:`\frac{\lambda^2}{2}\operatorname{tr}H`, plus :math:`t\,\operatorname{tr}H^2` terms) and
large t the top eigenvalue (sphere: :math:`L_t \to f^* + \frac{\lambda^2 d}{2}\lambda_{\max}`).
Each run records, at every evaluation, the loss, ``hessian_trace``, ``hessian_top_eigenvalue``,
``hessian_square_trace`` (exact for d <= ``exact_max_dim``, else Hutchinson with
``*_stderr``) and the test accuracy where there is a test set; its Hessian spectrum
(``hessian_spectrum``) at the last step is in ``final_metrics``.

Problems: (a) ``test_function``, Figure 1's (yᵀz − 1)²/2, whose minimizers have a rank-one
Hessian (trace = λ_max: every t penalizes the same quantity); (b) ``two_scales``
(:mod:`zojax.problems.two_scales`), a valley where the smallest trace (w = 1.109) and the
smallest λ_max (w = 0) sit apart; (c) ``logistic``, logistic regression on a7a's raw features;
(d) ``digits_mlp``, a Flax MLP on scikit-learn's digits, minibatches.

    python -m experiments.tilted --config configs/tilted.py --config.data_dir=DATA_DIR \
        --workdir /tmp/zojax/tilted

The problems and their curvature metrics are in :mod:`experiments.tilted_problems`.
"""

import math

import numpy as np

import zojax
from experiments import runner
from experiments.tilted_problems import (  # noqa: F401 (re-exported)
    curvature,
    digits_mlp_problem,
    logistic_data,
    logistic_problem,
    test_function_problem,
    two_scales_problem,
)

NAME = "tilted"
PROBLEMS = ("test_function", "two_scales", "logistic", "digits_mlp")  # config.problems
METHOD_NAMES = ("gd", "zo", "zest")  # config.methods
DIRECTIONS = ("sphere", "gaussian")  # config.direction
GAUSSIAN_FINITE = ("logistic", "digits_mlp")  # where L_t exists with Gaussian directions
TITLES = {"test_function": "(a) test function (yᵀz − 1)²/2",
          "two_scales": "(b) two scales ½e^{w/4}‖u‖² + ½e^{−w}‖v‖²",
          "logistic": "(c) logistic regression", "digits_mlp": "(d) MLP on digits"}



# ---------------------------------------------------------------------------------------------
# The experiment.


def _check_config(config) -> None:
    """ConfigError naming the field (and the valid values) before anything is built."""
    runner.validate(config, runner.POSITIVE_FIELDS + (
        "dim", "init_scale", "n", "hidden", "batch_size", "exact_max_dim", "hutchinson_samples",
        "lanczos_iters", "spectrum_iters", "spectrum_samples"))
    runner.check_choices(config, {"problems": PROBLEMS, "methods": METHOD_NAMES,
                                  "direction": DIRECTIONS})
    tilts = runner.as_tuple(config.tilts)
    if not tilts or not all(isinstance(t, int | float) and not isinstance(t, bool)
                            and math.isfinite(t) and t > 0 for t in tilts):
        raise runner.ConfigError(f"config.tilts must be a non-empty tuple of positive finite "
                                 f"numbers, got {config.tilts!r}.")
    for name in runner.as_tuple(config.problems):
        q = config[name].num_directions
        if not (isinstance(q, int) and q >= 2 and q % 2 == 0):
            raise runner.ConfigError(f"config.{name}.num_directions must be an even int >= 2 "
                                     f"(ZEST's antithetic points, ZO's 2q), got {q!r}.")
        if config.direction == "gaussian" and name not in GAUSSIAN_FINITE:
            raise runner.ConfigError(
                f"config.direction: 'gaussian' makes L_t infinite on {name!r} (it grows faster "
                f"than quadratically); use 'sphere', or Gaussian only with problems "
                f"{GAUSSIAN_FINITE}.")
    dataset = config.logistic.dataset
    if dataset not in ("auto", "synthetic") and not (
            dataset in zojax.datasets.LIBSVM_DATASETS or (
                dataset.startswith("synthetic-")
                and dataset.partition("-")[2] in zojax.datasets.LIBSVM_DATASETS)):
        raise runner.ConfigError(
            f"config.logistic.dataset must be 'auto', 'synthetic', a LIBSVM name or "
            f"'synthetic-<name>' ({', '.join(zojax.datasets.LIBSVM_DATASETS)}), got {dataset!r}.")


def get_experiment(config) -> runner.Experiment:
    """GD, ZO and ZEST (every tilt) on every problem of ``config.problems``."""
    _check_config(config)
    members = []
    for name in runner.as_tuple(config.problems):
        labels = {"problem": name}
        if name == "logistic":
            problem, labels["dataset"] = logistic_problem(config)
        else:
            problem = {"test_function": test_function_problem, "two_scales": two_scales_problem,
                       "digits_mlp": digits_mlp_problem}[name](config)
        fields = config[name]
        common = dict(name=None, labels=labels, num_steps=fields.num_steps)
        shared = {"learning_rate": fields.learning_rate, "seed": config.seed}
        zo_fields = {**shared, "smoothing": fields.smoothing, "direction": config.direction}
        methods = {
            "gd": {"learning_rate": fields.learning_rate},
            "zo": {**zo_fields, "num_directions": fields.num_directions // 2,
                   "scheme": "central"},
            "zest": {**zo_fields, "tilt": tuple(runner.as_tuple(config.tilts)),
                     "num_directions": fields.num_directions, "antithetic": True}}
        for method in runner.as_tuple(config.methods):
            members += runner.sweep(method, methods[method], problem,
                                    **{**common, "name": f"{name}/{method}"})
    return runner.Experiment(NAME, members, plot=plot, summary=summary)


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) the sweep in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Tables and plots.


def label(run: dict) -> str:
    """``"GD"``, ``"ZO"`` or ``"ZEST t=10"``."""
    if run["method"] == "zest":
        return f"ZEST t={run['hparams']['tilt']:g}"
    return run["method"].upper()


def by_problem(results: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for run in results["runs"]:
        runs.setdefault(run["hparams"]["problem"], []).append(run)
    return runs


def final(run: dict, metric: str):
    """The metric's value at the run's last evaluation (None: not recorded or non-finite)."""
    values = run["metrics"].get(metric)
    return values[-1] if values else None


COLUMNS = (("loss", "final loss", ".3g"), ("hessian_trace", "tr H", ".4g"),
           ("hessian_square_trace", "tr H²", ".4g"), ("hessian_top_eigenvalue", "λ_max", ".4g"),
           ("test_accuracy", "test acc", ".4f"))


def table(results: dict) -> str:
    """Markdown table of (problem, method, t, final loss, tr H, tr H², λ_max, test accuracy)."""
    lines = ["| problem | method | t | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for problem, runs in by_problem(results).items():
        for run in runs:
            t = run["hparams"].get("tilt")
            cells = []
            for metric, _, spec in COLUMNS:
                value = final(run, metric)
                stderr = final(run, metric + "_stderr")
                text = "–" if value is None else format(value, spec)
                cells.append(text + (f" ± {stderr:.2g}" if stderr is not None else ""))
            lines.append(f"| {problem} | {run['method'].upper()} | "
                         f"{'–' if t is None else format(t, 'g')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    return f"{NAME}: final values per run\n{table(results)}"


def plot(results: dict) -> dict:
    """Three figures: ``""`` (final trace and λ_max vs t per problem), ``"_trajectories"``
    (trace and λ_max over steps), ``"_spectra"`` (the eigenvalue densities of GD, ZO, ZEST)."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    problems = by_problem(results)
    columns = len(problems)
    figures = {}

    figure = Figure(figsize=(3.6 * columns + 0.6, 6), layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    for column, (problem, runs) in enumerate(problems.items()):
        zest = [r for r in runs if r["method"] == "zest"]
        for row, metric in enumerate(("hessian_trace", "hessian_top_eigenvalue")):
            ax = axes[row, column]
            if zest:
                tilts = [r["hparams"]["tilt"] for r in zest]
                values = [np.nan if final(r, metric) is None else final(r, metric) for r in zest]
                ax.plot(tilts, values, "o-", color="C2", label="ZEST")
            for run, color in ((r, c) for r in runs for c in ("C0" if r["method"] == "gd" else
                                                             "C1",) if r["method"] != "zest"):
                if final(run, metric) is not None:
                    ax.axhline(final(run, metric), color=color, ls="--", label=label(run))
            ax.set(xscale="log", xlabel="tilt t" if row else "",
                   ylabel=("final tr ∇²f", "final λ_max(∇²f)")[row] if column == 0 else "")
            ax.grid(alpha=0.3)
        axes[0, column].set_title(TITLES.get(problem, problem), fontsize="medium")
        axes[0, column].legend(fontsize="small")
    figures[""] = figure

    figure = Figure(figsize=(3.6 * columns + 0.6, 6), layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    for column, (problem, runs) in enumerate(problems.items()):
        for index, run in enumerate(runs):
            steps = np.asarray(run["steps"], float)
            for row, metric in enumerate(("hessian_trace", "hessian_top_eigenvalue")):
                values = np.asarray(run["metrics"][metric], float)  # null -> nan
                axes[row, column].plot(steps[1:], values[1:], label=label(run), lw=1.3,
                                       color=f"C{index}")
        for row, name in enumerate(("tr ∇²f", "λ_max(∇²f)")):
            axes[row, column].set(xscale="log", yscale="log", ylabel=name if column == 0 else "")
            axes[row, column].grid(alpha=0.3)
        axes[0, column].set_title(TITLES.get(problem, problem), fontsize="medium")
        axes[1, column].set_xlabel("iteration")
        axes[1, column].legend(fontsize="x-small")
    figures["_trajectories"] = figure

    figure = Figure(figsize=(10, 2.6 * len(problems) + 0.4), layout="constrained")
    axes = figure.subplots(len(problems), 3, squeeze=False)
    for row, (problem, runs) in enumerate(problems.items()):
        spectra = [(run, run.get("final_metrics")) for run in runs]
        spectra = [(run, f["spectrum"]) for run, f in spectra if f]
        if not spectra:
            continue
        nodes = np.concatenate([np.ravel(s["nodes"]) for _, s in spectra]).astype(float)
        lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
        pad = 0.05 * (hi - lo) + 1e-3
        grid = np.linspace(lo - pad, hi + pad, 800)
        width = 0.01 * (hi - lo) + 1e-3
        for index, (run, s) in enumerate(spectra):
            column = {"gd": 0, "zo": 1}.get(run["method"], 2)
            density = np.asarray(zojax.spectral_density(np.asarray(s["nodes"], float),
                                                        np.asarray(s["weights"], float), grid,
                                                        width=width))
            axes[row, column].plot(grid, np.maximum(density, 1e-6), label=label(run),
                                   color=f"C{index}", lw=1.2)
        for column, name in enumerate(("GD", "ZO", "ZEST")):
            axes[row, column].set(yscale="log", ylim=(1e-4, None), title=f"{name}: {problem}")
            axes[row, column].grid(alpha=0.3)
            if axes[row, column].lines:
                axes[row, column].legend(fontsize="x-small")
        axes[row, 0].set_ylabel("density")
    axes[-1, 1].set_xlabel("Hessian eigenvalue (stochastic Lanczos quadrature)")
    figures["_spectra"] = figure
    return figures


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
