r"""Figure 1: GD vs ZO on the test function h(y, z) = (yᵀz − 1)²/2.

Every point with yᵀz = 1 minimizes h, and tr ∇²h = ‖y‖² + ‖z‖², so the runs differ only in
*which* minimizer they reach: GD and ZO with λ → 0 stop near their start, ZO with λ > 0 also
minimizes the smoothed term (λ²/2) tr ∇²h and drifts to flatter minimizers.

    python -m experiments.test_function --config configs/test_function.py --workdir /tmp/fig1
"""

import jax
import numpy as np

import zojax
from experiments import runner
from zojax.problems import test_function

NAME = "test_function"


def metrics(params):
    """Loss and closed-form Hessian trace, recorded at every evaluation."""
    return {"loss": test_function.loss(params),
            "hessian_trace": test_function.hessian_trace(params)}


def exact_hessian_trace(params):
    """The trace by jvp-of-grad, to cross-check the closed form at the first and last step."""
    return zojax.hessian_trace(test_function.loss, params)


def get_experiment(config) -> runner.Experiment:
    """GD, ZO for every λ, and ZO with λ → 0, all from the same starting point."""
    runner.validate(config, runner.POSITIVE_FIELDS + ("dim", "init_scale"))
    params = test_function.init_params(jax.random.key(config.init_seed), config.dim,
                                       config.init_scale)
    problem = runner.Problem(test_function.loss, metrics, params,
                             reference_metrics={"hessian_trace": exact_hessian_trace})
    members = (runner.sweep("gd", config.gd, problem)
               + runner.sweep("zo", config.zo, problem)
               + runner.sweep("forward_grad", config.forward_grad, problem))
    return runner.Experiment(NAME, members, plot=plot, summary=summary)


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) Figure 1 in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


def label(run: dict) -> str:
    """Legend entry of a run, e.g. "ZO (λ=0.1)"."""
    hparams = run["hparams"]
    if run["method"] == "gd":
        return f"GD (η={hparams['learning_rate']:g})"
    if run["method"] == "forward_grad":
        return "ZO (λ → 0)"
    return f"ZO (λ={hparams['smoothing']:g})"


def plot(results: dict):
    """The paper's layout: loss (log) and trace rows; (a) GD vs ZO vs ZO λ → 0, (b) λ sweep."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    runs = results["runs"]
    zo = [r for r in runs if r["method"] == "zo"]
    panels = {"(a) GD vs ZO": [r for r in runs if r["method"] == "gd"] + zo[:1]
              + [r for r in runs if r["method"] == "forward_grad"],
              "(b) ZO, smoothing λ": zo}
    figure = Figure(figsize=(10, 6.5))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.95, wspace=0.18, hspace=0.06)
    axes = figure.subplots(2, 2, sharex=True)  # a fixed layout: constrained layout costs ~1 s
    for column, (title, panel) in enumerate(panels.items()):
        for run in panel:
            steps = np.asarray(run["steps"], float)
            for row, metric in enumerate(("loss", "hessian_trace")):
                values = np.asarray(run["metrics"][metric], float)  # null -> nan
                axes[row, column].plot(steps[1:], values[1:], label=label(run), lw=1.5)
        axes[0, column].set(title=title, yscale="log")
        axes[1, column].set(xscale="log", xlabel="iteration")
        axes[1, column].legend()
    axes[0, 0].set_ylabel("loss h(y, z)")
    axes[1, 0].set_ylabel("tr ∇²h = ‖y‖² + ‖z‖²")
    return figure


def summary(results: dict) -> str:
    """Start and end of the loss and trace of every run."""
    lines = [f"Figure 1, {results['runs'][0]['steps'][-1]} steps: trace start -> end (end/start), "
             "final loss"]
    for run in results["runs"]:
        trace, loss = run["metrics"]["hessian_trace"], run["metrics"]["loss"]
        if trace[-1] is None:
            lines.append(f"  {label(run):<14} non-finite")
            continue
        lines.append(f"  {label(run):<14} {trace[0]:7.1f} -> {trace[-1]:7.1f} "
                     f"({trace[-1] / trace[0]:4.0%}), loss {loss[-1]:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
