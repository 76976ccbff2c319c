"""Figure 2 (experiments/linear_models.py): smoke run end to end, real w5a, bad input."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ and configs/ are not installed

from configs import linear_models as linear_models_config  # noqa: E402
from experiments import linear_models, linear_tasks, runner  # noqa: E402
from zojax import datasets  # noqa: E402
from zojax.problems import linear  # noqa: E402

DATA_ROOT = ROOT.parent / "shared" / "data"
METRICS = {"loss", "hessian_trace", "train_accuracy", "test_loss", "test_hessian_trace",
           "test_accuracy"}


def strict_json(path):
    def reject(constant):
        raise ValueError(f"{constant} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke variant end to end (synthetic a5a-shaped data): (config, workdir, results)."""
    config = linear_models_config.get_config("smoke")
    workdir = tmp_path_factory.mktemp("smoke")
    return config, workdir, linear_models.train_and_evaluate(config, workdir)


def test_smoke_results_schema_and_plot(smoke):
    config, workdir, results = smoke
    assert strict_json(workdir / "results.json") == results
    assert results["experiment"] == "linear_models"
    assert results["config"]["datasets"] == ["synthetic"]
    names = [run["name"] for run in results["runs"]]
    assert names == ["synthetic/svm/gd", "synthetic/svm/zo", "synthetic/logistic/gd",
                     "synthetic/logistic/zo"]
    steps = runner.eval_steps(config).tolist()
    assert steps[0] == 0 and steps[-1] == config.num_steps
    for run in results["runs"]:
        assert set(run) == {"name", "method", "hparams", "steps", "metrics", "num_queries",
                            "wall_seconds", "compile_seconds"}
        dataset, loss, method = run["name"].split("/")
        assert run["method"] == method
        assert run["hparams"]["dataset"] == dataset and run["hparams"]["loss"] == loss
        assert run["hparams"]["seed"] == 0
        assert run["hparams"]["learning_rate"] == config[loss][method].learning_rate[0]
        assert run["steps"] == steps
        assert set(run["metrics"]) == METRICS
        for values in run["metrics"].values():
            assert len(values) == len(steps) and all(np.isfinite(values))
        per_step = 1 if method == "gd" else 2  # ZO central, one direction: 2 queries per step
        assert run["num_queries"] == [per_step * s for s in steps]
        assert run["wall_seconds"] > 0
    # Every run of a (dataset, loss) starts from the same point.
    by_loss = {}
    for run in results["runs"]:
        by_loss.setdefault(run["hparams"]["loss"], set()).add(run["metrics"]["hessian_trace"][0])
    assert all(len(starts) == 1 for starts in by_loss.values())
    for suffix in (".png", ".pdf"):
        assert (workdir / f"linear_models{suffix}").stat().st_size > 0


def test_plot_layout(smoke):
    _, _, results = smoke
    figure = linear_models.plot(results)
    axes = np.array(figure.axes).reshape(3, 2)  # rows: loss, trace, accuracy; (dataset, loss)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["train loss", "train tr ∇²f",
                                                      "test accuracy"]
    assert "SVM" in axes[0, 0].get_title() and "logistic" in axes[0, 1].get_title()
    assert all(ax.get_xscale() == "log" for ax in axes.flat)
    styles = {line.get_label(): line.get_linestyle() for line in axes[1, 0].get_lines()}
    assert styles == {"GD (η=0.0001)": "--", "ZO (λ=0.05, η=0.0001)": "-"}


def test_summary_and_rerun_is_a_no_op(smoke, capsys):
    config, workdir, results = smoke
    again = linear_models.train_and_evaluate(config, workdir)  # finished: summary only
    assert again == results
    out = capsys.readouterr().out
    assert out.startswith(f"Figure 2, {config.num_steps} steps")
    assert "synthetic/logistic/zo" in out and "test acc" in out


