"""Few-shot fine-tuning of all-MiniLM-L6-v2: GD vs ZO vs ZEST (experiments/finetune.py).

    python -m experiments.finetune --config configs/finetune.py --config.data_dir=../shared/data \
        --workdir /tmp/zojax/finetune
    python -m experiments.finetune --config configs/finetune.py:paper ...   # the paper's budgets
    python -m experiments.finetune --config configs/finetune.py:smoke --workdir /tmp/smoke

The default is sized for this 2-core CPU (about 17 minutes): SST-2 from the LM-BFF 16-shot split
16-42 (``--config.tasks='("sst-2","sst-5","trec")'`` runs all three), ZO and ZEST 300 steps, SGD
and Adam 100 steps, metrics every 100 steps. Learning rates: at the probed start on SST-2 the
loss has tr H ≈ 650 and λ_max ≈ 15; a ZO-SGD step lowers the expected loss only for
η < 2 / tr H, so ZO and ZEST take η = 5e-4 ≈ 0.3 / tr H (MeZO's 1e-6 to 1e-7 on RoBERTa-large
needs its 100,000 steps) and SGD η = 3e-2 ≈ 0.5 / λ_max. TREC and SST-5 start sharper
(tr H ≈ 1,750–2,000): there ZO and ZEST need ``--config.zo.learning_rate=1e-4
--config.zest.learning_rate=1e-4`` (at 5e-4 they diverge). ``:paper`` takes
the paper's Figure 3 budgets (K = 256 sampled per class, minibatches of 64, 100,000 ZO steps:
days on this CPU). ``:smoke`` runs the embedded random 2-layer model on the synthetic task in
seconds: it needs neither the data nor the model package.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CPU-sized default; ``arg="paper"`` the paper's budgets, ``arg="smoke"`` the tests'."""
    config = ml_collections.ConfigDict()

    config.model = "pretrained"  # or "default": the random 2-layer stand-in (no package).
    config.tasks = ("sst-2",)  # any of "sst-2", "sst-5", "trec", "synthetic".
    config.k = 16  # training examples per class.
    # An LM-BFF split under text/k-shot/ (16-13, 16-21, 16-42, 16-87, 16-100; K = 16), or None:
    # K per class sampled with data_seed from the original train file.
    config.split = ml_collections.config_dict.placeholder(str)
    config.split = "16-42"
    # Root folder of text/; None: $ZOJAX_DATA_DIR, else ~/.cache/zojax.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.data_seed = 0  # K-shot sampling, the test subsample, the minibatches, the trace batch.
    config.init_seed = 0  # the default model's random init.
    config.max_length = 64  # tokens of every training and test input ([CLS] and [SEP] included).
    config.batch_size = 16  # minibatch of a step; also the trace batch.
    config.eval_batch_size = 32  # rows per forward pass in the metrics.
    config.probe_c = 1.0  # inverse L2 penalty of the linear probe that initializes the head.

    config.methods = ("sgd", "adam", "zo", "zest")
    config.sgd = ml_collections.ConfigDict({"learning_rate": 3e-2})  # ~0.5 / λ_max at the start
    config.adam = ml_collections.ConfigDict({"learning_rate": 1e-5})
    config.zo = ml_collections.ConfigDict({  # MeZO: central, one direction, regenerated.
        "learning_rate": 5e-4, "smoothing": 1e-3, "num_directions": 1, "scheme": "central",
        "chunk_size": 1, "seed": 0,
        # True: the direction regenerated at each use, never stored (zojax.low_memory).
        "low_memory": ml_collections.config_dict.placeholder(bool)})
    config.zest = ml_collections.ConfigDict({  # one ± pair: zo's two queries a step.
        "learning_rate": 5e-4, "smoothing": 1e-3, "tilt": 1.0, "num_directions": 2,
        "chunk_size": 1, "seed": 0})

    # Curvature on the trace batch.
    config.zo_trace = ml_collections.ConfigDict({"delta": 1e-2, "num_samples": 16})
    config.hutchinson_samples = 8  # probes of the last layer's trace.
    config.curvature_seed = 0

    # Schedule.
    config.num_steps = 300  # ZO and ZEST.
    config.gd_steps = 100  # SGD and Adam.
    config.eval_every = 100
    config.log_evals = 0
    config.evals_per_chunk = 1
    config.checkpoint_every = 1
    config.concurrent_programs = 1  # one 22.6M-parameter program at a time on 2 cores

    if arg == "paper":  # Figure 3: ZO lr 1e-5, λ = 1e-3, 100k steps, batch 64, GD SGD lr 5e-5
        config.tasks = ("sst-2", "sst-5", "trec")
        config.split = None
        config.k = 256
        config.batch_size = 64
        config.num_steps = 100_000
        config.gd_steps = 1_000
        config.sgd.learning_rate = 5e-5
        config.zo.learning_rate = config.zest.learning_rate = 1e-5
        config.eval_every = 1_000
        config.evals_per_chunk = 1
    elif arg == "smoke":
        config.model = "default"
        config.tasks = ("synthetic",)
        config.k = 16
        config.split = None
        config.batch_size = 8
        config.max_length = 16
        config.sgd.learning_rate = 0.1
        config.adam.learning_rate = 1e-3
        config.zo.learning_rate = 1e-3
        config.zest.learning_rate = 1e-3
        config.zo_trace.num_samples = 2
        config.hutchinson_samples = 2
        config.num_steps = 6
        config.gd_steps = 4
        config.eval_every = 3
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'paper', 'smoke'.")
    return config
