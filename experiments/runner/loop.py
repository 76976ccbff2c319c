"""The training loop every experiment shares: :func:`run` (see :mod:`experiments.runner`) and
:func:`load_params`.
"""

import concurrent.futures
import importlib
import os
import pathlib
import signal
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from experiments.runner import groups as _groups
from experiments.runner import program as _program
from experiments.runner import storage
from experiments.runner.config import validate
from experiments.runner.spec import Experiment
from experiments.runner.storage import non_finite_members, summarize
from experiments.runner.tuning import tuned_problem

# ---------------------------------------------------------------------------------------------
# Cross-checks, signals, progress.


def _start_cross_check(groups: list[_groups.Group], when: str, pool: concurrent.futures.Executor,
                       rtol: float = 1e-4) -> concurrent.futures.Future:
    """Compares metrics with their reference implementations on every member's current params.

    Runs in ``pool`` (the future raises RuntimeError on a mismatch) alongside compilation or
    plotting: the references (exact traces) are slow. Members are checked one at a time, so each
    problem and metric compiles one program, shared by the first and the last evaluation; at the
    first evaluation every member of a problem starts from the same point, so one is checked.
    Diverged members are skipped.
    """
    by_problem: dict[int, list[_groups.Group]] = {}
    for group in groups:
        by_problem.setdefault(id(group.problem), []).append(group)
    jobs = []  # what to check, read now: the groups' states move on while the checks run
    for problem_groups in by_problem.values():
        members = [(params, bool(failed)) for g in problem_groups for params, failed in zip(
            _program.unstack(g.state.params, len(g.members)), np.asarray(g.state.failed))]
        jobs.append((problem_groups[0], [params for params, failed in
                                         members[:1 if when == "first" else None] if not failed]))

    def check():
        for group, members in jobs:
            for name, reference in group.problem.reference_metrics.items():
                worst = 0.0
                for params in members:
                    ours, theirs = map(float, _program.metric_and_reference(
                        group.program, name, reference, params, group.arrays))
                    worst = max(worst, abs(ours - theirs) / max(abs(theirs), 1e-30))
                if worst > rtol:
                    raise RuntimeError(f"{name} at the {when} evaluation differs from its "
                                       f"reference by {worst:.2e} (relative).")
                logging.info("cross-check at the %s evaluation: %s matches its reference (max "
                             "relative difference %.1e).", when, name, worst)

    return pool.submit(check)


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after checkpointing the steps done; run again to resume."""

    def __init__(self, signum: int, step: int, workdir: pathlib.Path):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in "
                         f"{workdir}; run the same command again to resume.")


class NonFiniteError(RuntimeError):
    """Some members went non-finite (the others finished); results.json has their nulls."""


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between chunks; a second signal stops at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _postfix(groups: list[_groups.Group], names: Sequence[str]) -> str:
    parts = []
    for name in names:
        latest = [g.history[-1][name][:, -1] for g in groups if name in g.history[-1]]
        values = np.concatenate(latest) if latest else np.array([np.nan])
        if np.isfinite(values).any():
            lo, hi = np.nanmin(values), np.nanmax(values)
            parts.append(f"{name} {lo:.3g}" + (f"..{hi:.3g}" if hi != lo else ""))
    return ", ".join(parts)


def _report(experiment: Experiment, results: dict, workdir: pathlib.Path) -> dict:
    """Prints the summary; raises NonFiniteError for diverged members."""
    print((experiment.summary or summarize)(results))
    failed = non_finite_members(results)
    if failed:
        raise NonFiniteError(
            "non-finite values: " + "; ".join(f"{name!r} from step {step}"
                                             for name, step in failed.items())
            + f" (metrics null from then on in {workdir / 'results.json'}; the other members "
            "finished).")
    return results


def _import_in_background(*modules: str) -> None:
    def load():
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=load, daemon=True).start()


# ---------------------------------------------------------------------------------------------
# The loop.


def run(experiment: Experiment, config, workdir, *, overwrite: bool = False) -> dict:
    """Trains every member of ``experiment``; returns (and writes) the results.

    ``workdir/results.json``::

        {"experiment": str, "config": {...},
         "runs": [{"name": str, "method": str, "hparams": {...}, "steps": [int],
                   "metrics": {"loss": [...], ...}, "num_queries": [int],
                   "wall_seconds": float, "compile_seconds": float,
                   "final_metrics": {...}  # only for problems with final_metrics
                   }]}

    ``steps`` starts at 0 and is shared by every metric of a run (members with their own
    ``num_steps`` have their own); ``hparams`` holds the member's labels and hyperparameters;
    ``num_queries`` counts the optimizer's objective evaluations (metrics excluded), read from
    its state's ``num_queries`` counter when it has one (null once the member went non-finite),
    else ``steps × queries_per_step``; ``wall_seconds`` is the execution time of the compiled
    program that ran the member (shared by vmapped members, compilation excluded) and
    ``compile_seconds`` the time spent compiling it (shared likewise, and by the members whose
    separate runs share one compilation; a persistent-cache hit counts its loading time), both
    cumulative across resumes; non-finite numbers are null. A run of a problem with
    ``final_metrics`` also has ``"final_metrics"``: their values at its last step (nested lists;
    null when the member went non-finite).

    Raises:
        ConfigError: a non-positive step count, λ or η (a ValueError naming the field), a method
            field the method does not know, a loss that fails on its problem's batches.
        ConfigMismatchError: ``workdir`` holds a different config and not ``overwrite``.
        OldWorkdirError: ``workdir`` was written by an older runner and not ``overwrite``.
        Interrupted: SIGINT/SIGTERM (after checkpointing).
        NonFiniteError: some members went non-finite (after writing the results).
        RuntimeError: a metric differs from its reference (results.json is not written).
    """
    validate(config)
    workdir = pathlib.Path(workdir)
    config_dict = storage.jsonable(config.to_dict())
    with _StopSignals() as stop:  # from the start, so a signal during compilation is kept
        results = storage.prepare_workdir(workdir, experiment.name, config_dict, overwrite)
        if results is not None:
            logging.info("%s is finished: printing its summary and redrawing its plot.", workdir)
            storage.draw(experiment, results, workdir)
        else:
            if experiment.plot is not None:  # ~0.5 s of imports, overlapping compilation
                _import_in_background("matplotlib.figure", "matplotlib.backends.backend_agg",
                                      "matplotlib.backends.backend_pdf")
            with concurrent.futures.ThreadPoolExecutor(1) as checker:
                results, last_check = train(experiment, config, config_dict, workdir, stop,
                                             checker)
                storage.draw(experiment, results, workdir)  # while the last cross-check runs
                last_check.result()
            storage.write_json(workdir / "results.json", results)
    return _report(experiment, results, workdir)


def train(experiment: Experiment, config, config_dict: dict, workdir: pathlib.Path,
           stop: _StopSignals, checker: concurrent.futures.Executor
           ) -> tuple[dict, concurrent.futures.Future]:
    """The chunk loop, resumed from the last checkpoint; returns the results and the cross-check
    of the last evaluation (still running in ``checker``)."""
    groups = _groups.make_groups(experiment, config.get("rng_impl"),
                                 config.get("batch_members", "vmap"), config)
    num_members = len(experiment.members)
    data_key = jax.random.key(config.get("data_seed", 0), impl=config.get("rng_impl"))
    for group in groups:
        group.state = _program.init(group.program, group.problem.init_params, group.traced)
        _groups.place(group)
        group.counts_queries = _program.counts_queries(group.state.opt_state)

    # Compiles while the rest is set up, at most concurrent_programs at a time: a large model's
    # compilations hold gigabytes each (SmolLM2's six programs side by side: 16 GB).
    with concurrent.futures.ThreadPoolExecutor(config.get("concurrent_programs")) as pool:
        started = time.perf_counter()
        compiling = _groups.compile_groups(groups, data_key, pool)
        first_check = _start_cross_check(groups, "first", checker)
        checkpoints = storage.checkpointer(workdir)
        if (latest := checkpoints.latest_step()) is not None:
            storage.restore_groups(checkpoints, latest, groups, num_members)
            for group in groups:
                _groups.place(group)
            logging.info("Resuming %s from step %d.", workdir, latest)
        for group, compiled in zip(groups, compiling):
            group.run_chunk, seconds = compiled.result()
            group.compile_seconds += seconds
        first_check.result()  # before training: the checks would slow it down more than they take
    logging.info("Compiled %d program(s) for %d members in %.1f s.", len(groups), num_members,
                 time.perf_counter() - started)

    import tqdm  # lazy

    def position() -> int:
        return max(g.reached() for g in groups)

    # Programs of different groups run side by side: XLA releases the GIL, and one program's
    # matrix-vector products leave CPU cores idle.
    workers = min(len(groups), config.get("concurrent_programs") or os.cpu_count() or 1)
    try:
        with (tqdm.tqdm(total=max(int(g.steps[-1]) for g in groups), initial=position(),
                        unit="step", desc=experiment.name) as bar,
              concurrent.futures.ThreadPoolExecutor(workers) as pool):
            chunks = 0
            while not all(g.finished for g in groups):
                active = [g for g in groups if not g.finished]
                list(pool.map(lambda g: _groups.run_chunk(g, data_key), active))
                chunks += 1
                bar.update(position() - bar.n)
                bar.set_postfix_str(_postfix(groups, experiment.progress_metrics), refresh=False)
                finished = all(g.finished for g in groups)
                if stop.signum or chunks % config.checkpoint_every == 0 or finished:
                    storage.save_groups(checkpoints, groups, num_members)
                if stop.signum:
                    raise Interrupted(stop.signum, position(), workdir)
    finally:
        checkpoints.close()  # waits for the last save
    records = storage.member_records(groups, num_members)
    steps, finals = [None] * num_members, [None] * num_members
    for g in groups:
        for index, final in zip(g.indices, _groups.final_metrics(g)):
            steps[index], finals[index] = g.steps, final
    return (storage.results(experiment, config_dict, experiment.members, steps, records, finals),
            _start_cross_check(groups, "last", checker))


def load_params(experiment: Experiment, config, workdir, step: int | None = None) -> dict:
    """``{member name: params}`` restored from a checkpoint of ``workdir`` (default: the last),
    each in the structure and dtypes of its problem's ``init_params`` (a member that tunes LoRA
    adapters or a subset: those, see :mod:`experiments.runner.tuning`).

    ``config`` is not needed any more (members are stored one by one); it is kept for callers.
    See :func:`load_member` for one member without the experiment.

    Raises:
        FileNotFoundError: ``workdir`` has no checkpoint (or not ``step``).
    """
    del config
    return {member.name: storage.restore_member(workdir, member.name, step,
                                                template=tuned_problem(member).init_params)
            for member in experiment.members}
