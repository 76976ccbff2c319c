"""ZO-Bench-style comparison of 12 methods at equal query budgets (experiments/zo_bench.py).

    python -m experiments.zo_bench --config configs/zo_bench.py --config.data_dir=DATA_DIR \
        --workdir /tmp/zojax/zo_bench
    python -m experiments.zo_bench --config configs/zo_bench.py:logistic ...  # a7a alone (minutes)
    python -m experiments.zo_bench --config configs/zo_bench.py:smoke --workdir /tmp/smoke

Two problems, each with its query budget (objective evaluations; a gradient or a jvp counts as
one, the runner's convention), split into as many steps as each method's queries per step
allow: multinomial logistic regression on a7a's 123 raw binary inputs (W 123 × 2 and b: a
matrix leaf for LOZO), minibatches of 64, and the few-shot SST-2 fine-tuning of the whole
all-MiniLM-L6-v2 (the fine-tuning experiment's setup, 16-shot split 16-42, minibatches of 16).
ZO-SVRG's large batch is the whole training set. Every zeroth-order method evaluates one
direction at a time (``chunk_size=1``, MeZO's memory). Learning rates: the fine-tuning
experiment's for MiniLM (ZO 5e-4 ≈ 0.3 / tr H at the start), and on a7a ZO ≈ 0.5 / tr H
(tr H ≈ 1 at w = 0); the variants take ZO-SGD's η except FZOO (a normalized step: its η is a
step length) and ZO-sign / ZO-Adam (per-coordinate steps). Not tuned per method: a shared
budget and defaults, as ZO-Bench's own comparison.
"""

import ml_collections

METHODS = ("fo_sgd", "fo_adam", "zo_sgd", "zo_adam", "zo_sign", "forward_grad", "zest", "hizoo",
           "lozo", "sparse_mezo", "fzoo", "zo_svrg")


def _methods(lr: float, smoothing: float, gd_lr: float, adam_lr: float, fzoo_lr: float,
             sign_lr: float, hessian_smooth: float, rank: int) -> ml_collections.ConfigDict:
    zo = {"learning_rate": lr, "smoothing": smoothing}
    return ml_collections.ConfigDict({
        "fo_sgd": {"learning_rate": gd_lr},
        "fo_adam": {"learning_rate": adam_lr},
        "zo_sgd": dict(zo),
        "zo_adam": {"learning_rate": adam_lr, "smoothing": smoothing},
        "zo_sign": {"learning_rate": sign_lr, "smoothing": smoothing},
        "forward_grad": {"learning_rate": lr},
        "zest": {**zo, "tilt": 1.0, "num_directions": 2},  # one ± pair: 2 queries a step
        "hizoo": {**zo, "hessian_smooth": hessian_smooth},
        "lozo": {**zo, "rank": rank, "refresh_every": 50},
        "sparse_mezo": {**zo, "sparsity": 0.75},
        "fzoo": {"learning_rate": fzoo_lr, "smoothing": smoothing, "num_directions": 4},
        "zo_svrg": {**zo, "snapshot_every": 10},
    })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Both problems; ``arg``: ``"logistic"`` (a7a alone) or ``"smoke"`` (seconds, no files)."""
    config = ml_collections.ConfigDict()
    config.problems = ("logistic", "minilm")
    config.methods = METHODS
    config.seeds = (0, 1)  # each ZO member's directions; first-order members run seed 0 only
    # Root of libsvm/ and text/; None: $ZOJAX_DATA_DIR, else ~/.cache/zojax.
    config.data_dir = ml_collections.config_dict.placeholder(str)

    config.logistic = ml_collections.ConfigDict()
    config.logistic.dataset = "a7a"  # a LIBSVM name, or "synthetic-a7a" (generated, no files)
    config.logistic.query_budget = 4_000
    config.logistic.batch_size = 64
    config.logistic.init_scale = 0.01  # W, b ~ N(0, σ²): not 0, Sparse-MeZO's thresholds
    config.logistic.hparams = _methods(lr=0.1, smoothing=1e-3, gd_lr=1.0, adam_lr=1e-2,
                                       fzoo_lr=0.05, sign_lr=1e-3, hessian_smooth=1e-3, rank=1)

    config.minilm = ml_collections.ConfigDict()  # the fields experiments.finetune.problem reads
    config.minilm.model = "pretrained"  # or "default": the random 2-layer stand-in
    config.minilm.task = "sst-2"
    config.minilm.k = 16
    config.minilm.split = ml_collections.config_dict.placeholder(str)
    config.minilm.split = "16-42"
    config.minilm.query_budget = 300
    config.minilm.max_length = 64
    config.minilm.batch_size = 16
    config.minilm.eval_batch_size = 32
    config.minilm.probe_c = 1.0
    config.minilm.init_seed = 0
    config.minilm.zo_trace = ml_collections.ConfigDict({"delta": 1e-2, "num_samples": 4})
    config.minilm.hutchinson_samples = 2
    config.minilm.curvature_seed = 0
    config.minilm.hparams = _methods(lr=5e-4, smoothing=1e-3, gd_lr=3e-2, adam_lr=1e-5,
                                     fzoo_lr=3e-4, sign_lr=1e-6, hessian_smooth=1e-8, rank=2)

    # The runner's schedule (num_steps and eval_every are set per problem and method).
    config.data_seed = 0
    config.num_steps = 1  # unused: every member has its own budget (query_budget)
    config.eval_every = 50  # steps, every member
    config.log_evals = 0
    config.evals_per_chunk = 10  # evaluations per compiled chunk (and checkpoint)
    config.checkpoint_every = 1
    config.concurrent_programs = 1

    if arg == "logistic":
        config.problems = ("logistic",)
    elif arg == "smoke":
        config.seeds = (0,)
        config.logistic.dataset = "synthetic-a7a"
        config.logistic.query_budget = 40
        config.eval_every = 4
        config.minilm.model = "default"
        config.minilm.task = "synthetic"
        config.minilm.split = None
        config.minilm.batch_size = 8
        config.minilm.max_length = 16
        config.minilm.query_budget = 8
        config.minilm.zo_trace.num_samples = 1
        config.minilm.hutchinson_samples = 1
        config.minilm.hparams = _methods(lr=1e-3, smoothing=1e-3, gd_lr=0.1, adam_lr=1e-3,
                                         fzoo_lr=1e-3, sign_lr=1e-4, hessian_smooth=1e-3, rank=1)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'logistic', 'smoke'.")
    return config
