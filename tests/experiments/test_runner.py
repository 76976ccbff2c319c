"""The shared experiment runner: vmapped members, resume, workdir rules, bad input, divergence."""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # experiments/, configs/

from configs import test_function as test_function_config  # noqa: E402
from experiments import runner, test_function  # noqa: E402
from experiments.runner import groups as runner_groups  # noqa: E402
from experiments.runner import loop  # noqa: E402


def run_smoke(config, workdir, **kwargs):
    """Figure 1 without its plot (drawn by the tests that check it)."""
    experiment = dataclasses.replace(test_function.get_experiment(config), plot=None)
    return runner.run(experiment, config, workdir, **kwargs)


def without_timings(results):
    return {**results, "runs": [{k: v for k, v in run.items()
                                 if k not in ("wall_seconds", "compile_seconds")}
                                for run in results["runs"]]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """An uninterrupted smoke run of Figure 1: (config, workdir, results)."""
    config = test_function_config.get_config("smoke")
    workdir = tmp_path_factory.mktemp("smoke")
    return config, workdir, test_function.train_and_evaluate(config, workdir)


# A well-conditioned problem (its loss stays away from 0), so that float32 rounding differences
# between a vmapped and a standalone program stay at rounding level: logistic regression on
# random data. (Figure 1's loss near a minimizer is the square of a residual cancelling to
# ~1e-3: there last-bit differences show up as percent-level loss differences, one reason its
# config runs its members with batch_members="separate", each a standalone run.)
def logistic_loss(w, x, y):
    return jnp.mean(jax.nn.softplus(-y * (x @ w)))


def logistic_metrics(w, x, y):
    p = jax.nn.sigmoid(x @ w)
    trace = jnp.mean(p * (1 - p) * jnp.sum(x**2, axis=1))
    return {"loss": logistic_loss(w, x, y), "hessian_trace": trace}


def schedule_config(**overrides):
    config = ml_collections.ConfigDict(dict(
        num_steps=300, eval_every=50, log_evals=0, evals_per_chunk=3, checkpoint_every=100,
        rng_impl="philox4x32"))
    config.update(overrides)
    return config


def logistic_experiment(seeds=(0, 1)):
    x = jax.random.normal(jax.random.key(1), (64, 10))
    noise = jax.random.normal(jax.random.key(2), (64,))
    y = jnp.sign(x @ jnp.linspace(-1.0, 1.0, 10) + 0.5 * noise)
    problem = runner.Problem(logistic_loss, logistic_metrics, jnp.zeros(10), data=(x, y))
    members = (
        runner.sweep("gd", {"learning_rate": (0.5, 0.1)}, problem)
        + runner.sweep("zo", {"learning_rate": (0.1, 0.05), "smoothing": (0.1, 0.01),
                              "num_directions": 2, "seed": seeds}, problem)
    )
    return runner.Experiment("logistic", members)


@pytest.mark.parametrize("seeds", [(0, 1), (0,)])
def test_vmapped_members_equal_standalone_runs(tmp_path, seeds):
    experiment = logistic_experiment(seeds)
    config = schedule_config()  # batch_members: "vmap" (the default)
    together = runner.run(experiment, config, tmp_path / "together")
    groups = runner_groups.make_groups(experiment, "threefry2x32")
    assert len(groups) == 2  # gd, zo
    # One seed: the ZO members share their keys, and the program draws each direction once.
    assert groups[1].program.shared_keys == (len(seeds) == 1)
    for member, run in zip(experiment.members, together["runs"]):
        alone = runner.run(runner.Experiment("logistic", [member]), config,
                           tmp_path / member.name)["runs"][0]
        assert alone["steps"] == run["steps"] and alone["num_queries"] == run["num_queries"]
        for name, values in run["metrics"].items():
            np.testing.assert_allclose(values, alone["metrics"][name], rtol=1e-5,
                                       err_msg=f"{member.name} {name}")


@pytest.mark.parametrize("seeds", [(0, 1), (0,)])
def test_vmapped_zo_adam_members_equal_standalone_runs(tmp_path, seeds):
    """ZO-Adam's inner step counter depends on the member (zojax.chain keeps it on a skipped
    step), so it cannot enter the vmap shared: the program batches that leaf alone."""
    x = jax.random.normal(jax.random.key(1), (64, 10))
    y = jnp.sign(x @ jnp.linspace(-1.0, 1.0, 10))
    problem = runner.Problem(logistic_loss, logistic_metrics, jnp.zeros(10), data=(x, y))
    members = runner.sweep("zo_adam", {"learning_rate": (0.1, 0.05), "smoothing": 0.01,
                                       "num_directions": 2, "seed": seeds}, problem)
    methods = {"zo_adam": runner.method("zo_adam")}
    config = schedule_config(num_steps=100)
    together = runner.run(runner.Experiment("zo_adam", members, methods=methods), config,
                          tmp_path / "together")
    for member, run in zip(members, together["runs"]):
        alone = runner.run(runner.Experiment("zo_adam", [member], methods=methods), config,
                           tmp_path / member.name)["runs"][0]
        assert alone["steps"] == run["steps"] and alone["num_queries"] == run["num_queries"]
        for name, values in run["metrics"].items():
            np.testing.assert_allclose(values, alone["metrics"][name], rtol=1e-5,
                                       err_msg=f"{member.name} {name}")


def test_figure1_members_equal_standalone_runs(smoke, tmp_path):
    config, _, results = smoke
    assert config.batch_members == "separate"  # the λ sweep: one compilation, runs side by side
    experiment = test_function.get_experiment(config)
    for member, run in zip(experiment.members, results["runs"]):
        if member.method != "zo":
            continue
        alone = runner.run(runner.Experiment("test_function", [member]), config,
                           tmp_path / member.name)["runs"][0]
        for name, values in run["metrics"].items():
            np.testing.assert_allclose(values, alone["metrics"][name], rtol=1e-5,
                                       err_msg=f"{member.name} {name}")


def test_results_schema(smoke):
    config, workdir, results = smoke
    assert json.loads((workdir / "results.json").read_text()) == results
    assert set(results) == {"experiment", "config", "runs"}
    assert results["config"] == json.loads(json.dumps(config.to_dict()))
    steps = runner.eval_steps(config).tolist()
    assert steps[0] == 0 and steps[-1] == config.num_steps
    for run in results["runs"]:
        assert set(run) == {"name", "method", "hparams", "steps", "metrics", "num_queries",
                            "wall_seconds", "compile_seconds"}
        assert run["steps"] == steps
        assert set(run["metrics"]) == {"loss", "hessian_trace"}
        assert all(len(v) == len(steps) for v in run["metrics"].values())
        per_step = {"gd": 1, "zo": 2, "forward_grad": 1}[run["method"]]
        assert run["num_queries"] == [per_step * s for s in steps]
        assert run["wall_seconds"] > 0 and run["compile_seconds"] >= 0
    assert [r["name"] for r in results["runs"]] == [
        "gd", "zo(smoothing=0.1)", "zo(smoothing=0.05)", "zo(smoothing=0.01)", "forward_grad"]
    assert results["runs"][1]["hparams"] == {
        "learning_rate": 0.001, "smoothing": 0.1, "num_directions": 1, "direction": "gaussian",
        "scheme": "central", "seed": 0}
    assert (workdir / "test_function.png").stat().st_size > 0
    assert (workdir / "test_function.pdf").stat().st_size > 0


def test_resume_after_sigint_equals_uninterrupted_run(smoke, tmp_path, monkeypatch):
    config, _, expected = smoke
    compile_groups = runner_groups.compile_groups

    def compile_then_interrupt(*args):  # the signal arrives while compiling
        seconds = compile_groups(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return seconds

    monkeypatch.setattr(runner_groups, "compile_groups", compile_then_interrupt)
    with pytest.raises(runner.Interrupted, match="SIGINT at step"):
        run_smoke(config, tmp_path)
    assert not (tmp_path / "results.json").exists()
    steps = runner.eval_steps(config)
    first_chunk_end = steps[runner.chunk_size(len(steps), config.evals_per_chunk) - 1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(first_chunk_end)]
    monkeypatch.undo()
    resumed = run_smoke(config, tmp_path)
    assert without_timings(resumed) == without_timings(expected)


def test_resume_from_an_older_checkpoint(smoke, tmp_path):
    config, _, expected = smoke
    run_smoke(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert len(steps) == 2  # max_to_keep
    # Lose the results and the last checkpoint, as if killed in between.
    (tmp_path / "results.json").unlink()
    shutil.rmtree(tmp_path / "checkpoints" / str(steps[-1]))
    resumed = run_smoke(config, tmp_path)
    assert without_timings(resumed) == without_timings(expected)


def test_finished_workdir_is_a_noop_that_redraws(smoke, monkeypatch, capsys):
    config, workdir, expected = smoke
    (workdir / "test_function.png").unlink()
    monkeypatch.setattr(loop, "train", lambda *args: pytest.fail("trained again"))
    assert test_function.train_and_evaluate(config, workdir) == expected
    assert (workdir / "test_function.png").exists()
    assert "Figure 1" in capsys.readouterr().out


def test_different_config_is_an_error_naming_fields_unless_overwrite(smoke, tmp_path):
    config, workdir, _ = smoke
    other = test_function_config.get_config("smoke")
    other.num_steps = 1000
    other.zo.smoothing = (0.2,)
    with pytest.raises(runner.ConfigMismatchError, match=r"num_steps: 2000 .* 1000") as error:
        run_smoke(other, workdir)
    assert "zo.smoothing" in str(error.value) and "--overwrite" in str(error.value)
    fresh = tmp_path / "fresh"
    run_smoke(config, fresh)
    results = run_smoke(other, fresh, overwrite=True)
    assert results["runs"][0]["steps"][-1] == 1000
    assert json.loads((fresh / "results.json").read_text())["config"]["num_steps"] == 1000


@pytest.mark.parametrize("field, value", [
    ("num_steps", 0), ("eval_every", -10), ("evals_per_chunk", 0), ("checkpoint_every", 0),
    ("gd.learning_rate", (0.0,)), ("zo.learning_rate", (-0.1,)), ("zo.smoothing", (0.1, 0.0)),
    ("zo.smoothing", (float("nan"),)), ("forward_grad.learning_rate", (-1.0,)), ("dim", 0),
    ("init_scale", -1.0),
])
def test_non_positive_values_are_errors_naming_the_field(tmp_path, field, value):
    config = test_function_config.get_config("smoke")
    *parents, name = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value
    with pytest.raises(ValueError, match=rf"config\.{field} must be positive"):
        run_smoke(config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_missing_schedule_field_is_an_error(tmp_path):
    config = schedule_config()
    del config["evals_per_chunk"]
    with pytest.raises(ValueError, match=r"config lacks \['evals_per_chunk'\]"):
        runner.run(logistic_experiment(), config, tmp_path)


def test_unknown_batch_members_is_an_error(tmp_path):
    config = schedule_config(batch_members="map")  # the old name of "separate"
    with pytest.raises(ValueError, match=r"batch_members must be one of \('vmap', 'separate'\)"):
        runner.run(logistic_experiment(), config, tmp_path)


def test_bad_members_are_errors():
    problem = runner.Problem(logistic_loss, logistic_metrics, jnp.zeros(3))
    experiment = runner.Experiment("x", [runner.Member("m", "adam", {}, problem)])
    with pytest.raises(ValueError,
                       match=r"unknown method 'adam'.*'forward_grad', 'gd', 'zest', 'zo'"):
        runner_groups.make_groups(experiment, None)
    twice = runner.Member("m", "gd", {"learning_rate": 0.1}, problem)
    with pytest.raises(ValueError, match="distinct names"):
        runner_groups.make_groups(runner.Experiment("x", [twice, twice]), None)
    negative = runner.Member("m", "gd", {"learning_rate": -0.1}, problem)
    with pytest.raises(ValueError, match="member 'm': learning_rate must be positive"):
        runner_groups.make_groups(runner.Experiment("x", [negative]), None)


@pytest.mark.parametrize("batching", ["separate", "vmap"])
def test_diverging_members_are_marked_and_the_others_finish(smoke, tmp_path, batching):
    config = test_function_config.get_config("smoke")
    config.batch_members = batching  # "vmap": a diverging member inside a vmapped group
    # Members shaped like the smoke run's (1 GD, 3 ZO, 1 forward_grad): its compiled programs.
    config.gd.learning_rate = (100.0,)  # GD's loss overflows
    config.zo.learning_rate = (0.001, 0.002, 1e4)  # ZO's evaluations overflow: num_nonfinite
    config.zo.smoothing = (0.1,)
    with pytest.raises(runner.NonFiniteError) as error:
        run_smoke(config, tmp_path)
    message = str(error.value)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {run["name"]: run for run in results["runs"]}
    failed = runner.non_finite_members(results)
    assert set(failed) == {"gd", "zo(learning_rate=10000.0)"}
    for name, step in failed.items():
        assert f"'{name}' from step {step}" in message
        losses = runs[name]["metrics"]["loss"]
        first = runs[name]["steps"].index(step)
        assert all(v is not None for v in losses[:first])
        assert all(v is None for v in losses[first:])
        assert all(v is None for v in runs[name]["metrics"]["hessian_trace"][first:])
        assert math.isnan(runner.metric_at(runs[name], "loss"))  # tables read null as NaN
        assert runner.metric_at(runs[name], "loss", 0) == losses[0]
        assert math.isnan(runner.metric_at(runs[name], "no_such_metric"))
    # The others are unaffected: they equal the smoke run's members with the same settings.
    expected = {run["name"]: run for run in smoke[2]["runs"]}
    assert runs["forward_grad"]["metrics"] == expected["forward_grad"]["metrics"]
    if batching == "separate":  # vmapped, last bits differ and grow on this problem
        np.testing.assert_allclose(runs["zo(learning_rate=0.001)"]["metrics"]["hessian_trace"],
                                   expected["zo(smoothing=0.1)"]["metrics"]["hessian_trace"],
                                   rtol=1e-6)
    assert all(v is not None for v in runs["zo(learning_rate=0.002)"]["metrics"]["loss"])
    # The last checkpoint holds the diverged members frozen at their last good point.
    # The last checkpoint holds the diverged members frozen at their last good evaluation, per
    # member whatever the grouping.
    from zojax.problems import test_function as h

    for name, run in runs.items():
        params = runner.load_member(tmp_path, name)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
        last_good = [v for v in run["metrics"]["loss"] if v is not None][-1]
        np.testing.assert_allclose(h.loss(params), last_good, rtol=1e-5, err_msg=name)


def test_eval_steps_and_sweep_names():
    config = schedule_config(num_steps=1000, eval_every=300, log_evals=4)
    assert runner.eval_steps(config).tolist() == [0, 1, 10, 100, 300, 600, 900, 1000]
    problem = runner.Problem(logistic_loss, logistic_metrics, jnp.zeros(3))
    members = runner.sweep("zo", {"learning_rate": (0.1, 0.2), "smoothing": (0.01,), "seed": 3},
                           problem)
    assert [m.name for m in members] == ["zo(learning_rate=0.1)", "zo(learning_rate=0.2)"]
    assert members[1].hparams == {"learning_rate": 0.2, "smoothing": 0.01, "seed": 3}


@pytest.mark.parametrize("num_evals, evals_per_chunk, size", [
    (1038, 200, 173), (1029, 100, 94), (51, 100, 51), (28, 8, 7), (11, 8, 6), (1, 5, 1),
    (9, 3, 3)])
def test_chunks_are_equal_and_as_few_as_allowed(num_evals, evals_per_chunk, size):
    assert runner.chunk_size(num_evals, evals_per_chunk) == size
    assert size <= evals_per_chunk
    num_chunks = -(-num_evals // size)
    assert num_chunks == -(-num_evals // evals_per_chunk)  # no more chunks than needed
    assert num_chunks * size - num_evals < num_chunks  # padding: less than one per chunk