def test_closed_form_traces_match_zojax_hessian_trace():
    """The reference the runner compares with at the first and last evaluation."""
    data = datasets.synthetic_libsvm(seed=1, like="w1a")
    train, test = linear.random_features(jax.random.key(0), data.train_inputs,
                                         data.test_inputs, num_features=200)
    args = (train, jnp.asarray(data.train_labels), test, jnp.asarray(data.test_labels))
    ws = jnp.stack([linear.init_params(jax.random.key(2), train.shape[1], scale)
                    for scale in (0.1, 1.0)])
    for loss in ("svm", "logistic", "clipped_logistic"):
        metrics, reference = linear_models.METRICS[loss], linear_tasks._reference(loss, 64)
        both = jax.jit(jax.vmap(lambda w, metrics=metrics, reference=reference: (
            metrics(w, *args)["hessian_trace"], reference(w, *args))))
        ours, exact = both(ws)
        np.testing.assert_allclose(ours, exact, rtol=1e-4)


def test_fast_features_equal_the_library_map():
    """The map's X·w with Φᵀ (the experiment's), with Φ (a map built from five fields) and the
    dense X: same values under jit, vmap, nested vmap, grad and vmap(grad), and in the line form
    of vmapped weights sharing a direction."""
    data = datasets.synthetic_libsvm(seed=0, like="a1a")
    train, _ = linear.random_features(jax.random.key(0), data.train_inputs, num_features=300)
    labels = jnp.asarray(data.train_labels)
    w = linear.init_params(jax.random.key(1), train.shape[1], 0.5)
    ws = w * jnp.linspace(0.5, 2.0, 6)[:, None]

    @jax.jit
    def everything(features):
        out = []
        steps = jnp.array([0.1, -0.1])
        for loss in (linear.svm_loss, linear.logistic_loss):
            batched = jax.vmap(loss, (0, None, None))
            out += [loss(w, features, labels), batched(ws, features, labels),
                    jax.vmap(loss.along, (0, None, None, None, None))(  # a sweep's line form
                        ws, w[::-1], steps, features, labels),
                    jax.vmap(batched, (0, None, None))(ws.reshape(2, 3, -1), features, labels),
                    jax.grad(loss)(w, features, labels),
                    jax.vmap(jax.grad(loss), (0, None, None))(ws, features, labels)]
        return out

    assert train.inputs_t is not None
    expected = everything(train.dense())
    for features in (train, linear.AffineFeatures(*train[:5])):
        for ours, theirs in zip(everything(features), expected, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=2e-5,
                                       atol=2e-6 * float(jnp.max(jnp.abs(theirs))))


def test_clipped_logistic_loss_option(tmp_path):
    """config.logistic_loss="clipped": the logistic runs train and record sklearn's clipped loss
    (same results.json fields and names), the SVM runs are unchanged."""
    config = linear_models_config.get_config("smoke")
    config.num_steps, config.methods = 20, ("zo",)
    config.logistic_loss = "clipped"
    experiment = dataclasses.replace(linear_models.get_experiment(config), plot=None)
    problems = {m.name: m.problem for m in experiment.members}
    assert problems["synthetic/logistic/zo"].loss is linear_models.OBJECTIVES["clipped_logistic"]
    assert problems["synthetic/svm/zo"].loss is linear_models.OBJECTIVES["svm"]
    results = runner.run(experiment, config, tmp_path)
    assert results["config"]["logistic_loss"] == "clipped"
    assert [r["hparams"]["loss"] for r in results["runs"]] == ["svm", "logistic"]
    title = linear_models.plot(results).axes[1].get_title()
    assert title.startswith(linear.LOSSES["clipped_logistic"].title)


def test_sweep_member_equals_standalone_run(tmp_path):
    """A λ/η sweep is one vmapped program per (dataset, loss); its members match lone runs."""

    def run(smoothing, learning_rate, workdir):
        config = linear_models_config.get_config("smoke")
        config.num_steps, config.losses, config.methods = 100, ("logistic",), ("zo",)
        config.logistic.zo.smoothing, config.logistic.zo.learning_rate = smoothing, learning_rate
        experiment = dataclasses.replace(linear_models.get_experiment(config), plot=None)
        return experiment, runner.run(experiment, config, workdir)

    experiment, swept = run((0.05, 0.1), (0.01, 0.02), tmp_path / "sweep")
    assert len(experiment.members) == 4
    _, alone = run((0.1,), (0.02,), tmp_path / "alone")
    assert len({run["wall_seconds"] for run in swept["runs"]}) == 1  # one compiled program
    member = next(r for r in swept["runs"]
                  if r["name"] == "synthetic/logistic/zo(learning_rate=0.02,smoothing=0.1)")
    assert member["hparams"] == alone["runs"][0]["hparams"]
    for name, values in alone["runs"][0]["metrics"].items():
        if name.endswith("accuracy"):  # a flip of a point on the boundary is 1/N
            np.testing.assert_allclose(member["metrics"][name], values, atol=2.5 / 6414)
        else:
            np.testing.assert_allclose(member["metrics"][name], values, rtol=1e-5)


