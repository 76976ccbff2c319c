"""ZO-I vs ZO-co vs ZO-NP at equal query budgets (experiments/natural_perturbations.py) on its
smoke config: the results schema, the budgets, MNIST from tiny IDX files, and bad input."""

import json
import math

import numpy as np
import pytest

from configs import natural_perturbations as np_config
from experiments import natural_perturbations as experiment
from experiments import runner
from zojax import datasets

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("natural_perturbations")
    config = np_config.get_config("smoke")
    return config, workdir, experiment.train_and_evaluate(config, workdir)


def test_smoke_results_schema_and_equal_budgets(smoke):
    config, workdir, results = smoke
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["experiment"] == "natural_perturbations"
    runs = results["runs"]
    expected = len(config.models) * len(config.methods) * len(config.num_perturbations) * len(
        config.seeds)
    assert len(runs) == expected
    assert {r["method"] for r in runs} == {"zo_i", "zo_co", "zo_np"}
    for run in runs:
        h = run["hparams"]
        assert h["dataset"] == "digits" and h["model"] in config.models
        assert h["peak_memory_bytes"] > 0 and h["params"] > 0
        queries = run["num_queries"]
        assert queries[-1] <= config.query_budget
        q = h["num_directions"]
        if run["method"] == "zo_np":  # Jacobian probes counted: fewer steps
            assert queries[-1] > run["steps"][-1] * (q + 1)
        else:
            assert queries[-1] == run["steps"][-1] * (q + 1)
            assert config.query_budget - queries[-1] < q + 1
        assert all(math.isfinite(v) for v in run["metrics"]["test_accuracy"])
    # Seeds of one (method, Q) share a program; ZO-NP runs fewer steps than ZO-I.
    by = {}
    for run in runs:
        by.setdefault((run["method"], run["hparams"]["num_directions"]), []).append(run)
    for group in by.values():
        assert len({r["wall_seconds"] for r in group}) == 1
    for q in config.num_perturbations:
        assert by[("zo_np", q)][0]["steps"][-1] < by[("zo_i", q)][0]["steps"][-1]
    # ZO-NP's memory exceeds ZO-I's by its stored blocks (and not by much more).
    zo_i, zo_np = by[("zo_i", 2)][0]["hparams"], by[("zo_np", 2)][0]["hparams"]
    assert zo_np["peak_memory_bytes"] > zo_i["peak_memory_bytes"]
    assert (workdir / "natural_perturbations.png").exists()
    assert (workdir / "natural_perturbations_q_sweep.png").exists()
    assert "ZO-NP − ZO-I" in experiment.summary(results)


def test_the_budget_gives_the_steps():
    hparams = {"num_directions": 10, "max_block_size": 64, "fisher_inputs": 8,
               "update_every": 50, "jacobian": "zeroth_order"}
    assert experiment.num_steps("zo_i", hparams, 1_000) == 90
    refresh = 65 * 8
    steps = experiment.num_steps("zo_np", hparams, 100_000)
    used = steps * 11 + math.ceil(steps / 50) * refresh
    assert used <= 100_000 < (steps + 1) * 11 + math.ceil((steps + 1) / 50) * refresh
    assert experiment.num_steps("zo_np", hparams, 11 + refresh - 1) == 0


def test_mnist_from_idx_files(tmp_path):
    """An IDX dataset runs when its files are present (tiny 8×8 'MNIST' written here)."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 32)):
        images_file, labels_file = datasets.IDX_FILES[split]
        labels = rng.integers(0, 10, n)
        images = (rng.integers(0, 40, (n, 8, 8)) + 20 * labels[:, None, None]).astype(np.uint8)
        for name, array in ((images_file, images), (labels_file, labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                int(d).to_bytes(4, "big") for d in array.shape)
            (folder / name).write_bytes(header + array.astype(np.uint8).tobytes())
    config = np_config.get_config("smoke")
    config.datasets = ("mnist",)
    config.data_dir = str(tmp_path)
    config.methods = ("zo_i",)
    config.num_perturbations = (2,)
    config.seeds = (0,)
    results = experiment.train_and_evaluate(config, tmp_path / "run")
    assert [r["hparams"]["dataset"] for r in results["runs"]] == ["mnist"]


@pytest.mark.parametrize("field,value,match", [
    ("models", ("resnet",), "config.models"),
    ("datasets", ("cifar10",), "config.datasets"),
    ("num_perturbations", (0,), "config.num_perturbations"),
    ("query_budget", 100, "config.query_budget"),
    ("query_budget", 0, "config.query_budget"),
    ("methods", ("zo_x",), "config.methods"),
])
def test_bad_config_names_the_field(tmp_path, field, value, match):
    config = np_config.get_config("smoke")
    config[field] = value
    with pytest.raises(runner.ConfigError, match=match):
        experiment.get_experiment(config)


def test_missing_idx_files_are_skipped_or_named(tmp_path):
    config = np_config.get_config("smoke")
    config.datasets = ("fashion_mnist",)
    config.data_dir = str(tmp_path)
    with pytest.raises(runner.ConfigError, match="none of the datasets"):
        experiment.get_experiment(config)
    config.skip_missing = False
    with pytest.raises(runner.ConfigError, match="train-images-idx3-ubyte"):
        experiment.get_experiment(config)
