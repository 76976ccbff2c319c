"""The training loop every experiment shares.

An experiment module builds problems (:class:`Problem`: objective, data, starting point, metrics)
and runs (:class:`Member`), and calls :func:`run` with them, its config and a workdir::

    problem = runner.Problem(loss=loss, metrics=metrics, init_params=params)
    members = runner.sweep("gd", config.gd, problem) + runner.sweep("zo", config.zo, problem)
    runner.run(runner.Experiment("name", members, plot=plot), config, workdir)

The runner

- groups the members that share a problem, a method, the method's static hyperparameters
  (``num_directions``, ``direction``, ``chunk_size``, ...) and a step budget, stacks their
  traced ones (``learning_rate``, ``smoothing``, ``seed``) and runs them in one compiled
  program, vmapped (or, with ``batch_members="separate"``, each member alone in its own run of
  one shared compilation: faster for tiny problems); programs run side by side on the CPU cores;
- runs each group's steps as jitted ``lax.scan`` chunks of at most ``evals_per_chunk``
  evaluations (equal chunks: :func:`chunk_size`); minibatches (``Problem.batch_fn``) are drawn
  and the metrics computed inside the program (:mod:`experiments.runner.program`); between chunks it
  appends the metrics, advances a progress bar and writes an orbax checkpoint of every member
  every ``checkpoint_every`` chunks (and on SIGINT/SIGTERM, before raising
  :class:`Interrupted`);
- resumes from the last checkpoint in ``workdir``; on a finished workdir it only prints the
  summary and redraws the plot; a different config for an existing workdir is an error
  (:class:`ConfigMismatchError`) unless ``overwrite``, and so is a workdir of an older runner
  (:class:`OldWorkdirError`);
- marks a member whose loss turns non-finite, or whose estimator skipped a non-finite step
  (``num_nonfinite`` grew): its state is frozen at its last good evaluation, its metrics are
  null from then on, the other members go on, and :class:`NonFiniteError` names it at the end;
- writes ``workdir/results.json`` (schema in :func:`run`) and ``workdir/<name>.png`` / ``.pdf``;
- trains a member that sets ``tuning="lora"`` or ``"prefix"`` (fields of every method) on its LoRA
  adapters or its parameter subset alone, the rest frozen (:mod:`experiments.runner.tuning`).

:func:`load_member` reads one member's params (and optimizer state) from a checkpoint, for
analysis, without the experiment; :func:`load_params` those of every member of an experiment.

The package's modules: :mod:`~experiments.runner.spec` (what an experiment gives the runner),
:mod:`~experiments.runner.methods` (the methods members name), :mod:`~experiments.runner.config`
(the config checks and the schedule), :mod:`~experiments.runner.tuning` (which parameters a member
tunes), :mod:`~experiments.runner.program` (the compiled chunk),
:mod:`~experiments.runner.groups` (the members each program runs), :mod:`~experiments.runner.loop`
(the loop), :mod:`~experiments.runner.storage` and :mod:`~experiments.runner.checkpointing` (the
workdir), :mod:`~experiments.runner.cli` (the command line, not imported here: absl flags).

Config fields read here: ``num_steps``, ``eval_every``, ``log_evals``, ``evals_per_chunk``,
``checkpoint_every`` and optionally ``rng_impl``, ``batch_members``, ``metrics_batch`` (default 1:
evaluations whose metrics are vmapped together; memory grows with it), ``data_seed`` (default 0: the
minibatch key), ``concurrent_programs`` (default: the CPU count; how many programs compile and run
side by side; 1 runs them one after the other) and ``mesh_shape`` (default none: one device; a dict
of axis name → size, ``{"members": 8}`` or ``{"directions": 4, "members": 2}``: each group's members
are split over the ``members`` axis when their number is a multiple of its size, and the estimators
split their directions over the ``directions`` axis; see
:func:`experiments.runner.groups.make_mesh`).
"""

from experiments.runner.config import (
    BATCHING,
    POSITIVE_FIELDS,
    SCHEDULE_FIELDS,
    ConfigError,
    ConfigMismatchError,
    OldWorkdirError,
    as_tuple,
    check_choices,
    check_positive,
    chunk_size,
    eval_steps,
    validate,
)
from experiments.runner.loop import Interrupted, NonFiniteError, load_params, run
from experiments.runner.methods import METHODS, Method, method
from experiments.runner.program import Arrays, Program, TrainState, step_memory
from experiments.runner.spec import Experiment, Member, Minibatches, Problem, sweep
from experiments.runner.storage import load_member, metric_at, non_finite_members, summarize
from experiments.runner.tuning import tuned_problem

__all__ = [
    "BATCHING", "METHODS", "POSITIVE_FIELDS", "SCHEDULE_FIELDS", "Arrays", "ConfigError",
    "ConfigMismatchError", "Experiment", "Interrupted", "Member", "Method", "Minibatches",
    "NonFiniteError", "OldWorkdirError", "Problem", "Program", "TrainState", "as_tuple",
    "check_choices", "check_positive", "chunk_size", "eval_steps", "load_member", "load_params",
    "method", "metric_at", "non_finite_members", "run", "step_memory", "summarize", "sweep",
    "tuned_problem", "validate",
]
