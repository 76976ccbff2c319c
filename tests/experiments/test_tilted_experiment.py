"""The ZEST sharpness sweep (experiments/tilted.py) on its smoke config, its notebook, the
runner's final metrics, its bad input, and the two-scales prediction on a short run."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import zojax
from configs import tilted as tilted_config
from experiments import runner, tilted
from zojax.problems import two_scales

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "tilted_analysis.py"
CURVATURE = ("loss", "hessian_trace", "hessian_top_eigenvalue", "hessian_square_trace")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(config, workdir, results) of the smoke sweep."""
    workdir = tmp_path_factory.mktemp("tilted")
    config = tilted_config.get_config("smoke")
    results = tilted.train_and_evaluate(config, workdir)
    return config, workdir, results


def test_smoke_results_schema(smoke):
    config, workdir, results = smoke
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["experiment"] == "tilted"
    runs = tilted.by_problem(results)
    assert list(runs) == list(tilted_config.PROBLEMS)
    for problem, problem_runs in runs.items():
        assert [r["method"] for r in problem_runs] == ["gd", "zo"] + ["zest"] * len(config.tilts)
        zest = [r for r in problem_runs if r["method"] == "zest"]
        assert [r["hparams"]["tilt"] for r in zest] == list(config.tilts)
        zo = problem_runs[1]
        for run in problem_runs[1:]:  # the same λ, η and budget per step
            assert run["hparams"]["smoothing"] == zo["hparams"]["smoothing"]
            assert run["hparams"]["learning_rate"] == zo["hparams"]["learning_rate"]
            assert run["hparams"]["direction"] == "sphere"
            assert np.diff(run["num_queries"]).tolist() == np.diff(zo["num_queries"]).tolist()
        assert zo["num_queries"][-1] == zo["steps"][-1] * config[problem].num_directions
        # The tilts share one vmapped program: one compilation and one wall time.
        assert len({(r["compile_seconds"], r["wall_seconds"]) for r in zest}) == 1
        for run in problem_runs:
            assert run["hparams"]["problem"] == problem
            for metric in CURVATURE:
                values = run["metrics"][metric]
                assert len(values) == len(run["steps"]) and all(math.isfinite(v) for v in values)
            if problem in ("logistic", "digits_mlp"):
                assert 0.0 <= run["metrics"]["test_accuracy"][-1] <= 1.0
            else:
                assert "test_accuracy" not in run["metrics"]
            # Hutchinson (with standard errors) only above exact_max_dim: the MLP.
            assert ("hessian_trace_stderr" in run["metrics"]) == (problem == "digits_mlp")
            spectrum = run["final_metrics"]["spectrum"]
            nodes, weights = np.asarray(spectrum["nodes"]), np.asarray(spectrum["weights"])
            assert nodes.shape == weights.shape == (config.spectrum_samples,
                                                    config.spectrum_iters)
            np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-4)
            # The spectrum's largest weighted node does not exceed the recorded λ_max by more
            # than Lanczos' accuracy.
            assert nodes[weights > 1e-6].max() <= 1.01 * run["metrics"][
                "hessian_top_eigenvalue"][-1] + 1e-6
    assert runs["logistic"][0]["hparams"]["dataset"] == "synthetic"
    for suffix in ("", "_trajectories", "_spectra"):
        assert (workdir / f"tilted{suffix}.png").stat().st_size > 0
    assert "| two_scales | ZEST | 100 |" in tilted.summary(results)


