"""Figure 1 of "Zeroth-order optimization finds flat minima": GD vs ZO on h(y, z) = (yᵀz − 1)²/2.

    python -m experiments.test_function --config configs/test_function.py --workdir /tmp/fig1
    python -m experiments.test_function --config configs/test_function.py:smoke --workdir /tmp/s

Tuple fields are swept: one run per value, and runs that differ only in traced values
(learning_rate, smoothing, seed) share one vmapped program. Override a tuple with one value
(``--config.zo.smoothing=0.2``) or several (``--config.zo.smoothing='(0.2, 0.1)'``).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's setting; ``arg="smoke"`` is a seconds-long variant for tests."""
    config = ml_collections.ConfigDict()

    # Problem: x = (y, z), y, z ∈ R^dim, start y, z ~ N(0, init_scale² I).
    config.dim = 100  # d (the problem has 2d parameters).
    # σ of the start: 0.88 gives trace ≈ 2dσ² ≈ 155 as in the paper's figure. σ = 1 (the public
    # script) starts near 200-220, at or above GD's stability limit 2/η = 200, so GD itself then
    # drops the trace early.
    config.init_scale = 0.88
    # Seed of the starting point, shared by every run: its trace is 155.0, the expected 2dσ²
    # (seed 0 would start at 189).
    config.init_seed = 11

    # Methods. Each run's step is x ← x − η ĝ.
    config.gd = ml_collections.ConfigDict()
    config.gd.learning_rate = (0.01,)  # η of gradient descent.

    config.zo = ml_collections.ConfigDict()
    config.zo.learning_rate = (0.001,)  # η of ZO-SGD.
    # λ of the two-point estimator; the first value is panel (a)'s ZO run, all form panel (b).
    config.zo.smoothing = (0.1, 0.05, 0.01)
    config.zo.num_directions = 1  # q directions per step (2q evaluations with "central").
    config.zo.direction = "gaussian"  # u ~ N(0, I) (see zojax.directions for the others).
    config.zo.scheme = "central"  # (f(x+λu) − f(x−λu))/(2λ); "forward": (f(x+λu) − f(x))/λ.
    config.zo.seed = (0,)  # seed of the directions.
    # Directions evaluated per batch (None: all q at once; 1: one perturbed copy of x at a time).
    config.zo.chunk_size = ml_collections.config_dict.placeholder(int)
    # True: every direction regenerated where it is used, never stored (zojax.low_memory).
    config.zo.low_memory = ml_collections.config_dict.placeholder(bool)

    config.forward_grad = ml_collections.ConfigDict()  # "ZO with λ → 0": (uᵀ∇h) u by jvp.
    config.forward_grad.learning_rate = (0.001,)  # η.
    config.forward_grad.num_directions = 1  # q directions (jvps) per step.
    config.forward_grad.direction = "gaussian"  # as config.zo.direction.
    config.forward_grad.seed = (0,)  # seed of the directions.
    config.forward_grad.chunk_size = ml_collections.config_dict.placeholder(int)  # as zo's.

    # Schedule.
    config.num_steps = 100_000  # iterations of every run.
    config.eval_every = 100  # loss and trace every this many steps (and at step 0)...
    config.log_evals = 40  # ...plus this many log-spaced steps, for the log x-axis (0: none).
    config.evals_per_chunk = 200  # at most this many evaluations per compiled chunk (progress bar).
    config.checkpoint_every = 2  # chunks between checkpoints (the last chunk always saves).
    # PRNG of the directions: philox4x32 draws the small per-step vectors several times faster
    # than threefry2x32 on CPU (a different but equally valid random stream).
    config.rng_impl = "philox4x32"
    # How runs sharing a program (the λ sweep) run: "vmap" vectorizes them in one program,
    # "separate" runs each alone (one compilation, members side by side on the CPU cores). With
    # 200 parameters batched small ops cost more than they save, and each member then runs
    # exactly the computation of a standalone run (vmapped, last-bit differences grow into
    # percent-level loss differences on this ill-conditioned residual).
    config.batch_members = "separate"

    if arg == "smoke":
        config.num_steps = 2_000
        config.log_evals = 8
        config.evals_per_chunk = 8
        config.checkpoint_every = 1
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'smoke'.")
    return config
