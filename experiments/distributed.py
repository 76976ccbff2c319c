r"""Figure 2's logistic-regression ZO run with its directions split across processes.

The run of :mod:`experiments.linear_models` (defined in :mod:`experiments.linear_tasks`) (logistic
regression over random features, ZO-SGD, the paper's η and λ) with
``config.logistic.zo.num_directions`` directions per step split over every device of every process:
``jax.distributed.initialize`` joins the processes, the runner's mesh (``config.mesh_shape``, by
default ``{"directions": jax.device_count()}``) spans all their devices, and each step's estimator
reduces one gradient-sized accumulator across them. Every process holds the same (replicated)
parameters and runs the same program; checkpoints are orbax's multi-process ones, and process 0
writes results.json and the plot.

Two processes on one machine (CPU devices; their collectives go through gloo)::

    for i in 0 1; do
      python -m experiments.distributed --config configs/distributed.py:smoke \
          --workdir /tmp/dist --coordinator_address=localhost:12355 --num_processes=2 \
          --process_id=$i &
    done; wait

On a multi-host GPU cluster, the same command on every host, the coordinator's address, the
process count and each process's id given as flags or found by ``jax.distributed.initialize``
in the environment (SLURM, Open MPI, Kubernetes/TPU pods: no flags needed)::

    python -m experiments.distributed --config configs/distributed.py \
        --config.data_dir=/data --workdir /shared/dist \
        --coordinator_address=$COORDINATOR:12355 --num_processes=$NUM_HOSTS --process_id=$RANK

Without process flags or a cluster environment it runs as one process on the local devices.
"""

import os

import jax
from absl import flags

from experiments import linear_tasks

COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0 (jax.distributed.initialize).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0 ... n - 1.")


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """``jax.distributed.initialize`` (CPU collectives through gloo) when any argument is given
    or ``auto`` finds a cluster environment; nothing for a single process."""
    given = (coordinator_address, num_processes, process_id)
    if all(x is None for x in given) and not _in_cluster():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs use NCCL
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _in_cluster() -> bool:
    return any(name in os.environ for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                                               "OMPI_COMM_WORLD_SIZE"))


def with_mesh(config):
    """``config`` with ``mesh_shape`` set: its value, or the directions over every device."""
    if config.get("mesh_shape"):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh_shape = {"directions": jax.device_count()}
    return config


def train_and_evaluate(config, workdir, *, overwrite: bool = False) -> dict:
    """Joins the processes (the process flags, if parsed), then runs (or resumes) the run."""
    if flags.FLAGS.is_parsed():
        initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    return linear_tasks.train_and_evaluate(with_mesh(config), workdir, overwrite=overwrite)


if __name__ == "__main__":
    from experiments.runner import cli

    cli.main(train_and_evaluate)
