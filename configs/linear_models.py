"""Figure 2 of "Zeroth-order optimization finds flat minima": SVM and logistic regression, GD vs ZO.

    python -m experiments.linear_models --config configs/linear_models.py \
        --config.data_dir=DATA_DIR --workdir /tmp/fig2
    python -m experiments.linear_models --config configs/linear_models.py:synthetic --workdir /tmp/s
    python -m experiments.linear_models --config configs/linear_models.py:smoke --workdir /tmp/smoke

Variants: ``smoke`` (seconds, synthetic data, few features: what the tests run) and ``synthetic``
(the full schedule on generated a5a- and w5a-shaped data: no files needed).

Tuple fields are swept: one run per value, and runs that differ only in traced values
(``learning_rate``, ``smoothing``) share one vmapped program, e.g. a 16-member λ/η sweep:
``--config.logistic.zo.learning_rate='(0.003, 0.01, 0.03, 0.1)'
--config.logistic.zo.smoothing='(0.03, 0.1, 0.3, 1.0)'``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's setting; ``arg`` picks a variant: ``"smoke"`` or ``"synthetic"``."""
    config = ml_collections.ConfigDict()

    # Data. LIBSVM names are read by zojax.datasets.load_libsvm; "synthetic" is an a5a-shaped
    # stand-in generated from `synthetic_seed` (no files needed) and "synthetic-<name>" one
    # shaped like <name> (e.g. "synthetic-w5a"). The paper uses ("a5a", "w5a"); a5a could not be
    # obtained offline, so the default reproduces its panel on a7a (16,100 train rows, the
    # closest genuine a-series size available offline): use ("a5a", "w5a") where a5a
    # can be downloaded.
    config.datasets = ("a7a", "w5a")
    # Root folder holding libsvm/<name> and libsvm/<name>.t (plain or .bz2). None: the loader's
    # rule ($ZOJAX_DATA_DIR, else ~/.cache/zojax). Set it with --config.data_dir=DATA_DIR, your
    # data directory.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    # Fetch missing files from the LIBSVM site (never implicit: offline it may hang).
    config.download = False
    config.synthetic_seed = 0  # seed of the generated data of the "synthetic" datasets.

    # Problem: X = [1, S2(S1(inputs) W)], W ~ N(0, 1)^{d × num_features}, w0 ~ N(0, init_scale²).
    config.num_features = 10_000  # m random features; D = m + 1 parameters (bias column).
    config.init_scale = 0.1  # σ of the starting point w0.
    # One seed fixes the projection W, the starting point w0 and the ZO directions (as in the
    # paper). A tuple runs every seed (each seed its own features, so its own program).
    config.seed = (0,)
    # Which losses to run (each has its settings below): "svm" (squared hinge), "logistic".
    config.losses = ("svm", "logistic")
    # The logistic loss: "exact", mean softplus(−b xᵀw) (zojax.problems.logistic_loss), or
    # "clipped", as the paper's public code evaluates it with sklearn.metrics.log_loss: p clipped
    # to [ε, 1 − ε], ε = 2⁻⁵² (float64 eps), so each sample's loss is at most −log ε ≈ 36.04
    # (zojax.problems.clipped_logistic_loss; its derivatives are the exact loss's, as the
    # paper's GD gradient). It changes the ZO runs, whose points w ± λu pass that cap on some
    # rows, and the recorded losses; GD's trajectory stays the same.
    config.logistic_loss = "exact"
    # Which methods to run on every (dataset, loss): "gd" and/or "zo".
    config.methods = ("gd", "zo")

    # Squared-hinge SVM, mean max(0, 1 − b xᵀw)²: the paper's η = 1e-4, λ = 0.05.
    config.svm = ml_collections.ConfigDict()
    config.svm.gd = ml_collections.ConfigDict()
    config.svm.gd.learning_rate = (1e-4,)  # η of GD (the paper's scripts: the same η as ZO).
    config.svm.zo = ml_collections.ConfigDict()
    config.svm.zo.learning_rate = (1e-4,)  # η of ZO-SGD.
    config.svm.zo.smoothing = (0.05,)  # λ of the two-point estimator.
    config.svm.zo.num_directions = 1  # q Gaussian directions per step (2q evaluations).
    config.svm.zo.direction = "gaussian"  # u ~ N(0, I) (see zojax.directions for the others).
    config.svm.zo.scheme = "central"  # (f(w+λu) − f(w−λu))/(2λ); "forward": (f(w+λu) − f(w))/λ.
    # Directions evaluated per batch (None: all q at once; 1: one perturbed copy of w at a time).
    config.svm.zo.chunk_size = ml_collections.config_dict.placeholder(int)
    # True: every direction regenerated where it is used, never stored (zojax.low_memory).
    config.svm.zo.low_memory = ml_collections.config_dict.placeholder(bool)

    # Logistic regression, mean softplus(−b xᵀw): the paper's η = 0.01, λ = 0.1.
    config.logistic = ml_collections.ConfigDict()
    config.logistic.gd = ml_collections.ConfigDict()
    config.logistic.gd.learning_rate = (0.01,)  # η of GD (the paper's scripts: the same as ZO).
    config.logistic.zo = ml_collections.ConfigDict()
    config.logistic.zo.learning_rate = (0.01,)  # η of ZO-SGD.
    config.logistic.zo.smoothing = (0.1,)  # λ of the two-point estimator.
    config.logistic.zo.num_directions = 1  # q, as config.svm.zo.num_directions.
    config.logistic.zo.direction = "gaussian"  # as config.svm.zo.direction.
    config.logistic.zo.scheme = "central"  # as config.svm.zo.scheme.
    config.logistic.zo.chunk_size = ml_collections.config_dict.placeholder(int)  # as svm's.
    config.logistic.zo.low_memory = ml_collections.config_dict.placeholder(bool)  # as svm's.

    # Schedule.
    config.num_steps = 10_000  # iterations of every run.
    config.eval_every = 10  # train/test loss, trace and accuracy every this many steps (and 0)...
    config.log_evals = 30  # ...plus this many log-spaced steps, for the log x-axis (0: none).
    config.evals_per_chunk = 100  # at most this many evaluations per compiled chunk (progress bar).
    config.checkpoint_every = 5  # chunks between checkpoints (the last chunk always saves).
    # Evaluations whose metrics are computed together (vmapped over their stored w): one pass
    # over the train and test matrices for all of them. Memory: this many copies of w.
    config.metrics_batch = 100
    # PRNG of the directions (a jax.random key implementation, e.g. "threefry2x32"). The
    # documented Figure-2 numbers (docs/experiments/figure2.md) come from philox4x32;
    # threefry2x32 runs as fast here and gives a different but equally valid random stream.
    config.rng_impl = "philox4x32"
    # Basis vectors per batch in the exact zojax.hessian_trace that cross-checks the closed-form
    # train trace at the first and last evaluation (memory ~ chunk × (N + D) floats).
    config.reference_chunk_size = 1024

    if arg == "smoke":
        config.datasets = ("synthetic",)
        config.num_features = 300
        config.num_steps = 200
        config.log_evals = 5
        config.evals_per_chunk = 10
        config.checkpoint_every = 1
        config.reference_chunk_size = 301
    elif arg == "synthetic":
        config.datasets = ("synthetic", "synthetic-w5a")
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'smoke', 'synthetic'.")
    return config