@pytest.mark.skipif(not (DATA_ROOT / "libsvm" / "w5a").exists(),
                    reason=f"real LIBSVM w5a not found under {DATA_ROOT / 'libsvm'}")
def test_real_w5a_short_run(tmp_path):
    """The real w5a files through the whole pipeline (logistic regression, 200 steps)."""
    config = linear_models_config.get_config()
    config.data_dir = str(DATA_ROOT)
    config.datasets, config.losses = ("w5a",), ("logistic",)
    config.num_features, config.num_steps, config.log_evals = 500, 200, 0
    config.evals_per_chunk, config.reference_chunk_size = 21, 501
    experiment = dataclasses.replace(linear_models.get_experiment(config), plot=None)
    features = experiment.members[0].problem.data
    assert features[0].shape == (9_888, 501) and features[2].shape == (39_861, 501)
    results = runner.run(experiment, config, tmp_path)
    runs = {run["name"]: run["metrics"] for run in results["runs"]}
    assert list(runs) == ["w5a/logistic/gd", "w5a/logistic/zo"]
    for name, metrics in runs.items():
        assert len(metrics["loss"]) == 21
        assert metrics["loss"][-1] < metrics["loss"][0], name
    assert runs["w5a/logistic/gd"]["test_accuracy"][-1] > 0.85
    # Already after 200 steps GD has raised the trace more than ZO has.
    trace = {name: metrics["hessian_trace"] for name, metrics in runs.items()}
    assert trace["w5a/logistic/zo"][-1] < trace["w5a/logistic/gd"][-1]


@pytest.mark.parametrize("field, value", [
    ("svm.zo.learning_rate", (0.0,)), ("logistic.gd.learning_rate", (-0.01,)),
    ("svm.zo.smoothing", (0.05, -0.05)), ("logistic.zo.smoothing", (0.0,)),
    ("num_steps", 0), ("eval_every", -10), ("num_features", 0), ("init_scale", 0.0),
])
def test_bad_config_values_name_the_field(field, value, tmp_path):
    config = linear_models_config.get_config("smoke")
    node, _, name = field.rpartition(".")
    (config[node.split(".")[0]][node.split(".")[1]] if node else config)[name] = value
    with pytest.raises(runner.ConfigError, match=f"config.{field} must be positive"):
        linear_models.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("losses", ("svm", "hinge"), "config.losses must be"),
    ("losses", ("clipped_logistic",), "config.losses must be"),
    ("logistic_loss", "sklearn", r"config.logistic_loss must be one of \('exact', 'clipped'\)"),
    ("methods", ("sgd",), "config.methods must be"),
    ("datasets", ("synthetic-z9z",), "synthetic-<name> of a LIBSVM dataset"),
    ("datasets", (), "config.datasets must name"),
    ("seed", (-1,), "config.seed must be"),
    ("datasets", ("synthetic", "synthetic"), "config.datasets has repeated values"),
])
def test_bad_config_choices(field, value, message):
    config = linear_models_config.get_config("smoke")
    config[field] = value
    with pytest.raises(runner.ConfigError, match=message):
        linear_models.get_experiment(config)


def test_missing_data_fails_fast_with_the_loaders_message(tmp_path):
    config = linear_models_config.get_config()
    config.data_dir = str(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="LIBSVM dataset 'a7a' not found") as error:
        linear_models.train_and_evaluate(config, tmp_path / "run")
    assert str(tmp_path / "data" / "libsvm" / "a7a.t") in str(error.value)
    assert isinstance(error.value, runner.ConfigError)  # the CLI prints it without a traceback
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="Unknown variant 'fast'"):
        linear_models_config.get_config("fast")


def test_command_line_missing_data(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.linear_models", "--config",
         "configs/linear_models.py", f"--config.data_dir={tmp_path}", "--workdir",
         str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: LIBSVM dataset 'a7a' not found" in result.stderr
    assert "Traceback" not in result.stderr
