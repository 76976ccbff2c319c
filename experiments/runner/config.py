"""The config checks and the evaluation schedule every experiment shares (plain Python: nothing
is compiled). :mod:`experiments.runner` re-exports every public name.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

SCHEDULE_FIELDS = ("num_steps", "eval_every", "evals_per_chunk", "checkpoint_every")
BATCHING = ("vmap", "separate")  # values of config.batch_members
POSITIVE_FIELDS = (*SCHEDULE_FIELDS, "learning_rate", "smoothing", "tilt", "num_directions",
                   "metrics_batch", "chunk_size", "concurrent_programs", "lora_rank",
                   "lora_alpha")
OPTIONAL_FIELDS = ("chunk_size",)  # may also be None (the method's default)
SEED_FIELDS = ("seed", "data_seed")  # non-negative integers
# Which parameters a member tunes: fields of every method (experiments.runner.tuning).
TUNING_FIELDS = ("tuning", "lora_rank", "lora_alpha", "tuned_paths")


class ConfigError(ValueError):
    """A config value the runner cannot use (the message names the field)."""


class ConfigMismatchError(ConfigError):
    """The workdir holds a run of a different config."""


class OldWorkdirError(ConfigError):
    """The workdir was written by an older version of the runner (start over: ``--overwrite``)."""


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def as_tuple(value) -> tuple:
    """A config value as a tuple of the values it sweeps (one value: a 1-tuple)."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def check_positive(where: str, value) -> None:
    """Raises ConfigError unless ``value`` is a positive finite number or a tuple of them."""
    for v in as_tuple(value):
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and v > 0):
            raise ConfigError(f"{where} must be positive, got {value!r}.")


def validate(config, positive: Sequence[str] = POSITIVE_FIELDS) -> None:
    """Raises ConfigError (a ValueError) naming the field when a step count, λ or η is not positive.

    Every field (at any depth) whose name is in ``positive`` must hold a positive number or a
    tuple of them (``chunk_size`` may also be None), every field named ``seed`` or ``data_seed``
    non-negative integers; ``log_evals`` must be >= 0.
    """
    missing = [field for field in SCHEDULE_FIELDS if field not in config]
    if missing:
        raise ConfigError(f"config lacks {missing}: the runner reads {SCHEDULE_FIELDS}.")
    for path, value in _leaves(config):
        name = path.rsplit(".", 1)[-1]
        if name in positive and not (value is None and name in OPTIONAL_FIELDS):
            check_positive(f"config.{path}", value)
        if name in SEED_FIELDS and not all(isinstance(s, int) and not isinstance(s, bool)
                                           and s >= 0 for s in as_tuple(value)):
            raise ConfigError(f"config.{path} must be non-negative integers, got {value!r}.")
    for name in ("metrics_batch", "evals_per_chunk", "num_steps", "concurrent_programs"):
        if not isinstance(config.get(name, 1), int) or isinstance(config.get(name, 1), bool):
            raise ConfigError(f"config.{name} must be a positive int, got {config[name]!r}.")
    if config.get("log_evals", 0) < 0:
        raise ConfigError(f"config.log_evals must be >= 0, got {config.log_evals!r}.")
    if config.get("batch_members", "vmap") not in BATCHING:
        raise ConfigError(f"config.batch_members must be one of {BATCHING}, got "
                          f"{config.batch_members!r}.")


def check_choices(config, choices: Mapping[str, Sequence]) -> None:
    """Raises ConfigError naming the field unless each field of ``choices`` holds known values.

    A field holding a tuple (a sweep) must be non-empty, without repeats, of known values; a
    field holding one value must be known. ``choices[field]`` of None allows any value (the
    tuple is only checked to be non-empty, without repeats).
    """
    for field, known in choices.items():
        value = config[field]
        values = as_tuple(value)
        if known is not None and any(v not in known for v in values):
            kind = "a non-empty tuple of" if isinstance(value, tuple | list) else "one of"
            raise ConfigError(f"config.{field} must be {kind} {tuple(known)}, got {value!r}.")
        if not values:
            raise ConfigError(f"config.{field} must name at least one value, got {value!r}.")
        if len(set(values)) != len(values):
            raise ConfigError(f"config.{field} has repeated values: {value!r}.")


# ---------------------------------------------------------------------------------------------
# The schedule.


def eval_steps(config, num_steps: int | None = None) -> np.ndarray:
    """Steps with metrics: 0, every ``eval_every``, the last, and ``log_evals`` log-spaced.

    ``num_steps`` (default ``config.num_steps``) is the member's budget.
    """
    num_steps = config.num_steps if num_steps is None else num_steps
    steps = set(range(0, num_steps, config.eval_every)) | {num_steps}
    if config.get("log_evals", 0):
        steps |= set(np.geomspace(1, num_steps, config.log_evals).round().astype(int))
    return np.array(sorted(int(s) for s in steps))


def chunk_size(num_evals: int, evals_per_chunk: int) -> int:
    """Evaluations per compiled chunk: the fewest chunks of at most ``evals_per_chunk``, of equal
    size (only the last is padded, by fewer evaluations than there are chunks)."""
    return -(-num_evals // -(-num_evals // evals_per_chunk))
