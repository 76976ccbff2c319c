r"""Figure 2: GD vs ZO on squared-hinge SVMs and logistic regression over random features (the
experiment of :mod:`experiments.linear_models`, its entry point, and of
:mod:`experiments.distributed`).

The paper's random features (D = 10,001) as :class:`zojax.problems.AffineFeatures`; one seed fixes
the projection, w0 ~ N(0, 0.1² I) and the ZO directions. Every ``eval_every`` steps: train and
test loss, accuracy and closed-form trace (the train trace cross-checked against
``zojax.hessian_trace`` at the first and last evaluation). The default config uses a7a for a5a.
``python -m experiments.linear_models --config configs/linear_models.py --workdir /tmp/fig2``.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

import zojax
from experiments import runner
from zojax.problems import LOSSES, Loss, linear  # noqa: F401 (re-exported)

NAME = "linear_models"
LOSS_NAMES, METHOD_NAMES = ("svm", "logistic"), ("gd", "zo")  # config.losses, config.methods
LOGISTIC_LOSSES = {"exact": "logistic", "clipped": "clipped_logistic"}  # config.logistic_loss
SYNTHETIC = "synthetic"  # "synthetic" (a5a-shaped) or "synthetic-<name>" (shaped like <name>).


class DataNotFoundError(runner.ConfigError, FileNotFoundError):
    """A dataset's files are missing (the loader's message): a ConfigError for the command line."""


def registry_name(config, name: str) -> str:
    """The name in :data:`LOSSES` of the loss that ``config.losses`` entry ``name`` runs."""
    return LOGISTIC_LOSSES[config["logistic_loss"]] if name == "logistic" else name


def _train_only(fn):
    """``fn`` on the train split. The problems' functions take (w, [u, steps,] train_features,
    train_labels, test_features, test_labels), one per loss: compiled programs cache on them."""
    return lambda *args: fn(*args[:-2])


def _objective(loss: Loss) -> zojax.estimators.Objective:
    # With its line form: X·w and X·u, then each step.
    return zojax.estimators.Objective(_train_only(loss.loss), _train_only(loss.loss.along))


def _metrics(loss: Loss):
    def metrics(w, train_features, train_labels, test_features, test_labels):
        # Both splits share the train map (random_features), written so that XLA sees it: W(w/σ)
        # is computed once for both, and the repeated X·w of each split are merged.
        test_features = test_features._replace(projection=train_features.projection,
                                               mean=train_features.mean, scale=train_features.scale)
        train, test = (train_features, train_labels), (test_features, test_labels)
        return {"loss": loss.loss(w, *train), "hessian_trace": loss.hessian_trace(w, *train),
                "train_accuracy": linear.accuracy(w, *train), "test_loss": loss.loss(w, *test),
                "test_hessian_trace": loss.hessian_trace(w, *test),
                "test_accuracy": linear.accuracy(w, *test)}

    return metrics


OBJECTIVES = {name: _objective(loss) for name, loss in LOSSES.items()}
METRICS = {name: _metrics(loss) for name, loss in LOSSES.items()}


@functools.cache
def _reference(loss_name: str, chunk_size: int):
    """The train trace by jvp-of-grad (independent of the closed form); one per shape, cached."""
    return _train_only(functools.partial(zojax.hessian_trace, LOSSES[loss_name].loss,
                                         chunk_size=chunk_size))


def load_dataset(name: str, config) -> zojax.datasets.LibsvmData:
    """A LIBSVM dataset by name, or the synthetic stand-in for ``"synthetic[-<like>]"``; raises
    DataNotFoundError (a FileNotFoundError saying where to put them) when files are missing."""
    if name == SYNTHETIC or name.startswith(SYNTHETIC + "-"):
        data = zojax.datasets.synthetic_libsvm(config.synthetic_seed,
                                               like=name.partition("-")[2] or "a5a")
        return data._replace(name=name)
    try:
        return zojax.datasets.load_libsvm(name, data_dir=config.data_dir, download=config.download)
    except FileNotFoundError as error:
        raise DataNotFoundError(str(error)) from None


def problem_data(data: zojax.datasets.LibsvmData, seed: int, config) -> tuple[tuple, jax.Array]:
    """``((train_features, train_labels, test_features, test_labels), w0)`` of one seed: the seed
    fixes the projection and the starting point (and the ZO directions)."""
    projection_key, init_key = jax.random.split(jax.random.key(seed))
    train, test = linear.random_features(projection_key, data.train_inputs, data.test_inputs,
                                         num_features=config.num_features)
    arrays = (train, jnp.asarray(data.train_labels), test, jnp.asarray(data.test_labels))
    return arrays, linear.init_params(init_key, train.shape[1], config.init_scale)


def _check_config(config) -> None:
    """ConfigError naming the field for a bad value (before any data is loaded)."""
    runner.validate(config, runner.POSITIVE_FIELDS
                    + ("num_features", "init_scale", "reference_chunk_size"))
    runner.check_choices(config, {"losses": LOSS_NAMES, "methods": METHOD_NAMES, "datasets": None,
                                  "seed": None, "logistic_loss": tuple(LOGISTIC_LOSSES)})
    for name in runner.as_tuple(config.datasets):
        if name.startswith(SYNTHETIC + "-") and (
                name.partition("-")[2] not in zojax.datasets.LIBSVM_DATASETS):
            raise runner.ConfigError(
                f"config.datasets: {name!r} is not synthetic-<name> of a LIBSVM dataset "
                f"({', '.join(zojax.datasets.LIBSVM_DATASETS)}).")


def get_experiment(config) -> runner.Experiment:
    """GD and ZO for every (dataset, seed, loss); data loaded (or an error) before compiling."""
    _check_config(config)
    names, seeds = runner.as_tuple(config.datasets), runner.as_tuple(config.seed)
    # Files first: a missing one fails before any data is generated or compiled.
    loaded = {name: load_dataset(name, config)
              for name in sorted(names, key=lambda name: name.startswith(SYNTHETIC))}
    members = []
    for dataset, seed in itertools.product(names, seeds):
        arrays, params = problem_data(loaded[dataset], seed, config)
        for loss in runner.as_tuple(config.losses):
            entry = registry_name(config, loss)
            problem = runner.Problem(OBJECTIVES[entry], METRICS[entry], params, arrays, {
                "hessian_trace": _reference(entry, config.reference_chunk_size)})
            for method in runner.as_tuple(config.methods):
                fields = {**config[loss][method], "seed": seed}
                name = f"{dataset}/{loss}/{method}" + (f"/seed={seed}" if len(seeds) > 1 else "")
                members += runner.sweep(method, fields, problem, name=name,
                                        labels={"dataset": dataset, "loss": loss})
    return runner.Experiment(NAME, members, plot=plot, summary=summary)


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) Figure 2 in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


def label(run: dict) -> str:
    """Legend entry of a run, e.g. "ZO (λ=0.05, η=0.0001)"."""
    hparams = run["hparams"]
    seed = f", seed {hparams['seed']}" if "/seed=" in run["name"] else ""
    smoothing = "" if run["method"] == "gd" else f"λ={hparams['smoothing']:g}, "
    return f"{run['method'].upper()} ({smoothing}η={hparams['learning_rate']:g}{seed})"


def _dataset_title(dataset: str) -> str:
    if dataset.startswith(SYNTHETIC + "-"):
        return f"synthetic {dataset.partition('-')[2]}-shaped"
    return {"a7a": "a7a (a5a stand-in)", SYNTHETIC: "synthetic (a5a-shaped)"}.get(dataset, dataset)


ROWS = (("loss", "train loss", "log"), ("hessian_trace", "train tr ∇²f", "log"),
        ("test_accuracy", "test accuracy", "linear"))


def plot(results: dict):
    """The paper's layout: train loss, train trace, test accuracy rows; a column per
    (dataset, loss); GD dashed, ZO solid; log x-axis."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    panels: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        panels.setdefault((run["hparams"]["dataset"], run["hparams"]["loss"]), []).append(run)
    figure = Figure(figsize=(3.4 * len(panels) + 0.6, 8), layout="constrained")
    axes = figure.subplots(len(ROWS), len(panels), sharex=True, squeeze=False)
    for column, ((dataset, loss), panel) in enumerate(panels.items()):
        for run in panel:  # GD dashed in C0, C2, ...; ZO solid in C1, C3, ...
            gd, same = run["method"] == "gd", [r for r in panel if r["method"] == run["method"]]
            for row, (metric, ylabel, scale) in enumerate(ROWS):
                values = np.asarray(run["metrics"][metric], float)  # null -> nan
                axes[row, column].plot(np.asarray(run["steps"][1:], float), values[1:],
                                       label=label(run), lw=1.4, ls="--" if gd else "-",
                                       color=f"C{2 * same.index(run) + (not gd)}")
                axes[row, column].set(yscale=scale, ylabel=ylabel if column == 0 else "")
                axes[row, column].grid(alpha=0.3)
        title = LOSSES[registry_name(results["config"], loss)].title
        axes[0, column].set_title(f"{title}\n{_dataset_title(dataset)}")
        axes[-1, column].set(xscale="log", xlabel="iteration")
        axes[-1, column].legend(fontsize="small")
    return figure


def summary(results: dict) -> str:
    """Start and end of the train trace, final train loss and test accuracy of every run."""
    runs = results["runs"]
    width = max(len(run["name"]) for run in runs) + 2
    lines = [f"Figure 2, {runs[0]['steps'][-1]} steps: train trace start -> end (end/start), "
             "final train loss, test accuracy, test trace"]
    for run in runs:
        metrics, trace = run["metrics"], run["metrics"]["hessian_trace"]
        lines.append(f"  {run['name']:<{width}}non-finite" if trace[-1] is None else
                     f"  {run['name']:<{width}}{trace[0]:9.4g} -> {trace[-1]:9.4g} "
                     f"({trace[-1] / trace[0]:4.0%}), loss {metrics['loss'][-1]:.4f}, "
                     f"test acc {metrics['test_accuracy'][-1]:.4f}, "
                     f"test trace {metrics['test_hessian_trace'][-1]:.4g}")
    lines.append(f"wall seconds (compiled programs, compilation excluded): "  # vmapped members
                 f"{sum({run['wall_seconds'] for run in runs}):.1f}")  # share theirs: once each
    return "\n".join(lines)