def test_recorded_curvature_matches_the_final_params(smoke):
    """The metrics of the last evaluation, recomputed on the restored params, against dense
    Hessians (two scales, the test function) and the closed form (logistic)."""
    config, workdir, results = smoke
    experiment = tilted.get_experiment(ml_collections.ConfigDict(results["config"]))
    params = runner.load_params(experiment, config, workdir)
    for member, run in zip(experiment.members, results["runs"]):
        if run["hparams"]["problem"] not in ("two_scales", "test_function"):
            continue
        fun = member.problem.loss
        flat, unravel = jax.flatten_util.ravel_pytree(params[member.name])
        dense = np.asarray(jax.hessian(lambda x, f=fun, u=unravel: f(u(x)))(flat), np.float64)
        metrics = {k: v[-1] for k, v in run["metrics"].items()}
        np.testing.assert_allclose(metrics["hessian_trace"], np.trace(dense), rtol=1e-4)
        np.testing.assert_allclose(metrics["hessian_square_trace"], np.sum(dense**2), rtol=1e-4)
        np.testing.assert_allclose(metrics["hessian_top_eigenvalue"],
                                   np.linalg.eigvalsh(dense)[-1], rtol=1e-3)
        if run["hparams"]["problem"] == "two_scales":
            assert metrics["w"] == pytest.approx(float(params[member.name]["w"]))


