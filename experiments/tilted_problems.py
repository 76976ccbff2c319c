r"""The four problems of :mod:`experiments.tilted` (each a :class:`runner.Problem`: loss,
metrics, start, data) and the curvature metrics they share: ``hessian_trace``,
``hessian_top_eigenvalue``, ``hessian_square_trace`` (exact for d <= ``exact_max_dim``, else
Hutchinson with ``*_stderr``) and, in ``final_metrics``, the Hessian spectrum.
"""

import functools

import jax
import jax.numpy as jnp
from absl import logging

import zojax
from experiments import runner
from experiments.models import MLP, accuracy, cross_entropy, digits_data
from zojax.problems import linear, test_function, two_scales

# ---------------------------------------------------------------------------------------------
# Curvature metrics, shared by every problem.


def curvature(fun, params, *args, exact: bool, num_probes: int, lanczos_iters: int, seed: int,
              trace=None):
    """``{hessian_trace, hessian_top_eigenvalue, hessian_square_trace[, *_stderr]}`` of ``fun``
    at ``params``: exact traces over the basis, or Hutchinson (Rademacher, ``num_probes``, the
    same probes at every call); λ_max by ``lanczos_iters`` Lanczos steps. ``trace``: a closed
    form of the trace, used instead (no stderr)."""
    key = jax.random.key(seed)
    out = {"hessian_top_eigenvalue": zojax.hessian_top_eigenvalue(
        fun, key, params, *args, num_iters=lanczos_iters)}
    if trace is not None:
        out["hessian_trace"] = trace
    elif exact:
        out["hessian_trace"] = zojax.hessian_trace(fun, params, *args)
    else:
        out["hessian_trace"], out["hessian_trace_stderr"] = zojax.hutchinson_trace(
            fun, key, params, *args, num_samples=num_probes)
    if exact:
        out["hessian_square_trace"] = zojax.hessian_square_trace(
            fun, key, params, *args, num_samples=1, exact=True)[0]
    else:
        out["hessian_square_trace"], out["hessian_square_trace_stderr"] = (
            zojax.hessian_square_trace(fun, key, params, *args, num_samples=num_probes))
    return out


def _settings(config, dim: int) -> dict:
    return dict(exact=dim <= config.exact_max_dim, num_probes=config.hutchinson_samples,
                lanczos_iters=min(config.lanczos_iters, dim), seed=config.curvature_seed)


def _final(config, fun):
    """``final_metrics(params, *eval_data)``: ``{"spectrum": {"nodes", "weights"}}`` of the
    Hessian of ``fun(params, *eval_data)`` (stochastic Lanczos quadrature)."""
    key = jax.random.key(config.curvature_seed + 1)
    num_iters, num_samples = config.spectrum_iters, config.spectrum_samples

    def final_metrics(params, *args):
        nodes, weights = zojax.hessian_spectrum(fun, key, params, *args, num_iters=num_iters,
                                                num_samples=num_samples)
        return {"spectrum": {"nodes": nodes, "weights": weights}}

    return final_metrics


