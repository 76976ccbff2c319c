"""The numpy baselines of ``benchmarks.figures``: the Figure-1 and Figure-2 runs as plain
numpy loops doing the same steps as the experiments (same update rules, Gaussian directions from
numpy's ``Generator``, metrics at the same evaluation steps).

- :func:`fig1_numpy` (:func:`fig1_numpy_run` per run): the five Figure-1 runs in float64.
- :func:`fig2_numpy` (:func:`fig2_numpy_run` per run): Figure 2 on the dense N × D float32
  features (the paper's reference), timed for a few steps per run and extrapolated.
"""

import time

import numpy as np

# ---------------------------------------------------------------------------------------------
# Figure 1.


def fig1_numpy_run(method: str, learning_rate: float, smoothing: float | None, x0: np.ndarray,
                   eval_steps: np.ndarray, seed: int) -> dict:
    """One Figure-1 run as a plain numpy loop: x = (y, z) ∈ R^2d, h = (yᵀz − 1)²/2.

    gd: ∇h = r (z, y) with r = yᵀz − 1. zo: u ~ N(0, I_2d),
    ĝ = (h(x + λu) − h(x − λu)) / (2λ) u. forward_grad: ĝ = (uᵀ∇h) u. x ← x − η ĝ. Loss and
    trace ‖x‖² recorded at ``eval_steps``.
    """
    rng = np.random.default_rng(seed)
    d = x0.size // 2
    x = x0.astype(np.float64)  # a copy
    y, z = x[:d], x[d:]  # views: updated in place with x
    losses, traces = [], []

    def record():
        r = y @ z - 1.0
        losses.append(0.5 * r * r)
        traces.append(x @ x)

    def h(p):
        r = p[:d] @ p[d:] - 1.0
        return 0.5 * r * r

    num_steps = int(eval_steps[-1])
    evals = iter(eval_steps[1:].tolist())
    next_eval = next(evals, None)
    record()  # step 0
    for step in range(1, num_steps + 1):
        if method == "gd":
            r = y @ z - 1.0
            g = np.concatenate((r * z, r * y))
        elif method == "zo":
            u = rng.standard_normal(2 * d)
            g = ((h(x + smoothing * u) - h(x - smoothing * u)) / (2 * smoothing)) * u
        elif method == "forward_grad":
            u = rng.standard_normal(2 * d)
            r = y @ z - 1.0
            g = (r * (u[:d] @ z + u[d:] @ y)) * u
        else:
            raise ValueError(method)
        x -= learning_rate * g
        if step == next_eval:
            record()
            next_eval = next(evals, None)
    return {"loss": losses, "hessian_trace": traces}


def fig1_numpy(config) -> tuple[float, list[tuple[str, dict]]]:
    """The five runs of ``config`` one after another; returns (seconds, [(name, metrics)])."""
    import jax

    from experiments import runner
    from zojax.problems import test_function

    params = test_function.init_params(jax.random.key(config.init_seed), config.dim,
                                       config.init_scale)
    x0 = np.concatenate([np.asarray(params["y"]), np.asarray(params["z"])])
    steps = runner.eval_steps(config)
    runs = [("gd", "gd", lr, None, 0) for lr in config.gd.learning_rate]
    runs += [(f"zo(λ={lam})", "zo", lr, lam, seed) for lr in config.zo.learning_rate
             for lam in config.zo.smoothing for seed in config.zo.seed]
    runs += [("forward_grad", "forward_grad", lr, None, seed)
             for lr in config.forward_grad.learning_rate for seed in config.forward_grad.seed]
    start = time.perf_counter()
    out = [(name, fig1_numpy_run(method, lr, lam, x0, steps, seed))
           for name, method, lr, lam, seed in runs]
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------
# Figure 2.


