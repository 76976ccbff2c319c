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
# # The sharpness ZEST penalizes: trace, tr H², λ_max and spectra across tilts
#
# Reads the workdir of the tilted sweep, `$ZOJAX_TILTED_DIR` (default `/tmp/zojax/tilted`), as
# made by
#
# ```
# python -m experiments.tilted --config configs/tilted.py --config.data_dir=DATA_DIR \
#     --workdir /tmp/zojax/tilted
# ```
#
# A missing workdir is reported and the rest skipped. Everything comes from `results.json`: the
# metrics of every run at every evaluation, and its Hessian spectrum (stochastic Lanczos
# quadrature) at the last step. Run it as a script from the repository
# (`python notebooks/tilted_analysis.py`) or open it as a notebook
# (`jupytext --to ipynb notebooks/tilted_analysis.py`).
#
# **What the theory predicts** (quadratic model at a minimizer, Hessian H, smoothing radius ρ):
# ZEST descends L_t = (1/t) log E exp(t f(x + ρu)). For small t,
# L_t ≈ f + (ρ²/2) tr H + (tρ⁴/4)(tr H² − …): the trace, as plain ZO, with tr H² growing in
# weight as t grows. For large t (sphere perturbations), L_t → f + (ρ²/2) d λ_max: the top
# eigenvalue. So where the minimizers with the smallest trace and with the smallest λ_max
# differ, small t should end at the first and large t at the second.

# %%
import json
import os
import pathlib
import sys

import matplotlib.pyplot as plt
import numpy as np

_start = pathlib.Path(__file__).parent if "__file__" in globals() else pathlib.Path.cwd()
ROOT = next(p for p in (_start.resolve(), *_start.resolve().parents)
            if (p / "experiments" / "runner" / "__init__.py").is_file())
sys.path.insert(0, str(ROOT))  # experiments/ is not installed

import zojax  # noqa: E402
from experiments import tilted  # noqa: E402
from zojax.problems import two_scales  # noqa: E402

COMMAND = ("python -m experiments.tilted --config configs/tilted.py "
           "--config.data_dir=DATA_DIR --workdir /tmp/zojax/tilted")
workdir = pathlib.Path(os.environ.get("ZOJAX_TILTED_DIR", "/tmp/zojax/tilted")).expanduser()
results = None
if (workdir / "results.json").is_file():
    results = json.loads((workdir / "results.json").read_text())
else:
    print(f"{workdir / 'results.json'} not found: skipping the analysis. Make it with\n"
          f"  {COMMAND}\nor point $ZOJAX_TILTED_DIR at a workdir that has it.")

# %% [markdown]
# ## The final values, per problem
#
# One row per run: GD, ZO, and ZEST for each t, all at the same smoothing, step size and
# number of function evaluations per step. Traces with `±` are Hutchinson estimates (the MLP
# has more parameters than `exact_max_dim`); the others are exact.

# %%
if results:
    print(tilted.table(results))


# %% [markdown]
# ## Does the prediction show?
#
# For each problem: how the final trace and λ_max of ZEST move as t grows (Spearman-like: the
# sign of the change from the smallest to the largest t), next to what the theory predicts.
#
# - **(a) test function.** At a minimizer the Hessian is rank one (the gradient of yᵀz),
#   so tr H = λ_max = ‖y‖² + ‖z‖² and tr H² = (tr H)²: every t penalizes the same quantity and
#   all tilts should flatten like ZO. What can differ is speed: the estimator's step shrinks
#   like 1/(tρ) once t·(f(x + ρu) − f(x − ρu)) is large (its softmax saturates).
# - **(b) two scales.** Along the valley u = v = 0 the trace is smallest at w = 1.109 and λ_max
#   at w = 0: ZO and small t should end near w = 1.109 (smaller trace, larger λ_max), large t
#   near w = 0 (smaller λ_max, larger trace), monotonically in between.
# - **(c) logistic regression** and **(d) the MLP**: no designed disagreement; the theory
#   predicts that larger t weighs the top of the spectrum more (lower λ_max relative to the
#   trace), within what the budget lets each method reach.

