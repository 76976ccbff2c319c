# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Flatness analysis: trace vs loss, and four ways to measure the trace
#
# Reads the workdirs of the two figure commands (their `results.json` and last checkpoint),
# `$ZOJAX_FIG1_DIR` (default `/tmp/zojax/test_function`) and `$ZOJAX_FIG2_DIR` (default
# `/tmp/zojax/linear_models`), as made by the commands of the documentation's experiment
# pages (`DATA_DIR`: your data directory, holding `libsvm/a7a` and `libsvm/w5a`):
#
# ```
# python -m experiments.test_function --config configs/test_function.py \
#     --workdir /tmp/zojax/test_function
# python -m experiments.linear_models --config configs/linear_models.py \
#     --config.data_dir=DATA_DIR --workdir /tmp/zojax/linear_models
# ```
#
# A missing workdir is reported and its part skipped. The notebook reads `results.json` and the
# final params of each run (`runner.load_member`); Figure 2's train features are regenerated
# from the config stored in `results.json` (its dataset files are read again), so nothing else
# is needed. Run it as a script from the repository
# (`python notebooks/flatness_analysis.py`) or open it as a notebook
# (`jupytext --to ipynb notebooks/flatness_analysis.py`). With the full Figure-2 run, the exact
# trace (10,001 Hessian-vector products per run) takes a few minutes on a 2-core CPU.

# %%
import functools
import json
import os
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)  # the analysis runs in float64 (training ran in float32)

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

_start = pathlib.Path(__file__).parent if "__file__" in globals() else pathlib.Path.cwd()
ROOT = next(p for p in (_start.resolve(), *_start.resolve().parents)
            if (p / "experiments" / "runner" / "__init__.py").is_file())
sys.path.insert(0, str(ROOT))  # experiments/ is not installed

import zojax  # noqa: E402
from experiments import linear_models, runner, test_function  # noqa: E402
from zojax.problems import linear  # noqa: E402

# Probes of hutchinson_trace and antithetic pairs of zo_trace. Their standard errors scale like
# ‖∇²f‖_F / √n: Figure 1's Hessian has a rank-2 block as large as its trace, so it needs more.
NUM_SAMPLES = {"test_function": 4096, "linear_models": 256}
DELTA = 1e-4  # zo_trace's δ (the paper's Figure-3 value; fine in float64).
FLOOR = 1e-32  # losses below it (GD reaches exact zeros on Figure 1) are drawn at it.


def load(env: str, default: str, command: str):
    """(workdir, results) of one figure, or None (with the command that makes it)."""
    workdir = pathlib.Path(os.environ.get(env, default)).expanduser()
    if not (workdir / "results.json").is_file():
        print(f"{workdir / 'results.json'} not found: skipping this part. Make it with\n"
              f"  {command}\nor point ${env} at a workdir that has it.\n")
        return None
    return workdir, json.loads((workdir / "results.json").read_text())


fig1 = load("ZOJAX_FIG1_DIR", "/tmp/zojax/test_function",
            "python -m experiments.test_function --config configs/test_function.py "
            "--workdir /tmp/zojax/test_function")
fig2 = load("ZOJAX_FIG2_DIR", "/tmp/zojax/linear_models",
            "python -m experiments.linear_models --config configs/linear_models.py "
            "--config.data_dir=DATA_DIR --workdir /tmp/zojax/linear_models")

# %% [markdown]
# ## Trajectories in the (loss, trace) plane
#
# One line per run from its start (★) to its last evaluation (●); the loss decreases to the left.
# GD heads straight for low loss; ZO with λ > 0 also moves down in trace: it minimizes
# f + (λ²/2) tr ∇²f.


