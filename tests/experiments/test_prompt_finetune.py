"""Prompt-based few-shot fine-tuning (experiments/prompt_finetune.py): the smoke config end to
end (every method, head and tuning), the results schema, the zero-shot and calibrated members
against a direct computation, the traces of a tuned part, and the config errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from configs import prompt_finetune as configs
from experiments import prompt_finetune as pf
from experiments import runner, text_tasks
from experiments.models import llama

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"



@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    config = configs.get_config("smoke")
    workdir = tmp_path_factory.mktemp("prompt_finetune")
    results = pf.train_and_evaluate(config, workdir)
    return config, workdir, results


def test_the_smoke_config_runs_every_method_head_and_tuning(smoke):
    config, workdir, results = smoke
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["runs"] == results["runs"]
    assert (workdir / f"{pf.NAME}.png").is_file()
    runs = results["runs"]
    assert {r["method"] for r in runs} == {"zero_shot", "sgd", "adam", "zo", "zest"}
    assert {(r["hparams"]["head"], r["hparams"]["tuned"]) for r in runs} == {
        ("prompt", "full"), ("prompt", "lora"), ("prompt", "prefix"), ("linear", "full")}
    for run in runs:
        h = run["hparams"]
        assert h["task"] == "synthetic" and h["template"] == "{x} It was"
        assert ("calibrated" in h) == (run["method"] == "zero_shot")
        budget = (0 if run["method"] == "zero_shot" else config.gd_steps
                  if run["method"] in pf.GRADIENT_METHODS else config.num_steps)
        assert run["steps"][-1] == budget
        for name in ("loss", "test_accuracy", "zo_trace", "zo_trace_stderr", "hutchinson_trace",
                     "hutchinson_trace_stderr"):
            assert np.all(np.isfinite(run["metrics"][name])), (run["name"], name)
    calibrated = [r for r in runs if r["hparams"].get("calibrated")]
    assert len(calibrated) == 1 and calibrated[0]["steps"] == [0]
    seeds = [r for r in runs if r["name"].startswith("synthetic/zo(")]
    assert len(seeds) == 2  # two seeds of every ZO method
    assert "| synthetic | zero-shot, calibrated | 0 |" in pf.summary(results)


def _problem(config, kind):
    loaded = pf.load_model(config)
    task = text_tasks.load_task("synthetic", config.k, None, None, config.data_seed)
    found, labels = pf.problems(config, task, loaded, {"prompt"}, need_prefix=False,
                                calibrate=kind == "calibrated")
    return found[kind], labels, loaded


def _run(results, name):
    return next(r for r in results["runs"] if r["name"] == f"synthetic/{name}")


def test_zero_shot_members_are_the_model_evaluated_as_it_is(smoke):
    config, _, results = smoke
    for kind, name in (("prompt", "zero_shot"), ("calibrated", "zero_shot_calibrated")):
        problem, labels, loaded = _problem(config, kind)
        scorer, bias, train, test, _ = problem.eval_data
        ids, mask, y, weights = (np.concatenate(x) for x in test)
        logits = np.asarray(jax.jit(scorer.logits)(loaded.params, ids, mask, bias))
        accuracy = np.sum(weights * (logits.argmax(-1) == y)) / weights.sum()
        np.testing.assert_allclose(_run(results, name)["metrics"]["test_accuracy"], [accuracy],
                                   rtol=1e-6)
    assert _run(results, "zero_shot_calibrated")["hparams"]["calibration_bias"] == (
        labels["calibration_bias"])


def test_the_calibration_bias_is_the_maximum_likelihood_one():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(60, 3)) * 2, rng.integers(0, 3, 60)
    bias = pf.calibration(logits, labels)
    z = logits + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # the likelihood's gradient in b vanishes: the mean predicted distribution is the labels'
    np.testing.assert_allclose(p.mean(0), np.bincount(labels, minlength=3) / 60, atol=1e-5)
    assert abs(bias.sum()) < 1e-5


def test_the_calibration_converges_where_a_label_word_is_far_below_the_others():
    # TREC on SmolLM2: some label words sit ~20 logits below the others, and a full Newton
    # step from b = 0 overshoots (it diverged to biases of ±5e8).
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(96, 6)) * 2 + np.array([0.0, -20.0, 3.0, -25.0, 1.0, -18.0])
    labels = np.repeat(np.arange(6), 16)
    bias = pf.calibration(logits, labels)
    assert np.all(np.isfinite(bias)) and np.abs(bias).max() < 100
    z = logits + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p.mean(0), np.full(6, 1 / 6), atol=1e-5)


def test_the_hutchinson_trace_of_a_lora_member_is_over_its_adapters(smoke):
    config, _, results = smoke
    problem, _, loaded = _problem(config, "prompt")
    scorer, bias, _, _, (ids, mask, y) = problem.eval_data
    adapters = zojax.lora.init(jax.random.key(0), loaded.params, runner.tuning.DEFAULT_PATHS[
        "lora"], config.zo_lora.lora_rank)
    trace, stderr = zojax.hutchinson_trace(
        lambda a: pf.batch_loss(zojax.lora.merge(loaded.params, a, config.zo_lora.lora_alpha),
                                (ids, mask, y), scorer, bias),
        jax.random.fold_in(jax.random.key(config.curvature_seed), 1), adapters,
        num_samples=config.hutchinson_samples)
    run = _run(results, "zo_lora(seed=0)")
    assert run["hparams"]["trace_of"] == "lora"
    np.testing.assert_allclose(run["metrics"]["hutchinson_trace"][0], trace, rtol=1e-4)
    np.testing.assert_allclose(run["metrics"]["hutchinson_trace_stderr"][0], stderr, rtol=1e-4)


def test_the_prompt_loss_is_the_label_words_cross_entropy():
    config = configs.get_config("smoke")
    problem, _, loaded = _problem(config, "prompt")
    ids, mask, y = (x[:4] for x in problem.batch_fn.arrays)
    scorer, bias = problem.data
    words = loaded.tokenizer.token_ids([" terrible", " great"])
    full = loaded.model.apply({"params": loaded.params}, ids, mask,
                              method=llama.Llama.last_logits)[:, jnp.asarray(words)]
    expected = optax.softmax_cross_entropy_with_integer_labels(full, y).mean()
    np.testing.assert_allclose(pf.batch_loss(loaded.params, (ids, mask, y), scorer, bias),
                               expected, rtol=1e-5)


def test_a_zero_step_member_must_not_be_negative(tmp_path):
    config = configs.get_config("smoke")
    problem, _, _ = _problem(config, "prompt")
    member = runner.Member("m", "zero_shot", {"seed": 0}, problem, -1)
    with pytest.raises(runner.ConfigError, match="num_steps must be a non-negative int"):
        runner.run(runner.Experiment("x", [member], methods=pf.METHODS), config, tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(tasks=("imdb",)), "config.tasks"),
    (dict(runs=("zo", "mezo")), "config.runs"),
    (dict(template="It was"), r"config.template must contain '\{x\}'"),
    (dict(verbalizer=(" terrible", " marvellous")), "' marvellous' is not one token"),
    (dict(verbalizer=(" great",)), "config.verbalizer must hold 2 label words"),
])
def test_bad_configs_name_the_field(change, match):
    config = configs.get_config("smoke")
    config.update(change)
    with pytest.raises(runner.ConfigError, match=match):
        pf.get_experiment(config)


@pytest.mark.skipif(not (DATA / "text" / "trec").is_dir(),
                    reason=f"the TREC files are not under {DATA / 'text'}")
def test_k_above_the_class_counts_names_the_field():
    config = configs.get_config("smoke")
    config.update(dict(tasks=("trec",), k=100, split=None, data_dir=str(DATA)))
    with pytest.raises(runner.ConfigError, match=r"config.k = 100 exceeds what trec allows"):
        pf.get_experiment(config)


def test_every_variant_builds():
    for arg in (None, "all", "splits", "paper"):
        config = configs.get_config(arg)
        assert set(runner.as_tuple(config.runs)) <= set(pf.RUNS)
    assert set(configs.get_config("all").runs) == set(pf.RUNS)
    with pytest.raises(ValueError, match="Unknown variant"):
        configs.get_config("fast")


@pytest.mark.skipif(not (DATA / "text" / "k-shot").is_dir(),
                    reason=f"the LM-BFF splits are not under {DATA / 'text'}")
def test_several_splits_give_each_its_members():
    config = configs.get_config("smoke")
    config.update(dict(tasks=("sst-2",), k=16, split="16-42", splits=("16-13", "16-42"),
                       data_dir=str(DATA), runs=("zero_shot", "zo")))
    members = pf.get_experiment(config).members
    assert [m.name for m in members] == [
        "sst-2@16-13/zero_shot", "sst-2@16-13/zo(seed=0)", "sst-2@16-13/zo(seed=1)",
        "sst-2@16-42/zero_shot", "sst-2@16-42/zo(seed=0)", "sst-2@16-42/zo(seed=1)"]
    assert members[0].labels["split"] == "16-13" and members[0].labels["num_train"] == 32