# %%
PREDICTION = {
    "test_function": "trace = λ_max at minimizers: every t flattens like ZO",
    "two_scales": "small t → trace minimizer (w = 1.109), large t → λ_max minimizer (w = 0)",
    "logistic": "larger t: λ_max weighs more",
    "digits_mlp": "larger t: λ_max weighs more",
}


def trend(runs, metric):
    """(value at the smallest t, value at the largest t, "down"/"up"/"flat")."""
    zest = sorted((r for r in runs if r["method"] == "zest"), key=lambda r: r["hparams"]["tilt"])
    if len(zest) < 2:
        return None
    first, last = tilted.final(zest[0], metric), tilted.final(zest[-1], metric)
    if first is None or last is None:
        return None
    change = (last - first) / max(abs(first), 1e-30)
    return first, last, "down" if change < -0.01 else "up" if change > 0.01 else "flat"


if results:
    for problem, runs in tilted.by_problem(results).items():
        print(f"{problem}: predicted: {PREDICTION.get(problem, '?')}")
        for metric in ("hessian_trace", "hessian_top_eigenvalue"):
            found = trend(runs, metric)
            if found:
                print(f"  {metric:<24} smallest t {found[0]:.4g} -> largest t {found[1]:.4g}"
                      f" ({found[2]})")
        if problem == "two_scales":
            for run in runs:
                w = tilted.final(run, "w")
                closer = ("trace minimizer" if w is not None and abs(w - two_scales.TRACE_MINIMIZER)
                          < abs(w - two_scales.EIGENVALUE_MINIMIZER) else "λ_max minimizer")
                print(f"  {tilted.label(run):<14} final w = {w:.3f} (closer to the {closer})")
        print()

# %% [markdown]
# ## The spectra at the end
#
# Gaussian-smoothed densities (`zojax.spectral_density`) of each run's final Hessian, from the
# stochastic Lanczos quadrature stored in `results.json`: nodes and weights of
# `spectrum_samples` probes. The mass at the right edge is what λ_max measures, the first
# moment (times d) the trace.

# %%
if results:
    problems = tilted.by_problem(results)
    figure, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.4),
                                squeeze=False, layout="constrained")
    for ax, (problem, runs) in zip(axes[0], problems.items()):
        spectra = [(run, run["final_metrics"]["spectrum"]) for run in runs
                   if run.get("final_metrics")]
        nodes = np.concatenate([np.ravel(s["nodes"]) for _, s in spectra]).astype(float)
        lo, hi = nodes.min(), nodes.max()
        grid = np.linspace(lo - 0.05 * (hi - lo) - 1e-3, hi + 0.05 * (hi - lo) + 1e-3, 600)
        for run, s in spectra:
            density = zojax.spectral_density(np.asarray(s["nodes"]), np.asarray(s["weights"]),
                                             grid, width=0.01 * (hi - lo) + 1e-3)
            ax.plot(grid, np.maximum(np.asarray(density), 1e-6), label=tilted.label(run))
            weights, values = np.asarray(s["weights"]), np.asarray(s["nodes"])
            top = float(np.max(np.where(weights > 1e-8, values, -np.inf)))
            print(f"{problem:<14} {tilted.label(run):<14} largest weighted node {top:.4g}, "
                  f"recorded λ_max {tilted.final(run, 'hessian_top_eigenvalue'):.4g}")
        ax.set(yscale="log", ylim=(1e-4, None), title=problem, xlabel="eigenvalue")
        ax.legend(fontsize="x-small")
    figure.savefig(workdir / "tilted_analysis_spectra.png", dpi=120)
    print(f"saved {workdir / 'tilted_analysis_spectra.png'}")
