r"""Figure 2: GD vs ZO on squared-hinge SVMs and logistic regression over random features.

Inputs are standardized, projected by a random Gaussian d × 10,000 matrix, standardized again and
given a bias column (D = 10,001 parameters); the map is affine, so X·w is computed without forming
the N × D matrix (:class:`zojax.problems.linear.AffineFeatures`). One seed fixes the projection,
the starting point w0 ~ N(0, 0.1² I) and the ZO directions. Recorded every ``eval_every`` steps:
train loss and accuracy, the closed-form train Hessian trace, and test loss, accuracy and trace;
the closed-form train trace is cross-checked against ``zojax.hessian_trace`` at the first and last
evaluation.

    python -m experiments.linear_models --config configs/linear_models.py \
        --config.data_dir=../shared/data --workdir /tmp/fig2

The paper uses a5a and w5a; a5a is not available offline, so the default config uses a7a.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

import zojax
from experiments import runner
from zojax.problems import linear

NAME = "linear_models"
METHOD_NAMES = ("gd", "zo")
SYNTHETIC = "synthetic"  # "synthetic" (a5a-shaped) or "synthetic-<name>" (shaped like <name>).


class DataNotFoundError(runner.ConfigError, FileNotFoundError):
    """A dataset's files are missing (the loader's message): a ConfigError for the command line."""


class Loss(NamedTuple):
    """A Figure-2 objective: ``fn(w, features, labels)`` loss and closed-form Hessian trace."""

    title: str  # the plot's name for it.
    loss: object
    hessian_trace: object


LOSSES = {"svm": Loss("SVM (squared hinge)", linear.svm_loss, linear.svm_hessian_trace),
          "logistic": Loss("logistic regression", linear.logistic_loss,
                           linear.logistic_hessian_trace)}


# ---------------------------------------------------------------------------------------------
# X·w for batches of w. The runner vmaps members and metrics over evaluations, and the ZO estimator
# vmaps its two points w ± λu, so X·w runs on batches of weight vectors. On CPU the input matrix
# is fastest stored transposed, Φᵀ (d, N): a batch (B, d) of projected vectors times Φᵀ gives the
# (B, N) scores in their batched layout, with no transpose of a (N, B) product (2-3x faster for
# B = 2 and B = 160 on a7a), and a single vector is a row-vector product. Left to vmap's default
# batching, XLA instead contracts along the first axis of a (d, B) operand, which is slow.
# `_FastFeatures` keeps the library's map and formulas (every zojax.problems.linear function takes
# it) and only changes how Φ is stored and how batches of products are laid out.

_HIGHEST = jax.lax.Precision.HIGHEST


def _scores(ws, features):
    """``X w`` for ``ws`` of shape (D,) or (B, D) (a linear function of ``ws``, transposable)."""
    v = ws[..., 1:] / features.scale  # (..., m)
    z = jax.lax.dot_general(features.projection, v, (((1,), (v.ndim - 1,)), ((), ())),
                            precision=_HIGHEST)  # (d, ...): W v in its fast layout
    # zᵀΦᵀ as a contraction over z's first axis (inputs = Φᵀ), not a matmul of z.T: XLA folds
    # that transpose into the first product, whose operands then swap into a slower layout.
    s = jax.lax.dot_general(z, features.inputs, (((0,), (0,)), ((), ())),
                            precision=_HIGHEST)  # (..., N)
    return s + (ws[..., 0] - jnp.matmul(v, features.mean, precision=_HIGHEST))[..., None]


@custom_vmap
def _product(w, features):
    return _scores(w, features)


@_product.def_vmap
def _product_vmap(axis_size, in_batched, ws, features):
    if any(jax.tree.leaves(in_batched[1])) or not in_batched[0]:  # batched features: default
        axes = (0 if in_batched[0] else None, jax.tree.map(lambda b: 0 if b else None,
                                                           in_batched[1]))
        return jax.vmap(_product.fun, axes, axis_size=axis_size)(ws, features), True
    # Nested vmaps arrive here with more leading axes: one product for all of them.
    return _scores(ws.reshape(-1, ws.shape[-1]), features).reshape(*ws.shape[:-1], -1), True


@jax.custom_jvp
def _fast_product(w, features):
    return _product(w, features)


@_fast_product.defjvp
def _fast_product_jvp(primals, tangents):
    # X·w is linear in w: its tangent is the same product written with plain (transposable) ops,
    # so jax.grad works (custom_vmap functions are not transposable). Features are never
    # differentiated here.
    w, features = primals
    return _product(w, features), _scores(tangents[0], features)


class _FastFeatures(linear.AffineFeatures):
    """The library's random-feature map with Φ stored transposed and a vmap-friendly ``X @ w``.

    Build it with :meth:`of`; ``inputs`` holds Φᵀ, shape (d, N).
    """

    __slots__ = ()

    @classmethod
    def of(cls, features: linear.AffineFeatures) -> "_FastFeatures":
        return cls(jnp.asarray(features.inputs.T), *features[1:])

    def library_map(self) -> linear.AffineFeatures:
        """The same map as a plain :class:`zojax.problems.linear.AffineFeatures`."""
        return linear.AffineFeatures(self.inputs.T, *self[1:])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.inputs.shape[1], self.projection.shape[1] + 1)

    def __matmul__(self, w):
        if w.ndim != 1:
            return _scores(w.T, self).T  # (D, k) columns, as the library's map
        return _fast_product(w, self)

    def dense(self) -> jax.Array:
        return self.library_map().dense()


# The problems' functions take (w, train_features, train_labels, test_features, test_labels).
# They are module-level (made once per loss) so compiled programs are cached on them.


def _objective(loss: Loss):
    def objective(w, train_features, train_labels, test_features, test_labels):
        del test_features, test_labels
        return loss.loss(w, train_features, train_labels)

    def along(w, direction, steps, train_features, train_labels, test_features, test_labels):
        del test_features, test_labels
        return loss.loss.along(w, direction, steps, train_features, train_labels)

    objective.along = along  # the estimator's line form: X·w and X·u, then every step
    return objective


def _metrics(loss: Loss):
    def metrics(w, train_features, train_labels, test_features, test_labels):
        # Both splits share the train map (random_features), written so that XLA sees it: the
        # projected weights W(w/σ) are then computed once for both, and the repeated X·w of each
        # split are merged (one product per split and evaluation).
        test_features = test_features._replace(projection=train_features.projection,
                                               mean=train_features.mean, scale=train_features.scale)
        return {
            "loss": loss.loss(w, train_features, train_labels),
            "hessian_trace": loss.hessian_trace(w, train_features, train_labels),
            "train_accuracy": linear.accuracy(w, train_features, train_labels),
            "test_loss": loss.loss(w, test_features, test_labels),
            "test_hessian_trace": loss.hessian_trace(w, test_features, test_labels),
            "test_accuracy": linear.accuracy(w, test_features, test_labels),
        }

    return metrics


def _exact_hessian_trace(loss: Loss, chunk_size, w, train_features, train_labels, *test):
    """The train trace by jvp-of-grad over the D basis vectors (independent of the closed form,
    and of `_FastFeatures`: the library's own map)."""
    del test
    features = train_features.library_map()
    return zojax.hessian_trace(loss.loss, w, features, train_labels, chunk_size=chunk_size)


OBJECTIVES = {name: _objective(loss) for name, loss in LOSSES.items()}
METRICS = {name: _metrics(loss) for name, loss in LOSSES.items()}


@functools.cache
def _reference(loss_name: str, chunk_size: int):
    """One function per (loss, chunk size), so the cross-check compiles once per shape."""
    return functools.partial(_exact_hessian_trace, LOSSES[loss_name], chunk_size)


def load_dataset(name: str, config) -> zojax.datasets.LibsvmData:
    """A LIBSVM dataset by name, or the synthetic stand-in for ``"synthetic[-<like>]"``.

    Raises:
        DataNotFoundError: the files are missing (a FileNotFoundError saying where to put them).
    """
    if name == SYNTHETIC or name.startswith(SYNTHETIC + "-"):
        like = name.partition("-")[2] or "a5a"
        data = zojax.datasets.synthetic_libsvm(seed=config.synthetic_seed, like=like)
        return data._replace(name=name)
    try:
        return zojax.datasets.load_libsvm(name, data_dir=config.data_dir,
                                          download=config.download)
    except FileNotFoundError as error:
        raise DataNotFoundError(str(error)) from None


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def _check_config(config) -> None:
    """ConfigError naming the field for a bad value (before any data is loaded)."""
    runner.validate(config, runner.POSITIVE_FIELDS
                    + ("num_features", "init_scale", "reference_chunk_size"))
    for field, known in (("losses", tuple(LOSSES)), ("methods", METHOD_NAMES)):
        values = _as_tuple(config[field])
        if not values or any(v not in known for v in values):
            raise runner.ConfigError(f"config.{field} must be a non-empty tuple of {known}, got "
                                     f"{config[field]!r}.")
    datasets = _as_tuple(config.datasets)
    if not datasets:
        raise runner.ConfigError("config.datasets must name at least one dataset.")
    for name in datasets:
        if name.startswith(SYNTHETIC + "-") and (
                name.partition("-")[2] not in zojax.datasets.LIBSVM_DATASETS):
            raise runner.ConfigError(
                f"config.datasets: {name!r} is not synthetic-<name> of a LIBSVM dataset "
                f"({', '.join(zojax.datasets.LIBSVM_DATASETS)}).")
    seeds = _as_tuple(config.seed)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                            for s in seeds):
        raise runner.ConfigError(f"config.seed must be non-negative integers, got "
                                 f"{config.seed!r}.")
    for field in ("datasets", "losses", "methods", "seed"):
        values = _as_tuple(config[field])
        if len(set(values)) != len(values):
            raise runner.ConfigError(f"config.{field} has repeated values: {config[field]!r}.")