def _dim(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# The four problems: Problem (loss, metrics, start, data) and their labels.


def _test_function_metrics(settings, params):
    return {"loss": test_function.loss(params),
            **curvature(test_function.loss, params, **settings,
                        trace=test_function.hessian_trace(params))}


def test_function_problem(config) -> runner.Problem:
    fields = config.test_function
    params = test_function.init_params(jax.random.key(fields.init_seed), fields.dim,
                                       fields.init_scale)
    settings = _settings(config, _dim(params))
    return runner.Problem(
        test_function.loss, functools.partial(_test_function_metrics, settings), params,
        reference_metrics={"hessian_trace": functools.partial(zojax.hessian_trace,
                                                               test_function.loss)},
        final_metrics=_final(config, test_function.loss), name="test_function")


def _two_scales_metrics(settings, params):
    return {"loss": two_scales.loss(params), "w": params["w"],
            **curvature(two_scales.loss, params, **settings)}


def two_scales_problem(config) -> runner.Problem:
    fields = config.two_scales
    params = two_scales.init_params(fields.init_w, fields.n, jax.random.key(1), fields.init_scale)
    settings = _settings(config, _dim(params))
    return runner.Problem(two_scales.loss, functools.partial(_two_scales_metrics, settings),
                          params, final_metrics=_final(config, two_scales.loss),
                          name="two_scales")


def logistic_data(config) -> tuple[str, tuple]:
    """``(dataset name, (X_train, y_train, X_test, y_test))``: raw features with a bias column."""
    name = config.logistic.dataset
    if name == "auto":
        try:
            name, data = "a7a", zojax.datasets.load_libsvm("a7a", data_dir=config.data_dir)
        except FileNotFoundError as error:
            logging.warning("a7a not found (%s): the logistic problem runs on synthetic-a7a.",
                            str(error).splitlines()[0])
            name = "synthetic-a7a"
    if name.startswith("synthetic"):
        data = zojax.datasets.synthetic_libsvm(config.synthetic_seed,
                                               like=name.partition("-")[2] or "a5a")
    elif config.logistic.dataset != "auto":
        try:
            data = zojax.datasets.load_libsvm(name, data_dir=config.data_dir)
        except FileNotFoundError as error:
            raise runner.ConfigError(f"config.logistic.dataset: {error}") from None

    def with_bias(inputs):
        return jnp.concatenate([jnp.ones((inputs.shape[0], 1), jnp.float32),
                                jnp.asarray(inputs, jnp.float32)], axis=1)

    return name, (with_bias(data.train_inputs), jnp.asarray(data.train_labels),
                  with_bias(data.test_inputs), jnp.asarray(data.test_labels))


def _logistic_train(w, features, labels, test_features, test_labels):
    del test_features, test_labels
    return linear.logistic_loss(w, features, labels)


def _logistic_metrics(settings, w, features, labels, test_features, test_labels):
    return {"loss": linear.logistic_loss(w, features, labels),
            **curvature(linear.logistic_loss, w, features, labels, **settings,
                        trace=linear.logistic_hessian_trace(w, features, labels)),
            "test_loss": linear.logistic_loss(w, test_features, test_labels),
            "test_accuracy": linear.accuracy(w, test_features, test_labels)}


def _logistic_reference(w, features, labels, test_features, test_labels):
    del test_features, test_labels
    return zojax.hessian_trace(linear.logistic_loss, w, features, labels)


def logistic_problem(config) -> tuple[runner.Problem, str]:
    name, arrays = logistic_data(config)
    dim = arrays[0].shape[1]
    w0 = config.logistic.init_scale * jax.random.normal(jax.random.key(2), (dim,), jnp.float32)
    settings = _settings(config, dim)
    problem = runner.Problem(
        _logistic_train, functools.partial(_logistic_metrics, settings), w0, arrays,
        reference_metrics={"hessian_trace": _logistic_reference},
        final_metrics=_final(config, _logistic_train), name="logistic")
    return problem, name


def _mlp_batch_loss(params, batch, model):
    return cross_entropy(params, model, *batch)


def _mlp_train_loss(params, model, inputs, labels, test_inputs, test_labels):
    del test_inputs, test_labels
    return cross_entropy(params, model, inputs, labels)


def _mlp_metrics(settings, params, model, inputs, labels, test_inputs, test_labels):
    return {"loss": cross_entropy(params, model, inputs, labels),
            **curvature(cross_entropy, params, model, inputs, labels, **settings),
            "train_accuracy": accuracy(params, model, inputs, labels),
            "test_loss": cross_entropy(params, model, test_inputs, test_labels),
            "test_accuracy": accuracy(params, model, test_inputs, test_labels)}


def digits_mlp_problem(config) -> runner.Problem:
    fields = config.digits_mlp
    model = MLP(fields.hidden)
    train_x, train_y, test_x, test_y = digits_data(fields.init_seed)
    params = model.init(jax.random.key(fields.init_seed), train_x[:1])["params"]
    settings = _settings(config, _dim(params))
    # Hessian functions see (params, model, x, y): the module is a static part of the program.
    return runner.Problem(
        _mlp_batch_loss, functools.partial(_mlp_metrics, settings), params, (model,),
        batch_fn=runner.Minibatches((train_x, train_y), fields.batch_size),
        eval_data=(model, train_x, train_y, test_x, test_y),
        final_metrics=_final(config, _mlp_train_loss), name="digits_mlp")
