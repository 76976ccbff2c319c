"""The runner's tuning fields (experiments.runner.tuning): LoRA and subset members of one problem
in one run, their checkpoints, step memory, and the errors of bad settings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import zojax
from experiments import runner
from zojax.lora import Adapter

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(32, 6)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(32, 4)), jnp.float32)
PARAMS = {"dense": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(4)},
          "prefix": {"key": jnp.zeros((2, 4))}}


def regression(params, x, y):
    prediction = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    return jnp.mean((prediction + jnp.sum(params["prefix"]["key"], 0) - y) ** 2)


def metrics(params, x, y):
    return {"loss": regression(params, x, y)}


PROBLEM = runner.Problem(regression, metrics, PARAMS, data=(X, Y), name="regression")
ZO = {"learning_rate": 0.02, "smoothing": 1e-2, "num_directions": 4}


def config():
    return ml_collections.ConfigDict(dict(num_steps=40, eval_every=20, log_evals=0,
                                          evals_per_chunk=2, checkpoint_every=1))


def test_lora_and_subset_members_train_what_they_tune(tmp_path):
    members = [
        *runner.sweep("zo", {**ZO, "tuning": "lora", "lora_rank": 2, "lora_alpha": 4.0,
                             "tuned_paths": "dense/kernel"}, PROBLEM, "lora"),
        *runner.sweep("zo", {**ZO, "tuning": "prefix"}, PROBLEM, "prefix"),
    ]
    results = runner.run(runner.Experiment("tuning", members), config(), tmp_path)
    runs = {run["name"]: run for run in results["runs"]}
    for run in runs.values():
        assert run["metrics"]["loss"][-1] < run["metrics"]["loss"][0]
    assert runs["lora"]["hparams"]["tuning"] == "lora"
    params = runner.load_params(runner.Experiment("tuning", members), config(), tmp_path)
    adapters = params["lora"]
    assert jax.tree.map(jnp.shape, adapters) == {"dense": {"kernel": Adapter((6, 2), (2, 4))}}
    assert jnp.any(adapters["dense"]["kernel"].b != 0)
    assert jax.tree.map(jnp.shape, params["prefix"]) == {"prefix": {"key": (2, 4)}}
    # the recorded loss is the merged params' loss
    merged = zojax.lora.merge(PARAMS, adapters, 4.0)
    np.testing.assert_allclose(runs["lora"]["metrics"]["loss"][-1], regression(merged, X, Y),
                               rtol=1e-5)


def test_step_memory_of_a_tuned_member():
    """Minibatches; the base params count once, as an argument of the step."""
    problem = runner.Problem(lambda params, batch: regression(params, *batch), metrics, PARAMS,
                             batch_fn=runner.Minibatches((X, Y), batch_size=8))
    lora = runner.step_memory(runner.METHODS["zo"], {**ZO, "tuning": "lora", "lora_rank": 1,
                                                     "tuned_paths": "dense/kernel"}, problem,
                              (X[:8], Y[:8]))
    assert lora >= sum(x.size * 4 for x in jax.tree.leaves(PARAMS))


@pytest.mark.parametrize("fields,message", [
    ({"tuning": "qlora"}, r"member 'zo': tuning must be one of \('full', 'lora', 'prefix'\)"),
    ({"tuning": "lora", "lora_rank": 0}, "lora_rank must be positive"),
    ({"tuning": "lora", "tuned_paths": "dense/.*"},
     r"member 'zo': tuning 'lora': .*LoRA adapts matrices; .*'dense/bias' is float32\[4\]"),
    ({"tuning": "prefix", "tuned_paths": "head/.*"},
     r"member 'zo': .*the path pattern 'head/\.\*' matches no parameter"),
    ({"tuned_paths": "dense/kernel"}, "tuned_paths needs tuning 'lora' or 'prefix'"),
    ({"lora_ranks": 2}, r"has no field 'lora_ranks'.*'tuning', 'lora_rank'"),
])
def test_bad_settings_are_errors_naming_the_member_and_field(fields, message, tmp_path):
    members = runner.sweep("zo", {**ZO, **fields}, PROBLEM)
    with pytest.raises(runner.ConfigError, match=message):
        runner.run(runner.Experiment("bad", members), config(), tmp_path)
