"""The ZO-Bench-style comparison (experiments/zo_bench.py): every method at the same query budget
end to end on the :smoke config (synthetic data, the embedded random model), and bad input."""

import json

import pytest

from configs.zo_bench import METHODS, get_config
from experiments import runner, zo_bench

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)


@pytest.fixture(scope="module")
def logistic_results(tmp_path_factory):
    config = get_config("smoke")
    config.problems = ("logistic",)
    workdir = tmp_path_factory.mktemp("zo_bench")
    return zo_bench.train_and_evaluate(config, workdir), workdir, config


def test_every_method_runs_at_the_query_budget(logistic_results):
    results, workdir, config = logistic_results
    runs = {run["method"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(METHODS)
    budget = config.logistic.query_budget
    for method, run in runs.items():
        queries = run["num_queries"][-1]
        per_step = zo_bench.METHODS[method].queries_per_step(config.logistic.hparams[method])
        assert budget - 2 * per_step < queries <= budget, (method, queries)
        assert run["hparams"]["step_memory_bytes"] > 0
        assert run["metrics"]["test_accuracy"][-1] is not None
    assert runs["fo_sgd"]["steps"][-1] == budget and runs["zo_sgd"]["steps"][-1] == budget // 2
    assert runs["fzoo"]["steps"][-1] == budget // 5  # N = 4 directions and f(x)
    # ZO-SVRG's state holds the snapshot and its estimate: more than ZO-SGD's step.
    assert (runs["zo_svrg"]["hparams"]["step_memory_bytes"]
            > runs["zo_sgd"]["hparams"]["step_memory_bytes"])
    saved = json.loads((workdir / "results.json").read_text())
    assert len(saved["runs"]) == len(METHODS)
    assert (workdir / "zo_bench.png").exists()
    rows = zo_bench.rows(results)
    assert {r["method"] for r in rows} == set(METHODS)
    assert "| logistic | FZOO |" in zo_bench.table(results)


def test_the_minilm_problem_gives_zo_svrg_its_large_batch(tmp_path):
    """The embedded random 2-layer model on the synthetic task: ZO-SVRG, its large batch through
    the extra update arguments (the other methods share the logistic test's wiring)."""
    config = get_config("smoke")
    config.problems = ("minilm",)
    config.methods = ("zo_svrg",)
    results = zo_bench.train_and_evaluate(config, tmp_path)
    for run in results["runs"]:
        assert run["num_queries"][-1] <= config.minilm.query_budget
        assert run["metrics"]["loss"][-1] is not None


@pytest.mark.parametrize("field, value, match", [
    ("methods", ("zo_sgd", "mezo"), "config.methods"),
    ("problems", ("cifar",), "config.problems"),
    ("logistic.query_budget", 0, "query_budget"),
    ("logistic.hparams.lozo.rank", 0, "rank"),
    ("logistic.hparams.zo_svrg.snapshot_every", -1, "snapshot_every"),
])
def test_bad_config_names_the_field(tmp_path, field, value, match):
    config = get_config("smoke")
    *parents, last = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[last] = value
    with pytest.raises(runner.ConfigError, match=match):
        zo_bench.get_experiment(config)


def test_a_missing_dataset_is_a_config_error(tmp_path):
    config = get_config("smoke")
    config.problems = ("logistic",)
    config.logistic.dataset = "a7a"
    config.data_dir = str(tmp_path)
    with pytest.raises(runner.ConfigError, match="config.logistic.dataset"):
        zo_bench.get_experiment(config)
