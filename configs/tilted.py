"""The sharpness ZEST penalizes: GD, ZO and ZEST (tilted ZO) across tilts t, on four problems.

    python -m experiments.tilted --config configs/tilted.py --config.data_dir=DATA_DIR \
        --workdir /tmp/zojax/tilted
    python -m experiments.tilted --config configs/tilted.py:smoke --workdir /tmp/smoke

Every problem runs GD, ZO and ZEST for each t in ``tilts`` at the same smoothing λ, step size η
and query budget: ZO takes ``num_directions // 2`` central pairs (``num_directions`` evaluations
per step), ZEST ``num_directions`` antithetic points (the same pairs: same seed, same
directions). The ZEST members of a problem differ only in t, traced: one vmapped program.
"""

import ml_collections

PROBLEMS = ("test_function", "two_scales", "logistic", "digits_mlp")


def _optimizer(learning_rate, smoothing, num_directions, num_steps):
    fields = ml_collections.ConfigDict()
    fields.learning_rate = learning_rate  # η of every method (GD's too).
    fields.smoothing = smoothing  # λ of ZO and ZEST.
    # Evaluations per step: ZEST's points (num_directions // 2 antithetic pairs), ZO's 2q with
    # q = num_directions // 2 central pairs. Even, >= 2.
    fields.num_directions = num_directions
    fields.num_steps = num_steps  # this problem's step budget.
    return fields


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The full sweep; ``arg="smoke"`` is a seconds-long variant for the tests."""
    config = ml_collections.ConfigDict()

    config.problems = PROBLEMS  # which problems to run (any of PROBLEMS).
    config.methods = ("gd", "zo", "zest")  # which methods to run on each problem.
    config.tilts = (0.1, 1.0, 10.0, 100.0)  # ZEST's t: one member each, vmapped together.
    # Perturbations of ZO and ZEST: "sphere" (‖u‖ = √d) keeps L_t finite at every t.
    # "gaussian" is allowed where L_t is finite: logistic and digits_mlp (losses that grow at
    # most linearly); on the quartic test function and on two_scales (exponential in w) it is
    # infinite for every t > 0, and on a quadratic once t λ² h_max >= 1.
    config.direction = "sphere"
    config.seed = 0  # seed of the directions (shared by ZO and ZEST: the same pairs).

    # (a) Figure 1's test function h(y, z) = (yᵀz − 1)²/2, d = 2 · dim, its starting point.
    config.test_function = _optimizer(0.002, 0.1, 8, 20_000)
    config.test_function.dim = 100
    config.test_function.init_scale = 0.88
    config.test_function.init_seed = 11

    # (b) zojax.problems.two_scales: ½e^{w/4}‖u‖² + ½e^{−w}‖v‖², u, v ∈ R^n. The trace is
    # smallest at w = 1.109, λ_max at w = 0; the start w0 = −1 is sharp in both.
    config.two_scales = _optimizer(0.05, 0.3, 16, 5_000)
    config.two_scales.n = 5
    config.two_scales.init_w = -1.0
    config.two_scales.init_scale = 0.1  # u, v ~ N(0, scale² I) at the start.

    # (c) Logistic regression on raw features (+ bias), full batch. "auto": a7a when its files
    # are under data_dir, else the synthetic a7a-shaped stand-in (results say which ran); or a
    # LIBSVM name ("a7a", "w5a": missing files are an error), "synthetic" or "synthetic-<name>".
    config.logistic = _optimizer(0.5, 0.5, 8, 3_000)
    config.logistic.dataset = "auto"
    config.logistic.init_scale = 0.01  # w0 ~ N(0, scale² I).
    # Root folder of libsvm/<name>; None: $ZOJAX_DATA_DIR, else ~/.cache/zojax.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.synthetic_seed = 0  # seed of the synthetic datasets.

    # (d) A Flax MLP (64 → hidden → 10, tanh) on scikit-learn's digits (1,797 8×8 images,
    # embedded), minibatch training, 20% held out for the test accuracy.
    config.digits_mlp = _optimizer(0.1, 0.02, 16, 3_000)
    config.digits_mlp.hidden = 32
    config.digits_mlp.batch_size = 64
    config.digits_mlp.init_seed = 0

    # Curvature at every evaluation: hessian_trace and tr H² exact (basis HVPs) when d <= this,
    # else Hutchinson with its standard error (`*_stderr`); λ_max by Lanczos.
    config.exact_max_dim = 1_000
    config.hutchinson_samples = 64  # Rademacher probes (the same at every evaluation).
    config.lanczos_iters = 30  # steps of hessian_top_eigenvalue (at most d).
    # The spectrum at the last evaluation (hessian_spectrum), stored in results.json.
    config.spectrum_iters = 30
    config.spectrum_samples = 10
    config.curvature_seed = 0  # key of the probes of Hutchinson, Lanczos and the spectrum.

    # Schedule (each problem's num_steps is its own budget; config.num_steps is the longest).
    config.num_steps = 20_000
    config.eval_every = 250  # metrics every this many steps (and at 0 and the last)...
    config.log_evals = 20  # ...plus this many log-spaced steps.
    config.evals_per_chunk = 20  # at most this many evaluations per compiled chunk.
    config.checkpoint_every = 5  # chunks between checkpoints (the last chunk always saves).
    config.rng_impl = "philox4x32"  # PRNG of the directions (see configs/test_function.py).
    # Programs run one after the other: side by side (the runner's default on 2 cores) two of
    # this sweep's programs wedged XLA's CPU runtime (every thread idle in device_get, jax
    # 0.10.2), with or without --xla_cpu_multi_thread_eigen=false. One at a time the whole
    # sweep takes about 50 s on 2 cores.
    config.concurrent_programs = 1

    if arg == "smoke":
        config.tilts = (1.0, 100.0)
        for name in PROBLEMS:
            config[name].num_steps = 60
        config.test_function.dim = 10
        config.two_scales.n = 2
        config.logistic.dataset = "synthetic"
        config.digits_mlp.hidden = 16  # d = 1,210 > exact_max_dim: the Hutchinson path
        config.hutchinson_samples = 8
        config.lanczos_iters = 8
        config.spectrum_iters = 6
        config.spectrum_samples = 2
        config.num_steps = 60
        config.eval_every = 30
        config.log_evals = 0
        config.evals_per_chunk = 2
        config.checkpoint_every = 1
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'smoke'.")
    return config