# %%
def plot_trajectories(workdir, results, panel_of, label):
    """Trace against train loss (log), a panel per ``panel_of(run)``; saved in the workdir."""
    panels = {}
    for run in results["runs"]:
        panels.setdefault(panel_of(run), []).append(run)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False,
                                layout="constrained")
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for run in runs:
            loss = np.maximum(np.asarray(run["metrics"]["loss"], float), FLOOR)  # null -> nan
            trace = np.asarray(run["metrics"]["hessian_trace"], float)
            (line,) = ax.plot(loss, trace, lw=1.3, label=label(run),
                              ls="--" if run["method"] == "gd" else "-")
            ax.plot(loss[-1], trace[-1], "o", color=line.get_color())
        ax.plot(loss[0], trace[0], "k*", ms=12)
        ax.set(xscale="log", xlabel="train loss", ylabel="train tr ∇²f", title=title)
        ax.legend(fontsize="small")
    figure.suptitle(f"{results['experiment']}: {results['runs'][0]['steps'][-1]} steps")
    figure.savefig(workdir / "trace_vs_loss.png", dpi=120)
    print(f"saved {workdir / 'trace_vs_loss.png'}")
    return figure


if fig1:
    plot_trajectories(*fig1, lambda run: "h(y, z) = (yᵀz − 1)²/2", test_function.label)
if fig2:
    plot_trajectories(*fig2, lambda run: f"{run['hparams']['dataset']}, {run['hparams']['loss']}",
                      linear_models.label)

# %% [markdown]
# ## The trace at the final checkpoint, four ways
#
# For each run, the params of the last checkpoint (the end of training), cast to float64:
# the closed form (what the experiments record), `zojax.hessian_trace` (exact, one
# Hessian-vector product per coordinate), `zojax.hutchinson_trace` (Rademacher probes vᵀHv)
# and `zojax.zo_trace` (second differences (f(x+δz) + f(x−δz) − 2f(x))/δ², function values
# only), the last two with their standard errors. The restored loss is checked against the one
# recorded in `results.json`.


# %%
def to64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@functools.cache
def trace_estimates(loss, closed_form, chunk_size, num_samples):
    """One compiled function per objective: loss and the four traces at ``params``."""

    @jax.jit
    def estimate(params, key, *args):
        hutchinson_key, zo_key = jax.random.split(key)
        return {
            "loss": loss(params, *args),
            "closed form": closed_form(params, *args),
            "hessian_trace": zojax.hessian_trace(loss, params, *args, chunk_size=chunk_size),
            "hutchinson": zojax.hutchinson_trace(loss, hutchinson_key, params, *args,
                                                 num_samples=num_samples),
            "zo_trace": zojax.zo_trace(loss, zo_key, params, *args, delta=DELTA,
                                       num_samples=num_samples),
        }

    return estimate


def fig1_objective(run, config):
    """Figure 1: h and its closed-form trace ‖y‖² + ‖z‖², no data."""
    problem = zojax.problems.test_function
    return problem.loss, problem.hessian_trace, (), None


@functools.cache
def fig2_train_data(dataset, seed, config_json):
    """Figure 2's train features of (dataset, seed), as the experiment made them, in float64."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    (train, labels, _, _), _ = linear_models.problem_data(
        linear_models.load_dataset(dataset, config), seed, config)
    features = linear.AffineFeatures.create(*to64((train.inputs, train.projection, train.mean,
                                                   train.scale)))
    return features, to64(labels)


def fig2_objective(run, config):
    """Figure 2: the train loss and its closed-form trace, on the library's affine feature map
    (rebuilt in float64, row norms included)."""
    hparams = run["hparams"]
    loss = linear_models.LOSSES[linear_models.registry_name(config, hparams["loss"])]
    args = fig2_train_data(hparams["dataset"], hparams["seed"], json.dumps(config.to_dict()))
    return loss.loss, loss.hessian_trace, args, config.reference_chunk_size


def compare(workdir, results, objective):
    """Restores every run's last checkpoint, prints the table; returns the rows."""
    config = ml_collections.ConfigDict(results["config"])
    num_samples = NUM_SAMPLES[results["experiment"]]
    rows, loss_error, trace_error = [], 0.0, 0.0
    for index, run in enumerate(results["runs"]):
        loss, closed_form, args, chunk_size = objective(run, config)
        estimate = trace_estimates(loss, closed_form, chunk_size, num_samples)
        params = to64(runner.load_member(workdir, run["name"]))
        values = jax.device_get(estimate(params, jax.random.key(index), *args))
        rows.append({"run": run["name"], **values})
        recorded = {k: v[-1] for k, v in run["metrics"].items()}
        if recorded["loss"] is not None:  # null: the run diverged (its last good params)
            loss_error = max(loss_error, abs(values["loss"] - recorded["loss"]))
            trace_error = max(trace_error, abs(values["closed form"] / recorded["hessian_trace"]
                                               - 1))

    width = max(len(row["run"]) for row in rows) + 2
    print(f"{results['experiment']} at step {results['runs'][0]['steps'][-1]} (float64; "
          f"{num_samples} probes, zo_trace δ = {DELTA:g})")
    print(f"{'run':<{width}}{'loss':>10}{'closed form':>13}{'hessian_trace':>15}"
          f"{'hutchinson':>12} ± {'se':<8}{'zo_trace':>10} ± se")
    for row in rows:
        (h, h_se), (z, z_se) = row["hutchinson"], row["zo_trace"]
        print(f"{row['run']:<{width}}{row['loss']:>10.3g}{row['closed form']:>13.6g}"
              f"{row['hessian_trace']:>15.6g}{h:>12.5g} ± {h_se:<8.2g}{z:>10.5g} ± {z_se:.2g}")
    exact = max(abs(r["hessian_trace"] - r["closed form"]) / abs(r["closed form"]) for r in rows)
    print(f"closed form vs hessian_trace: max relative difference {exact:.1e}. Restored params vs "
          f"results.json (float32): loss within {loss_error:.1e}, trace within "
          f"{trace_error:.1e} (relative).\n")
    return rows


