"""The analysis notebook (notebooks/flatness_analysis.py) on the smoke runs of both figures, and
``runner.load_params``, which it uses to restore the final params."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import linear_models as linear_models_config
from configs import test_function as test_function_config
from experiments import linear_models, runner, test_function

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "flatness_analysis.py"


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """Smoke runs of Figure 1 and Figure 2: ``{"fig1": workdir, "fig2": workdir}``."""
    root = tmp_path_factory.mktemp("smoke")
    test_function.train_and_evaluate(test_function_config.get_config("smoke"), root / "fig1")
    linear_models.train_and_evaluate(linear_models_config.get_config("smoke"), root / "fig2")
    return {"fig1": root / "fig1", "fig2": root / "fig2"}


def run_notebook(env_dirs: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOJAX_FIG")}
    env.update(env_dirs, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(NOTEBOOK)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_notebook_runs_on_the_smoke_results(workdirs):
    result = run_notebook({"ZOJAX_FIG1_DIR": str(workdirs["fig1"]),
                           "ZOJAX_FIG2_DIR": str(workdirs["fig2"])})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "not found" not in out
    header = "hessian_trace  hutchinson ± se        zo_trace ± se"
    for experiment, runs in (("test_function at step 2000", 5), ("linear_models at step 200", 4)):
        table = out.split(experiment)[1].split("\n\n")[0].splitlines()
        assert header in table[1]
        assert len(table) == 2 + runs + 1, table  # title, header, a row per run, the checks
    for name in ("gd", "zo(smoothing=0.1)", "forward_grad", "synthetic/svm/zo",
                 "synthetic/logistic/gd"):
        assert f"\n{name} " in out
    assert out.count("closed form vs hessian_trace") == 2
    # The caveat's numbers: final train loss and trace of GD and ZO per (dataset, loss).
    assert "synthetic, logistic: D = 301 parameters, rank X ≤ d + 1 = 124" in out
    for workdir in workdirs.values():
        assert (workdir / "trace_vs_loss.png").stat().st_size > 0


def test_notebook_skips_a_missing_workdir(tmp_path):
    result = run_notebook({"ZOJAX_FIG1_DIR": str(tmp_path / "absent"),
                           "ZOJAX_FIG2_DIR": str(tmp_path / "absent too")})
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'absent' / 'results.json'} not found" in result.stdout
    assert "python -m experiments.test_function --config configs/test_function.py" in result.stdout
    assert "python -m experiments.linear_models --config configs/linear_models.py" in result.stdout
    assert "hutchinson" not in result.stdout


def test_notebook_is_a_paired_jupytext_notebook():
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(NOTEBOOK)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and "code" in kinds and kinds.count("markdown") >= 3
    assert "ZOJAX_FIG1_DIR" in notebook.cells[0].source


def test_load_params_restores_the_final_params(workdirs):
    for module, workdir in ((test_function, workdirs["fig1"]), (linear_models, workdirs["fig2"])):
        results = json.loads((workdir / "results.json").read_text())
        config = ml_collections.ConfigDict(results["config"])  # lists for tuples, as stored
        experiment = module.get_experiment(config)
        params = runner.load_params(experiment, config, workdir)
        assert list(params) == [run["name"] for run in results["runs"]]
        for member, run in zip(experiment.members, results["runs"]):
            loss = member.problem.loss(params[member.name], *member.problem.data)
            np.testing.assert_allclose(loss, run["metrics"]["loss"][-1], rtol=1e-5, atol=1e-12,
                                       err_msg=member.name)
            start = jax.tree.leaves(member.problem.init_params)
            assert all(a.shape == b.shape and a.dtype == b.dtype
                       for a, b in zip(jax.tree.leaves(params[member.name]), start))


def test_load_params_of_an_earlier_checkpoint(workdirs):
    results = json.loads((workdirs["fig1"] / "results.json").read_text())
    config = ml_collections.ConfigDict(results["config"])
    experiment = test_function.get_experiment(config)
    step = min(int(p.name) for p in (workdirs["fig1"] / "checkpoints").iterdir()
               if p.name.isdigit())
    assert step < results["runs"][0]["steps"][-1]
    params = runner.load_params(experiment, config, workdirs["fig1"], step=step)
    index = results["runs"][0]["steps"].index(step)
    for member, run in zip(experiment.members, results["runs"]):
        np.testing.assert_allclose(member.problem.loss(params[member.name]),
                                   run["metrics"]["loss"][index], rtol=1e-5, atol=1e-12)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 1 "):
        runner.load_params(experiment, config, workdirs["fig1"], step=1)


def test_load_params_without_checkpoints(tmp_path):
    config = test_function_config.get_config("smoke")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        runner.load_params(test_function.get_experiment(config), config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
