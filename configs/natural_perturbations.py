"""ZO-I vs ZO-co vs ZO-NP at equal query budgets (experiments/natural_perturbations.py).

    python -m experiments.natural_perturbations --config configs/natural_perturbations.py \
        --workdir /tmp/zojax/natural_perturbations
    python -m experiments.natural_perturbations --config configs/natural_perturbations.py:smoke \
        --workdir /tmp/smoke

Every method takes Q perturbations of one block per step (Q + 1 loss queries) and Adam steps;
ZO-NP also spends (N_b + 1)·fisher_inputs output queries per Fisher refresh, counted in the same
budget, so it runs fewer steps. MNIST and FashionMNIST need their IDX files under
``data_dir/<name>/`` (zojax.datasets.load_idx); with ``skip_missing`` they are skipped when
absent.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Q-sweep on digits; ``arg="smoke"`` is a seconds-long variant for the tests."""
    config = ml_collections.ConfigDict()

    config.datasets = ("digits",)  # any of "digits" (embedded), "mnist", "fashion_mnist".
    config.skip_missing = True  # skip an IDX dataset whose files are missing (else an error).
    # Root folder of <name>/ IDX files; None: $ZOJAX_DATA_DIR, else ~/.cache/zojax.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.models = ("cnn", "mlp")  # any of "cnn", "mlp", "mixer".
    config.methods = ("zo_i", "zo_co", "zo_np")
    config.num_perturbations = (1, 2, 5, 10, 20, 50, 100)  # Q: perturbations per step.
    config.query_budget = 100_000  # loss + Jacobian queries per member.
    config.seeds = (0, 1, 2)  # seeds of the perturbations (and blocks), vmapped together.
    config.data_seed = 0  # the digits split and the minibatches (shared by every member).
    config.init_seed = 0  # the models' initial parameters (shared by every member).

    config.batch_size = 64  # minibatch of a step (one loss query is one minibatch loss).
    config.learning_rate = 0.01  # Adam's, every method.
    config.smoothing = 0.01  # λ, every method.
    config.max_block_size = 64  # N: the blocks every method perturbs, one per step.

    config.zo_np = ml_collections.ConfigDict()
    config.zo_np.damping = 0.1  # ρ: Σ_b = (1 + ρ)(F_b + ρI)⁻¹.
    config.zo_np.ema = 0.5  # weight of a refreshed Fisher.
    config.zo_np.update_every = 50  # steps between refreshes (of the step's block).
    config.zo_np.fisher_inputs = 8  # rows of the minibatch the Fisher's outputs are taken on.
    config.zo_np.jacobian = "zeroth_order"  # or "autodiff" (white-box: one query a refresh).
    config.zo_np.max_fisher_blocks = ml_collections.config_dict.placeholder(int)  # None: all.

    # Models (inputs: 8×8 digits or 28×28 IDX images).
    config.cnn = ml_collections.ConfigDict()
    config.cnn.features = (8,)  # 3×3 conv + tanh + 2×2 pool per entry, then a Dense head.
    config.mlp = ml_collections.ConfigDict()
    config.mlp.hidden = (32,)  # tanh hidden widths.
    config.mixer = ml_collections.ConfigDict()
    config.mixer.patch_size = 4
    config.mixer.hidden_dim = 32
    config.mixer.tokens_mlp_dim = 16
    config.mixer.channels_mlp_dim = 64
    config.mixer.depth = 2
    config.metrics_train_rows = 10_000  # train loss and accuracy on at most this many rows.

    # Schedule: each member's steps come from the budget; config.num_steps bounds them all.
    config.num_steps = 200_000
    config.eval_every = 500  # metrics every this many steps (and at 0 and the last)...
    config.log_evals = 10  # ...plus this many log-spaced steps.
    config.evals_per_chunk = 20
    config.checkpoint_every = 5
    config.concurrent_programs = 1  # one program at a time (see configs/tilted.py)

    if arg == "smoke":
        config.models = ("cnn",)
        config.num_perturbations = (2, 10)
        config.query_budget = 3_000
        config.seeds = (0, 1)
        config.zo_np.update_every = 20
        config.metrics_train_rows = 200
        config.num_steps = 3_000
        config.eval_every = 50
        config.log_evals = 0
        config.evals_per_chunk = 4
        config.checkpoint_every = 1
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'smoke'.")
    return config