def get_experiment(config) -> runner.Experiment:
    """GD and ZO for every (dataset, seed, loss); data loaded (or an error) before compiling."""
    _check_config(config)
    names = _as_tuple(config.datasets)
    # Files first: a missing one fails before any data is generated or compiled.
    loaded = {name: load_dataset(name, config)
              for name in sorted(names, key=lambda name: name.startswith(SYNTHETIC))}
    seeds = _as_tuple(config.seed)
    members = []
    for dataset in names:
        data = loaded[dataset]
        labels = jnp.asarray(data.train_labels), jnp.asarray(data.test_labels)
        for seed in seeds:
            projection_key, init_key = jax.random.split(jax.random.key(seed))
            train, test = linear.random_features(projection_key, data.train_inputs,
                                                 data.test_inputs,
                                                 num_features=config.num_features)
            train, test = _FastFeatures.of(train), _FastFeatures.of(test)
            params = linear.init_params(init_key, train.shape[1], config.init_scale)
            for loss in _as_tuple(config.losses):
                reference = _reference(loss, config.reference_chunk_size)
                problem = runner.Problem(
                    OBJECTIVES[loss], METRICS[loss], params, (train, labels[0], test, labels[1]),
                    reference_metrics={"hessian_trace": reference})
                for method in _as_tuple(config.methods):
                    fields = {"dataset": dataset, "loss": loss, **config[loss][method].to_dict(),
                              "seed": seed}
                    name = f"{dataset}/{loss}/{method}" + (f"/seed={seed}" if len(seeds) > 1
                                                           else "")
                    members += runner.sweep(method, fields, problem, name=name)
    return runner.Experiment(NAME, members, plot=plot, summary=summary)


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) Figure 2 in ``workdir``; returns the results dict."""
    return runner.run(get_experiment(config), config, workdir, overwrite=overwrite)


def label(run: dict) -> str:
    """Legend entry of a run, e.g. "ZO (λ=0.05, η=0.0001)"."""
    hparams = run["hparams"]
    seed = f", seed {hparams['seed']}" if "/seed=" in run["name"] else ""
    if run["method"] == "gd":
        return f"GD (η={hparams['learning_rate']:g}{seed})"
    return f"ZO (λ={hparams['smoothing']:g}, η={hparams['learning_rate']:g}{seed})"


def _dataset_title(dataset: str) -> str:
    if dataset == "a7a":
        return "a7a (a5a stand-in)"
    if dataset == SYNTHETIC:
        return "synthetic (a5a-shaped)"
    return dataset.replace(SYNTHETIC + "-", "synthetic ") + (
        "-shaped" if dataset.startswith(SYNTHETIC + "-") else "")


ROWS = (("loss", "train loss", "log"), ("hessian_trace", "train tr ∇²f", "log"),
        ("test_accuracy", "test accuracy", "linear"))


def plot(results: dict):
    """The paper's layout: train loss, train trace, test accuracy rows; a column per
    (dataset, loss); GD dashed, ZO solid; log x-axis."""
    from matplotlib.figure import Figure  # lazy: only when plotting

    runs = results["runs"]
    panels: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        panels.setdefault((run["hparams"]["dataset"], run["hparams"]["loss"]), []).append(run)
    figure = Figure(figsize=(3.4 * len(panels) + 0.6, 8), layout="constrained")
    axes = figure.subplots(len(ROWS), len(panels), sharex=True, squeeze=False)
    for column, ((dataset, loss), panel) in enumerate(panels.items()):
        counts = {"gd": 0, "zo": 0}
        for run in panel:
            method = run["method"]
            # GD dashed in C0, C2, ...; ZO solid in C1, C3, ...
            color = f"C{2 * counts[method] + (method != 'gd')}"
            counts[method] += 1
            steps = np.asarray(run["steps"], float)
            for row, (metric, _, _) in enumerate(ROWS):
                values = np.asarray(run["metrics"][metric], float)  # null -> nan
                axes[row, column].plot(steps[1:], values[1:], label=label(run), lw=1.4,
                                       ls="--" if method == "gd" else "-", color=color)
        axes[0, column].set_title(f"{LOSSES[loss].title}\n{_dataset_title(dataset)}")
        for row, (_, _, scale) in enumerate(ROWS):
            axes[row, column].set_yscale(scale)
            axes[row, column].grid(alpha=0.3)
        axes[-1, column].set(xscale="log", xlabel="iteration")
        axes[-1, column].legend(fontsize="small")
    for row, (_, ylabel, _) in enumerate(ROWS):
        axes[row, 0].set_ylabel(ylabel)
    return figure


def summary(results: dict) -> str:
    """Start and end of the train trace, final train loss and test accuracy of every run."""
    runs = results["runs"]
    width = max(len(run["name"]) for run in runs) + 2
    lines = [f"Figure 2, {runs[0]['steps'][-1]} steps: train trace start -> end (end/start), "
             "final train loss, test accuracy, test trace"]
    for run in runs:
        metrics = run["metrics"]
        trace = metrics["hessian_trace"]
        if trace[-1] is None:
            lines.append(f"  {run['name']:<{width}}non-finite")
            continue
        lines.append(
            f"  {run['name']:<{width}}{trace[0]:9.4g} -> {trace[-1]:9.4g} "
            f"({trace[-1] / trace[0]:4.0%}), loss {metrics['loss'][-1]:.4f}, "
            f"test acc {metrics['test_accuracy'][-1]:.4f}, "
            f"test trace {metrics['test_hessian_trace'][-1]:.4g}")
    # Vmapped members share their program's wall_seconds: count each program once.
    lines.append(f"wall seconds (compiled programs, compilation excluded): "
                 f"{sum({run['wall_seconds'] for run in runs}):.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from experiments import cli

    cli.main(train_and_evaluate)
