"""The experiment commands end to end: Figure 1, its CLI, interruption and resume, quickstart."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ and configs/ are not installed

from configs import test_function as test_function_config  # noqa: E402
from experiments import quickstart, runner, test_function  # noqa: E402

COMMAND = [sys.executable, "-m", "experiments.test_function",
           "--config", "configs/test_function.py:smoke"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Environment of the command-line runs: a shared persistent compilation cache."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def cli(*args, env):
    return subprocess.run([*COMMAND, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def without_timings(results):
    return {**results, "runs": [{k: v for k, v in run.items()
                                 if k not in ("wall_seconds", "compile_seconds")}
                                for run in results["runs"]]}


def strict_json(path):
    def reject(constant):
        raise ValueError(f"{constant} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_sigterm_resume_and_rerun_from_the_command_line(tmp_path, cli_env):
    workdir = tmp_path / "run"
    # Interrupted: SIGTERM once the run has started (its handler is installed before the
    # workdir is written); the run checkpoints the chunk in progress and exits 128 + 15.
    process = subprocess.Popen([*COMMAND, "--workdir", str(workdir)], cwd=ROOT, env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (workdir / "config.json").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM at step" in stderr and "run the same command again to resume" in stderr, stderr
    assert not (workdir / "results.json").exists()
    assert len(list((workdir / "checkpoints").iterdir())) == 1, stderr

    # Resumed by the same command: the results of an uninterrupted run.
    resumed = cli("--workdir", str(workdir), env=cli_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr, resumed.stderr
    results = strict_json(workdir / "results.json")
    config = test_function_config.get_config("smoke")
    experiment = dataclasses.replace(test_function.get_experiment(config), plot=None)
    uninterrupted = runner.run(experiment, config, tmp_path / "uninterrupted")
    assert without_timings(results) == without_timings(uninterrupted)
    for suffix in (".png", ".pdf"):
        assert (workdir / f"test_function{suffix}").stat().st_size > 0
    assert "Figure 1, 2000 steps" in resumed.stdout

    # The same command on the finished workdir: prints the summary, redraws, trains nothing.
    (workdir / "test_function.png").unlink()
    again = cli("--workdir", str(workdir), env=cli_env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == resumed.stdout
    assert "Compiled" not in again.stderr
    assert (workdir / "test_function.png").exists()
    assert strict_json(workdir / "results.json") == results


def test_command_line_errors(tmp_path, cli_env):
    typo = cli("--workdir", str(tmp_path), "--config.zo.smothing=0.2", env=cli_env)
    assert typo.returncode != 0
    assert "unknown config field 'smothing'" in typo.stderr
    assert 'Did you mean "smoothing"' in typo.stderr
    assert "zo.smoothing = (0.1, 0.05, 0.01)" in typo.stderr  # the valid fields are listed
    assert "Traceback" not in typo.stderr

    bad = cli("--workdir", str(tmp_path), "--config.zo.smoothing=(0.1, -0.1)", env=cli_env)
    assert bad.returncode == 1
    assert "error: config.zo.smoothing must be positive" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "config.json").exists()


def test_low_memory_mode_from_the_command_line(tmp_path, cli_env):
    """``--config.zo.chunk_size=1 --config.zo.low_memory=True``: one perturbed copy at a time,
    directions regenerated, the same final traces."""
    low = cli("--workdir", str(tmp_path / "low"), "--config.zo.chunk_size=1",
              "--config.zo.low_memory=True", env=cli_env)
    assert low.returncode == 0, low.stderr
    runs = strict_json(tmp_path / "low" / "results.json")["runs"]
    config = test_function_config.get_config("smoke")
    experiment = dataclasses.replace(test_function.get_experiment(config), plot=None)
    default = runner.run(experiment, config, tmp_path / "default")["runs"]
    for run, expected in zip(runs, default):
        assert run["hparams"].get("chunk_size") == (1 if run["method"] == "zo" else None)
        assert run["hparams"].get("low_memory") == (True if run["method"] == "zo" else None)
        assert "chunk_size" not in expected["hparams"]  # None: the method's default, not recorded
        assert "low_memory" not in expected["hparams"]
        np.testing.assert_allclose(run["metrics"]["hessian_trace"][-1],
                                   expected["metrics"]["hessian_trace"][-1], rtol=1e-3)


def test_a_workdir_of_an_older_runner_is_an_error_without_traceback(tmp_path, cli_env):
    config = test_function_config.get_config("smoke")
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)  # per-group checkpoints, no version
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "test_function",
                                                      "config": config.to_dict()}))
    old = cli("--workdir", str(tmp_path), env=cli_env)
    assert old.returncode == 1
    assert "written by an older version" in old.stderr and "--overwrite" in old.stderr
    assert "Traceback" not in old.stderr


def test_diverging_members_fail_the_command_then_overwrite(tmp_path, cli_env):
    # A learning rate traced like the smoke run's: its cached program, only the values differ.
    result = cli("--workdir", str(tmp_path), "--config.zo.learning_rate=1e4", env=cli_env)
    assert result.returncode == 1
    assert "non-finite values: 'zo(smoothing=0.1)' from step" in result.stderr
    assert "'zo(smoothing=0.01)' from step" in result.stderr
    runs = strict_json(tmp_path / "results.json")["runs"]
    assert [run["metrics"]["loss"][-1] is None for run in runs] == [False, True, True, True, False]

    # Another config for this workdir is an error naming the field, until --overwrite.
    mismatch = cli("--workdir", str(tmp_path), env=cli_env)
    assert mismatch.returncode == 1
    assert "zo.learning_rate: [10000.0] in the workdir, [0.001] now" in mismatch.stderr
    assert "--overwrite" in mismatch.stderr and "Traceback" not in mismatch.stderr
    overwritten = cli("--workdir", str(tmp_path), "--overwrite", env=cli_env)
    assert overwritten.returncode == 0, overwritten.stderr
    runs = strict_json(tmp_path / "results.json")["runs"]
    assert all(None not in run["metrics"]["loss"] for run in runs)


def test_figure1_zo_flattens_and_gd_does_not(tmp_path):
    """The paper's setting on a coarse schedule (100k steps take about a second)."""
    config = test_function_config.get_config()
    config.eval_every = 10_000
    config.log_evals = 0
    config.evals_per_chunk = 8  # as the smoke config's: the same compiled programs
    experiment = dataclasses.replace(test_function.get_experiment(config), plot=None)
    results = runner.run(experiment, config, tmp_path)
    start, end = {}, {}
    for run in results["runs"]:
        trace = run["metrics"]["hessian_trace"]
        start[run["name"]], end[run["name"]] = trace[0], trace[-1]
    ratio = {name: end[name] / start[name] for name in start}
    assert 150 < start["gd"] < 160  # the paper's figure starts near 155
    assert ratio["zo(smoothing=0.1)"] < 0.3  # ZO flattens...
    assert ratio["gd"] > 0.75 and ratio["forward_grad"] > 0.75  # ...GD and λ → 0 do not
    assert ratio["zo(smoothing=0.1)"] < ratio["zo(smoothing=0.05)"] < 0.9
    assert abs(ratio["zo(smoothing=0.01)"] - 1) < 0.1  # λ = 0.01 barely moves
    losses = {run["name"]: run["metrics"]["loss"][-1] for run in results["runs"]}
    assert losses["gd"] < 1e-10 and losses["zo(smoothing=0.1)"] < 1e-2  # all reach a minimizer


def test_quickstart(capsys):
    params = quickstart.main(num_steps=20_000, print_every=10_000)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "GD", "loss", "GD", "trace", "ZO", "loss", "ZO", "trace"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "10000", "20000"]
    gd_trace, zo_trace = (float(lines[-1].split()[i]) for i in (2, 4))
    start = float(lines[1].split()[2])
    assert zo_trace < 0.9 * start < gd_trace
    assert set(params) == {"GD", "ZO"} and np.isfinite(params["ZO"]["y"]).all()