def fig2_numpy_run(loss: str, method: str, learning_rate: float, smoothing: float,
                   train: tuple, test: tuple, w0: np.ndarray, eval_steps: np.ndarray,
                   num_steps: int, seed: int) -> tuple[float, float, int, int]:
    """A Figure-2 run on dense (N, D) float32 features for ``num_steps`` steps, metrics (train
    and test loss, closed-form trace, accuracy) at ``eval_steps``; returns (step seconds,
    evaluation seconds, steps, evaluations)."""
    x_train, b_train, norms_train = train
    rng = np.random.default_rng(seed)
    w = w0.astype(np.float32)
    n = x_train.shape[0]

    def sigmoid(t):
        return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow

    def objective(w):
        m = b_train * (x_train @ w)
        if loss == "svm":
            return np.mean(np.square(np.maximum(0.0, 1.0 - m)))
        return np.mean(np.logaddexp(0.0, -m))

    def gradient(w):
        m = b_train * (x_train @ w)
        if loss == "svm":
            coef = -2.0 * b_train * np.maximum(0.0, 1.0 - m)
        else:
            coef = -b_train * sigmoid(-m)
        return (coef.astype(np.float32) @ x_train) / n

    def metrics(x, b, norms):
        scores = x @ w
        m = b * scores
        if loss == "svm":
            value = np.mean(np.square(np.maximum(0.0, 1.0 - m)))
            trace = 2.0 * np.mean(np.where(m < 1.0, norms, 0.0))
        else:
            value = np.mean(np.logaddexp(0.0, -m))
            p = sigmoid(scores)
            trace = np.mean(p * (1.0 - p) * norms)
        accuracy = np.mean(np.where(scores >= 0, 1.0, -1.0) == b)
        return value, trace, accuracy

    evals = set(eval_steps.tolist())
    step_seconds = eval_seconds = 0.0
    num_evals = 0
    for step in range(num_steps + 1):
        if step:
            start = time.perf_counter()
            if method == "gd":
                g = gradient(w)
            else:
                u = rng.standard_normal(w.size, dtype=np.float32)
                g = ((objective(w + smoothing * u) - objective(w - smoothing * u))
                     / (2 * smoothing)) * u
            w -= np.float32(learning_rate) * g.astype(np.float32)
            step_seconds += time.perf_counter() - start
        if step in evals:
            start = time.perf_counter()
            metrics(*train)
            metrics(*test)
            eval_seconds += time.perf_counter() - start
            num_evals += 1
    return step_seconds, eval_seconds, num_steps, num_evals


def fig2_numpy(config, datasets, data_dir, steps_per_run: int) -> tuple[float, list[str]]:
    """Extrapolated seconds of the full Figure 2 as numpy loops on dense features."""
    import jax

    from experiments import linear_models, runner
    from zojax.problems import linear

    config.data_dir = str(data_dir)
    schedule = runner.eval_steps(config)
    total = 0.0
    lines = []
    for dataset in datasets:
        data = linear_models.load_dataset(dataset, config)
        projection_key, init_key = jax.random.split(jax.random.key(config.seed[0]))
        train, test = linear.random_features(projection_key, data.train_inputs, data.test_inputs,
                                             num_features=config.num_features)
        w0 = np.asarray(linear.init_params(init_key, train.shape[1], config.init_scale))
        splits = []
        for features, labels in ((train, data.train_labels), (test, data.test_labels)):
            dense = np.asarray(features.dense(), np.float32)
            splits.append((dense, np.asarray(labels, np.float32),
                           np.sum(np.square(dense, dtype=np.float32), axis=1)))
        del train, test
        for loss in config.losses:
            for method in config.methods:
                fields = config[loss][method]
                lam = fields.smoothing[0] if method == "zo" else None
                step_s, eval_s, steps, evals = fig2_numpy_run(
                    loss, method, fields.learning_rate[0], lam, splits[0], splits[1], w0,
                    schedule, steps_per_run, config.seed[0])
                full = step_s / steps * config.num_steps + eval_s / evals * len(schedule)
                total += full
                lines.append(f"    {dataset}/{loss}/{method}: {1e3 * step_s / steps:6.1f} ms/step "
                             f"+ {1e3 * eval_s / evals:6.1f} ms/evaluation -> "
                             f"{full / 60:5.1f} min per {config.num_steps}-step run "
                             f"({len(schedule)} evaluations)")
        shapes = f"train {splits[0][0].shape}, test {splits[1][0].shape}"
        lines.append(f"    ({dataset}: dense float32 features, {shapes})")
        del splits
    return total, lines
