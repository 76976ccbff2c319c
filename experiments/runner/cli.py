"""The command line every experiment shares (absl flags, a locked config file, a workdir).

    python -m experiments.<name> --config configs/<name>.py[:variant] --workdir DIR
        [--config.<field>=<value> ...] [--overwrite]

An experiment module ends with ``if __name__ == "__main__": cli.main(train_and_evaluate)``
(``from experiments.runner import cli``).

Compiled programs are kept in JAX's persistent compilation cache, ``$JAX_COMPILATION_CACHE_DIR``
or else ``$XDG_CACHE_HOME/zojax/jax`` (``~/.cache/zojax/jax``): compiling is most of a short
run, so a command run again (resumed, or with other values of traced fields) starts at once.
"""

import logging as pylogging
import os
import pathlib
import runpy
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.runner.config import ConfigError
from experiments.runner.loop import Interrupted, NonFiniteError


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_fields(argv: list[str]) -> list[str]:
    """``field = value`` lines of the config named by ``--config`` in ``argv``."""
    if (path := _config_path(argv)) is None:
        return []
    path, _, variant = path.partition(":")
    config = runpy.run_path(path)["get_config"](*([variant] if variant else []))

    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key} = {value!r}"

    return list(walk(config, ""))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus the list of valid fields when an override names an unknown one."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:  # raised by the locked ConfigDict
        while error.args and isinstance(error.args[0], Exception):  # unwrap KeyError in
            error = error.args[0]  # AttributeError
        message = str(error.args[0] if error.args else error)
        fields = "\n  ".join(_config_fields(argv))
        sys.exit(f"FATAL Flags parsing error: unknown config field {message}\n"
                 f"Valid config fields:\n  {fields}")


def _enable_compilation_cache() -> None:
    if jax.config.jax_compilation_cache_dir is None:  # $JAX_COMPILATION_CACHE_DIR comes first
        cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
        jax.config.update("jax_compilation_cache_dir",
                          str(pathlib.Path(cache).expanduser() / "zojax" / "jax"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def _exit_now() -> None:
    """Ends a finished command without the interpreter's teardown (~0.4 s of finalizing modules,
    thread pools and the XLA client): results, plots and checkpoints are written and closed by
    then, and the output streams are flushed here."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(train_and_evaluate: Callable[..., object]) -> None:
    """Parses the flags and calls ``train_and_evaluate(config, workdir, overwrite=...)``.

    Exits with status 1 and a one-paragraph message (no traceback) on a bad config value, a
    config that differs from the workdir's, or non-finite members; 128 + signal number when
    interrupted by SIGINT/SIGTERM (after checkpointing).
    """
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file, `path[:variant]`; override fields with --config.<field>.",
        lock_config=True)
    workdir = flags.DEFINE_string("workdir", None,
                                  "Directory for checkpoints, results.json and plots.")
    overwrite = flags.DEFINE_bool("overwrite", False,
                                  "Replace the results of a different config in --workdir.")
    flags.mark_flags_as_required(["config", "workdir"])
    # orbax logs every step of every save at INFO; keep its warnings only.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname)

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        _enable_compilation_cache()
        try:
            train_and_evaluate(config.value, workdir.value, overwrite=overwrite.value)
            _exit_now()
        except Interrupted as interrupted:
            print(interrupted, file=sys.stderr)
            sys.exit(128 + interrupted.signum)
        except (ConfigError, NonFiniteError) as error:
            sys.exit(f"error: {error}")

    app.run(run, flags_parser=_parse_flags)