def test_notebook_runs_on_the_smoke_results(smoke):
    _, workdir, _ = smoke
    env = {**os.environ, "ZOJAX_TILTED_DIR": str(workdir), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(NOTEBOOK)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| problem | method | t |" in out
    for problem in tilted_config.PROBLEMS:
        assert f"{problem}: predicted:" in out
    assert "final w =" in out and "largest weighted node" in out
    assert (workdir / "tilted_analysis_spectra.png").stat().st_size > 0


def test_notebook_skips_a_missing_workdir(tmp_path):
    env = {**os.environ, "ZOJAX_TILTED_DIR": str(tmp_path / "absent"), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(NOTEBOOK)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not found" in result.stdout and "python -m experiments.tilted" in result.stdout


def test_notebook_is_a_paired_jupytext_notebook():
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(NOTEBOOK)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert [c.cell_type for c in notebook.cells].count("markdown") >= 3


def test_two_scales_prediction_shows(tmp_path):
    """A short run of problem (b): ZO ends nearer the trace minimizer (w = 1.109), large t
    nearer the λ_max minimizer (w = 0): ZO has the smaller trace, ZEST t=100 the smaller λ_max."""
    config = tilted_config.get_config()
    config.problems = ("two_scales",)
    config.methods = ("zo", "zest")
    config.tilts = (100.0,)
    config.num_steps = config.two_scales.num_steps = 3_000
    config.eval_every, config.log_evals, config.evals_per_chunk = 1_000, 0, 4
    results = tilted.train_and_evaluate(config, tmp_path)
    zo, zest = results["runs"]
    w_zo, w_zest = tilted.final(zo, "w"), tilted.final(zest, "w")
    assert abs(w_zo - two_scales.TRACE_MINIMIZER) < 0.3, w_zo
    assert abs(w_zest - two_scales.EIGENVALUE_MINIMIZER) < 0.6 and w_zest < w_zo - 0.4, w_zest
    assert tilted.final(zo, "hessian_trace") < tilted.final(zest, "hessian_trace")
    assert tilted.final(zest, "hessian_top_eigenvalue") < tilted.final(
        zo, "hessian_top_eigenvalue")


def test_final_metrics_of_the_runner(tmp_path):
    """Problem.final_metrics: computed once on the last params, stored per run, null for a
    diverged member; runs of problems without it have no such field."""
    def loss(params):
        return 0.5 * jnp.sum(params**2)

    def metrics(params):
        return {"loss": loss(params)}

    def final(params):
        return {"params": params, "norm": jnp.linalg.norm(params)}

    with_final = runner.Problem(loss, metrics, jnp.ones(3), final_metrics=final)
    without = runner.Problem(loss, metrics, jnp.ones(3))
    members = (runner.sweep("gd", {"learning_rate": (0.1, 3.0)}, with_final, name="a")
               + runner.sweep("gd", {"learning_rate": 0.1}, without, name="b"))
    config = ml_collections.ConfigDict(dict(num_steps=2000, eval_every=1000, evals_per_chunk=2,
                                            checkpoint_every=1, log_evals=0))
    experiment = runner.Experiment("final", members)
    with pytest.raises(runner.NonFiniteError, match="a\\(learning_rate=3.0\\)"):
        runner.run(experiment, config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    good, bad, plain = results["runs"]
    np.testing.assert_allclose(good["final_metrics"]["params"], 0.9**2000 * np.ones(3),
                               atol=1e-30)
    assert good["final_metrics"]["norm"] == pytest.approx(np.sqrt(3) * 0.9**2000, abs=1e-30)
    assert bad["final_metrics"] is None and "final_metrics" not in plain


@pytest.mark.parametrize("field, value, match", [
    ("tilts", (1.0, 0.0), r"config\.tilts must be .*positive finite"),
    ("tilts", (-1.0,), r"config\.tilts"),
    ("tilts", (float("inf"),), r"config\.tilts"),
    ("tilts", (float("nan"), 1.0), r"config\.tilts"),
    ("tilts", (), r"config\.tilts"),
    ("problems", ("two_scales", "mnist"),
     r"config\.problems must be a non-empty tuple of \('test_function', 'two_scales', "
     r"'logistic', 'digits_mlp'\)"),
    ("methods", ("sam",), r"config\.methods must be .*'gd', 'zo', 'zest'"),
    ("direction", "rademacher", r"config\.direction must be one of \('sphere', 'gaussian'\)"),
    ("direction", "gaussian", r"config\.direction: 'gaussian' makes L_t infinite on "
                              r"'test_function'"),
])
def test_bad_config(field, value, match):
    config = tilted_config.get_config("smoke")
    config[field] = value
    with pytest.raises(runner.ConfigError, match=match):
        tilted.get_experiment(config)


def test_bad_problem_fields():
    config = tilted_config.get_config("smoke")
    config.two_scales.num_directions = 3
    with pytest.raises(runner.ConfigError, match=r"config\.two_scales\.num_directions must be "
                                                 r"an even int >= 2"):
        tilted.get_experiment(config)
    config = tilted_config.get_config("smoke")
    config.logistic.dataset = "mnist"
    with pytest.raises(runner.ConfigError, match=r"config\.logistic\.dataset must be 'auto'"):
        tilted.get_experiment(config)
    config = tilted_config.get_config("smoke")
    config.two_scales.learning_rate = -1.0
    with pytest.raises(runner.ConfigError, match=r"config\.two_scales\.learning_rate"):
        tilted.get_experiment(config)
    config = tilted_config.get_config("smoke")
    config.problems, config.direction = ("logistic", "digits_mlp"), "gaussian"
    assert {m.hparams.get("direction") for m in tilted.get_experiment(config).members} == {
        None, "gaussian"}  # GD has none


def test_missing_libsvm_files(tmp_path):
    config = tilted_config.get_config("smoke")
    config.problems, config.data_dir = ("logistic",), str(tmp_path)
    config.logistic.dataset = "a7a"
    with pytest.raises(runner.ConfigError, match=r"config\.logistic\.dataset"):
        tilted.get_experiment(config)
    config.logistic.dataset = "auto"  # falls back to the synthetic stand-in, and says so
    assert tilted.get_experiment(config).members[0].labels["dataset"] == "synthetic-a7a"


def test_gaussian_is_finite_where_allowed():
    """The logistic loss grows linearly: L_t is finite with Gaussian directions at t = 100."""
    config = tilted_config.get_config("smoke")
    problem, _ = tilted.logistic_problem(config)
    value, stderr = zojax.tilted_value(problem.loss, jax.random.key(0), problem.init_params,
                                       *problem.data, smoothing=0.05, tilt=100.0, num_samples=64,
                                       direction="gaussian")
    assert np.isfinite(value) and np.isfinite(stderr)