if fig1:
    compare(*fig1, fig1_objective)
if fig2:
    fig2_table = compare(*fig2, fig2_objective)

# %% [markdown]
# ## Caveat: on Figure 2, ZO's lower trace costs training loss
#
# On Figure 1 the minimizers yᵀz = 1 form a manifold along which the trace ranges from 2 to ∞,
# and ZO reaches (nearly) GD's loss at a smaller trace. Figure 2 is different. The loss
# f(w) = (1/N) Σᵢ ℓ(bᵢ xᵢᵀw) and its trace tr ∇²f(w) = (1/N) Σᵢ ℓ''(bᵢ xᵢᵀw) ‖xᵢ‖² depend on w
# only through the predictions Xw, and X = [1, S₂(S₁(Φ)W)] is an affine image of the d raw
# inputs, so rank X ≤ d + 1 ≪ D: the other directions change neither. The minimizers share their
# predictions (exactly so for the strictly convex logistic loss), hence their trace: there is no
# flatter minimizer to drift to. ZO's lower trace therefore comes with a higher training loss:
# it minimizes the smoothed loss f_λ ≈ f + (λ²/2) tr ∇²f, not f. The numbers at the last
# evaluation (from `results.json`; F_λ = f + (λ²/2) tr ∇²f with the ZO run's λ):

# %%
if fig2:
    fig2_config = ml_collections.ConfigDict(fig2[1]["config"])
    panels = {}
    for run in fig2[1]["runs"]:
        panels.setdefault((run["hparams"]["dataset"], run["hparams"]["loss"]), []).append(run)
    for (dataset, loss), runs in panels.items():
        features, _ = fig2_objective(runs[0], fig2_config)[2]
        zo = [run for run in runs if run["method"] == "zo"]
        lam = zo[0]["hparams"]["smoothing"] if zo else 0.0
        print(f"{dataset}, {loss}: D = {features.shape[1]} parameters, rank X ≤ d + 1 = "
              f"{features.inputs.shape[1] + 1}; λ = {lam:g}")
        width = max(len(linear_models.label(run)) for run in runs) + 2
        print(f"  {'run':<{width}}{'train loss':>10}{'train trace':>13}{'F_λ':>9}{'test acc':>10}")
        for run in runs:
            metrics = {k: v[-1] for k, v in run["metrics"].items()}
            if metrics["loss"] is None:
                print(f"  {linear_models.label(run):<{width}}non-finite")
                continue
            smoothed = metrics["loss"] + lam**2 / 2 * metrics["hessian_trace"]
            print(f"  {linear_models.label(run):<{width}}{metrics['loss']:>10.4f}"
                  f"{metrics['hessian_trace']:>13.5g}{smoothed:>9.4g}"
                  f"{metrics['test_accuracy']:>10.4f}")
