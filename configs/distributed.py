"""Figure 2's logistic-regression ZO run with its directions split across processes.

    python -m experiments.distributed --config configs/distributed.py \
        --config.data_dir=DATA_DIR --workdir /tmp/dist [process flags]
    python -m experiments.distributed --config configs/distributed.py:smoke --workdir /tmp/s

The process flags (``--coordinator_address``, ``--num_processes``, ``--process_id``) are not
config fields: every process must run the same config. See experiments/distributed.py.

Variants: ``smoke`` (seconds, synthetic data, few features: what the tests run).
"""

import ml_collections

from configs import linear_models


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Figure 2's logistic-regression ZO member on a7a; ``arg``: ``"smoke"``."""
    config = linear_models.get_config("smoke" if arg == "smoke" else None)
    if arg not in (None, "smoke"):
        raise ValueError(f"Unknown variant {arg!r}; known: 'smoke'.")
    if arg is None:
        config.datasets = ("a7a",)
    config.losses = ("logistic",)  # the paper's η = 0.01, λ = 0.1 (configs/linear_models.py)
    config.methods = ("zo",)
    # q directions per step, split evenly over every device of every process: a multiple of
    # the device count (jax.device_count()); each device evaluates q / devices of them.
    config.logistic.zo.num_directions = 8 if arg == "smoke" else 64
    # The mesh: None splits the directions over all devices, {"directions": jax.device_count()}
    # (results.json records the mesh used); or set config.mesh_shape as the runner reads it.
    config.mesh_shape = ml_collections.config_dict.placeholder(dict)
    # Sharded directions need threefry2x32 or rbg keys: philox4x32 (Figure 2's) does not
    # compile inside shard_map.
    config.rng_impl = "threefry2x32"
    if arg == "smoke":
        config.num_steps = 40
        config.log_evals = 3
    return config
