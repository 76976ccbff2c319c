"""The runner as a streaming trainer: a Flax MLP on scikit-learn's digits trained on minibatches
(GD and zo_sgd), resumed after SIGTERM, read back by load_member; per-member budgets, extra
update arguments, query counters, old workdirs, memory flat in the chunk length, bad input."""

import dataclasses
import json
import os
import pathlib
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # experiments/, configs/

from experiments import runner  # noqa: E402
from experiments.runner import groups as runner_groups  # noqa: E402
from experiments.runner import program  # noqa: E402


class MLP(nn.Module):
    """A ReLU MLP (Flax Linen: ``apply`` on a plain params dict, the module static)."""

    features: tuple[int, ...] = (32,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def cross_entropy(params, batch, module):
    inputs, labels = batch
    logits = module.apply(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def metrics(params, module, train_x, train_y, test_x, test_y):
    accuracy = jnp.mean(jnp.argmax(module.apply(params, test_x), -1) == test_y)
    return {"loss": cross_entropy(params, (train_x, train_y), module),
            "test_accuracy": accuracy}


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def digits_problem(digits, batch_fn=None, module=None):
    module = module or MLP()
    train_x, train_y, test_x, test_y = digits
    params = module.init(jax.random.key(0), train_x[:1])
    return runner.Problem(
        cross_entropy, metrics, params, data=(module,),
        batch_fn=batch_fn or runner.Minibatches((train_x, train_y), batch_size=64),
        eval_data=(module, *digits), name="digits-mlp")


def digits_experiment(problem):
    members = (runner.sweep("gd", {"learning_rate": 0.5}, problem)
               + runner.sweep("zo", {"learning_rate": 0.05, "smoothing": 0.01,
                                     "num_directions": 8, "seed": 0}, problem))
    return runner.Experiment("digits", members, progress_metrics=("loss",))


def digits_config(**overrides):
    config = ml_collections.ConfigDict(dict(
        num_steps=300, eval_every=50, log_evals=0, evals_per_chunk=2, checkpoint_every=1,
        data_seed=0))
    config.update(overrides)
    return config


def without_timings(results):
    return {**results, "runs": [{k: v for k, v in run.items()
                                 if k not in ("wall_seconds", "compile_seconds")}
                                for run in results["runs"]]}


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    return workdir, runner.run(digits_experiment(digits_problem(digits)), digits_config(),
                               workdir)


def test_flax_mlp_trains_on_minibatches(uninterrupted):
    _, results = uninterrupted
    runs = {run["name"]: run for run in results["runs"]}
    gd, zo = runs["gd"]["metrics"], runs["zo"]["metrics"]
    assert gd["loss"][0] == zo["loss"][0]  # the same start
    assert gd["loss"][-1] < 0.3 * gd["loss"][0] and gd["test_accuracy"][-1] > 0.85
    assert zo["loss"][-1] < 0.9 * zo["loss"][0]
    assert runs["zo"]["num_queries"] == [16 * s for s in runs["zo"]["steps"]]  # from its state
    assert runs["zo"]["compile_seconds"] > 0


def test_sigterm_resume_equals_the_uninterrupted_run(digits, uninterrupted, tmp_path,
                                                     monkeypatch):
    _, expected = uninterrupted
    run_chunk, sent = runner_groups.run_chunk, []

    def chunk_then_terminate(*args):  # one SIGTERM, after the first chunk (a second stops hard)
        run_chunk(*args)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    monkeypatch.setattr(runner_groups, "run_chunk", chunk_then_terminate)
    experiment = digits_experiment(digits_problem(digits))
    with pytest.raises(runner.Interrupted, match="SIGTERM at step 50"):
        runner.run(experiment, digits_config(), tmp_path)
    monkeypatch.undo()
    resumed = runner.run(experiment, digits_config(), tmp_path)
    assert without_timings(resumed) == without_timings(expected)


def test_load_member_reads_params_and_state_back(digits, uninterrupted):
    workdir, results = uninterrupted
    problem = digits_problem(digits)
    for run in results["runs"]:
        params = runner.load_member(workdir, run["name"])
        assert jax.tree.structure(params) == jax.tree.structure(problem.init_params)
        loss = cross_entropy(params, digits[:2], MLP())
        np.testing.assert_allclose(loss, run["metrics"]["loss"][-1], rtol=1e-5)
    params, opt_state = runner.load_member(workdir, "zo", with_state=True)
    assert int(opt_state[0]["num_queries"]) == results["runs"][1]["num_queries"][-1]
    earlier = runner.load_member(workdir, "gd", step=250)
    loss = cross_entropy(earlier, digits[:2], MLP())
    np.testing.assert_allclose(loss, results["runs"][0]["metrics"]["loss"][-2], rtol=1e-5)
    with pytest.raises(KeyError, match=r"no member 'adam'.*\['gd', 'zo'\]"):
        runner.load_member(workdir, "adam")
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7 "):
        runner.load_member(workdir, "gd", step=7)


def test_the_data_seed_picks_the_minibatches(digits, uninterrupted, tmp_path):
    _, expected = uninterrupted
    gd = [m for m in digits_experiment(digits_problem(digits)).members if m.method == "gd"]
    other = runner.run(runner.Experiment("digits", gd), digits_config(data_seed=1), tmp_path)
    assert other["runs"][0]["metrics"]["loss"][-1] != expected["runs"][0]["metrics"]["loss"][-1]


def test_members_with_their_own_budgets(digits, tmp_path):
    """An equal query budget at different q: q = 2 takes twice the steps of q = 4."""
    problem = digits_problem(digits)
    fields = {"learning_rate": 0.05, "smoothing": 0.01, "seed": 0}
    members = [dataclasses.replace(m, name=f"zo(q={q})", num_steps=1200 // (2 * q))
               for q in (2, 4) for m in runner.sweep("zo", {**fields, "num_directions": q},
                                                     problem)]
    config = digits_config(num_steps=100)  # the default budget, unused here
    results = runner.run(runner.Experiment("budget", members), config, tmp_path)
    short, long = (results["runs"][i] for i in (1, 0))
    assert long["steps"][-1] == 300 and short["steps"][-1] == 150
    assert long["num_queries"][-1] == short["num_queries"][-1] == 1200
    alone = runner.run(runner.Experiment("budget", members[1:]), config, tmp_path / "alone")
    assert without_timings(alone)["runs"][0] == without_timings(results)["runs"][1]
    assert runner.load_member(tmp_path, "zo(q=4)") is not None


def test_the_optimizer_gets_the_problems_extra_arguments(digits, tmp_path):
    """A method whose update reads an ``output_fn`` argument (as natural perturbations will)."""
    seen = []

    def uses_output_fn(key, hparams):
        del key

        def update(updates, state, params=None, *, output_fn, **extra):
            del extra
            seen.append(jax.eval_shape(output_fn, params).shape)
            return jax.tree.map(lambda g: -hparams["learning_rate"] * g, updates), state

        return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)

    method = runner.Method(uses_output_fn, lambda hparams: 1, uses_gradient=True,
                           fields=("learning_rate",))
    problem = dataclasses.replace(
        digits_problem(digits),
        extra_args=lambda batch, module: {"output_fn": lambda p: module.apply(p, batch[0])})
    experiment = runner.Experiment("extra", [runner.Member("m", "custom", {"learning_rate": 0.5},
                                                           problem)],
                                   methods={"custom": method})
    results = runner.run(experiment, digits_config(num_steps=50), tmp_path)
    assert seen and seen[0] == (64, 10)
    assert results["runs"][0]["metrics"]["loss"][-1] < results["runs"][0]["metrics"]["loss"][0]


def test_chunk_memory_is_flat_in_evaluations_per_chunk(digits):
    """A ~1M-parameter MLP: the compiled chunk's temporary memory does not grow with its length
    at metrics_batch = 1 (the metrics run inside the scan); storing every evaluation's params
    (metrics_batch = chunk length) grows by about a params copy per evaluation."""
    module = MLP(features=(1024, 896))
    problem = digits_problem(digits, module=module)
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(problem.init_params))
    assert 0.9e6 < params_bytes / 4 < 1.2e6
    experiment = runner.Experiment("memory", runner.sweep(
        "zo", {"learning_rate": 0.01, "smoothing": 0.01, "seed": 0}, problem))

    def temp_bytes(evals, metrics_batch):
        config = digits_config(evals_per_chunk=evals, metrics_batch=metrics_batch,
                               num_steps=evals, eval_every=1)
        [group] = runner_groups.make_groups(experiment, None, "vmap", config)
        group.state = program.init(group.program, problem.init_params, group.traced)
        [future] = runner_groups.compile_groups([group], jax.random.key(0), _Now())
        compiled, _ = future.result()
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(4, 1), temp_bytes(16, 1)
    assert long <= short + 0.05 * params_bytes, (short, long, params_bytes)
    stored = temp_bytes(16, 16)
    assert stored >= long + 8 * params_bytes, (stored, long, params_bytes)


class _Now:
    """An executor that runs the job at once (compilation in the test's thread)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        future.set_result(fn(*args))
        return future


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_a_wrongly_shaped_batch_is_an_error_naming_the_problem_and_shapes(digits, tmp_path):
    train_x, train_y = digits[:2]
    problem = digits_problem(digits, batch_fn=runner.Minibatches((train_x[:, :10], train_y), 8))
    with pytest.raises(runner.ConfigError, match=r"problem 'digits-mlp'.*float32\[8, 10\]"):
        runner.run(digits_experiment(problem), digits_config(), tmp_path)


def test_non_finite_batches_follow_the_non_finite_policy(digits, tmp_path):
    """From step 120 the batches are NaN: both members are marked non-finite, frozen at their
    last good evaluation (step 100), with finite params."""
    minibatches = runner.Minibatches(digits[:2], batch_size=64)

    def poisoned(key, step):
        x, y = minibatches(key, step)
        return jnp.where(step >= 120, jnp.nan, x), y

    experiment = digits_experiment(digits_problem(digits, batch_fn=poisoned))
    with pytest.raises(runner.NonFiniteError, match=r"'gd' from step 150; 'zo' from step 150"):
        runner.run(experiment, digits_config(), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    for run in results["runs"]:
        assert None not in run["metrics"]["loss"][:3] and run["metrics"]["loss"][3] is None
        params = runner.load_member(tmp_path, run["name"])
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
        loss = cross_entropy(params, digits[:2], MLP())
        np.testing.assert_allclose(loss, run["metrics"]["loss"][2], rtol=1e-5)


def test_unknown_method_field_is_an_error_listing_the_fields(digits, tmp_path):
    problem = digits_problem(digits)
    members = runner.sweep("zo", {"learning_rate": 0.1, "smoothing": 0.1, "tilt": 1.0}, problem)
    with pytest.raises(runner.ConfigError, match=r"'zo' has no field 'tilt'; its fields: "
                                                 r"\('learning_rate', 'smoothing', "
                                                 r"'num_directions', 'direction', 'scheme', "
                                                 r"'chunk_size', 'low_memory', 'stream', 'seed'\)"):
        runner.run(runner.Experiment("x", members), digits_config(), tmp_path)
    with pytest.raises(runner.ConfigError, match="metrics_batch must be positive"):
        runner.run(digits_experiment(problem), digits_config(metrics_batch=0), tmp_path)


def test_old_workdirs_are_an_error_saying_how_to_start_over(digits, tmp_path):
    (tmp_path / "checkpoints" / "50").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(
        {"experiment": "digits", "config": digits_config().to_dict()}))  # no "version"
    experiment = digits_experiment(digits_problem(digits))
    with pytest.raises(runner.OldWorkdirError, match="older version.*--overwrite"):
        runner.run(experiment, digits_config(num_steps=50), tmp_path)
    with pytest.raises(runner.OldWorkdirError, match="older version"):
        runner.load_member(tmp_path, "gd")
    results = runner.run(experiment, digits_config(num_steps=50), tmp_path, overwrite=True)
    assert results["runs"][0]["steps"][-1] == 50
