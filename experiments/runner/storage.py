"""What the runner writes to a workdir, and reads back: config.json, per-member checkpoints,
results.json, plots and the printed summary.

A workdir holds ``config.json`` (``{"version", "experiment", "config"}``), ``checkpoints/<step>/``
(orbax; an item ``params`` ``{"<i>": params of member i}``, an item ``opt_state``
``{"<i>": {"opt_state", "failed"}}`` and a JSON
``progress`` item with every member's name, evaluations done, timings and metrics so far),
``results.json`` once finished, and the plots. Members are stored one by one, whatever the
programs that ran them, so :func:`load_member` reads one without the experiment or its config.
"""

import json
import math
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.runner.config import ConfigMismatchError, OldWorkdirError
from experiments.runner.program import TrainState, unstack
from experiments.runner.spec import Experiment, Member

VERSION = 2  # of the workdir layout; 1 (no "version"): checkpoints per vmapped group.


def jsonable(x):
    """Config and results as strict JSON: tuples as lists, non-finite floats as None."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, tuple | list):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: pathlib.Path, obj) -> None:
    """Writes ``obj`` to ``path`` (atomically); in a multi-process run, process 0 alone writes."""
    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _old_workdir(workdir) -> OldWorkdirError:
    return OldWorkdirError(
        f"{workdir} was written by an older version of zojax's runner (checkpoints per vmapped "
        "group, before per-member checkpoints): this version cannot resume or read it. Pass "
        "--overwrite to start over (its checkpoints and results are deleted), or choose another "
        "--workdir.")


def prepare_workdir(workdir: pathlib.Path, name: str, config: dict, overwrite: bool):
    """Checks ``workdir`` against the config; returns the finished results, if any.

    Raises:
        ConfigMismatchError: the workdir holds a different config (and not ``overwrite``).
        OldWorkdirError: it was written by an older runner (and not ``overwrite``).
    """
    saved_path = workdir / "config.json"
    if overwrite:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        for file in ("config.json", "results.json", f"{name}.png", f"{name}.pdf"):
            (workdir / file).unlink(missing_ok=True)
    elif saved_path.exists():
        stored = json.loads(saved_path.read_text())
        if stored.get("version") != VERSION:
            raise _old_workdir(workdir)
        saved = _flatten({"experiment": stored.get("experiment"), "config": stored.get("config")})
        current = _flatten({"experiment": name, "config": config})
        differing = [
            f"  {key.removeprefix('config.')}: {saved.get(key, '<absent>')!r} in the workdir, "
            f"{current.get(key, '<absent>')!r} now"
            for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]
        if differing:
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config:\n" + "\n".join(differing)
                + "\nPass --overwrite to replace it, or choose another --workdir.")
        if (workdir / "results.json").exists():
            return json.loads((workdir / "results.json").read_text())
    elif (workdir / "checkpoints").is_dir():  # checkpoints without a config: not ours to use
        raise _old_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, {"version": VERSION, "experiment": name, "config": config})
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints, per member.


def checkpointer(workdir: pathlib.Path):
    from experiments.runner import checkpointing  # lazy: imports orbax

    return checkpointing.Checkpointer(pathlib.Path(workdir) / "checkpoints")


def save(checkpoints, step: int, states: Sequence[TrainState], records: Sequence[dict]) -> None:
    """Saves every member's state and progress record (in member order).

    A record is ``{"name", "evaluations", "wall_seconds", "compile_seconds",
    "metrics": {name: [float]}, "num_queries": [int]}`` (JSON: NaN as null).
    """
    items = {"params": {str(i): state.params for i, state in enumerate(states)},
             "opt_state": {str(i): {"opt_state": state.opt_state, "failed": state.failed}
                           for i, state in enumerate(states)}}
    checkpoints.save(step, items, jsonable({"version": VERSION, "step": step,
                                            "members": list(records)}))


def restore(checkpoints, step: int, templates: Sequence[TrainState]
            ) -> tuple[list[TrainState], list[dict]]:
    """Every member's state (into ``templates``) and record (nulls as NaN)."""
    progress = checkpoints.progress(step)
    if progress.get("version") != VERSION:
        raise _old_workdir(checkpoints.directory.parent)
    items = checkpoints.restore(step, {
        "params": {str(i): t.params for i, t in enumerate(templates)},
        "opt_state": {str(i): {"opt_state": t.opt_state, "failed": t.failed}
                      for i, t in enumerate(templates)}})
    states = [TrainState(items["params"][str(i)], items["opt_state"][str(i)]["opt_state"],
                         items["opt_state"][str(i)]["failed"]) for i in range(len(templates))]
    records = progress["members"]
    for record in records:
        record["metrics"] = {k: [math.nan if v is None else v for v in values]
                             for k, values in record["metrics"].items()}
        record["num_queries"] = [-1 if v is None else v for v in record["num_queries"]]
    return states, records


def load_member(workdir, name: str, step: int | None = None, *, with_state: bool = False):
    """A member's params from a checkpoint of ``workdir`` (default: the last), as plain pytrees.

    Needs neither the experiment nor its config: members are stored one by one. Dicts stay dicts
    (Flax params, Figure 1's ``{"y", "z"}``), a bare array stays an array; other containers
    come back as orbax stores them (dicts or lists). A finished run's last checkpoint holds the
    final params; a member that went non-finite holds its last good ones.

    Args:
        workdir: the run's ``--workdir``.
        name: the member's name (results.json's ``runs[i]["name"]``).
        step: a checkpoint's step: the largest step any member had reached at that save
            (members with their own, shorter ``num_steps`` keep their final state).
        with_state: also return the optimizer state (typed PRNG keys as their raw key data).

    Returns:
        ``params``, or ``(params, opt_state)`` with ``with_state``.

    Raises:
        FileNotFoundError: ``workdir`` has no checkpoint (or not ``step``).
        KeyError: no member of that name (the message lists them).
        OldWorkdirError: the workdir was written by an older runner.
    """
    return restore_member(workdir, name, step, with_state=with_state)


def restore_member(workdir, name: str, step: int | None = None, *, with_state: bool = False,
                   template=None):
    """:func:`load_member`, with the params restored into ``template`` (structure and dtypes)
    when given."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}.")
    saved = pathlib.Path(workdir) / "config.json"
    if saved.exists() and json.loads(saved.read_text()).get("version") != VERSION:
        raise _old_workdir(workdir)
    checkpoints = checkpointer(workdir)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None or step not in checkpoints.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {directory}.")
        progress = checkpoints.progress(step)
        if progress.get("version") != VERSION:
            raise _old_workdir(workdir)
        names = [record["name"] for record in progress["members"]]
        if name not in names:
            raise KeyError(f"no member {name!r} in {workdir}; its members: {names}.")
        i = str(names.index(name))
        items = checkpoints.restore(step, {"params": {i: template}} | (
            {"opt_state": {i: None}} if with_state else {}), partial=True)
    finally:
        checkpoints.close()
    params = items["params"][i]
    return (params, items["opt_state"][i]["opt_state"]) if with_state else params


def member_records(groups: list, num_members: int) -> list[dict]:
    """Every member's progress record (see :func:`storage.save`), in experiment order."""
    records = [None] * num_members
    for g in groups:
        history = {k: np.concatenate([h[k] for h in g.history], axis=1) for k in g.history[0]}
        for j, (index, member) in enumerate(zip(g.indices, g.members)):
            if g.counts_queries:
                queries = history["num_queries"][j]
            else:
                per_step = g.program.method.queries_per_step(member.hparams)
                queries = g.steps[:g.done] * per_step
            records[index] = {
                "name": member.name, "evaluations": g.done,
                "wall_seconds": g.wall_seconds, "compile_seconds": g.compile_seconds,
                "metrics": {k: v[j].tolist() for k, v in history.items() if k != "num_queries"},
                "num_queries": [int(q) for q in queries]}
    return records


def save_groups(checkpoints, groups: list, num_members: int) -> None:
    states = [None] * num_members
    for g in groups:
        for index, state in zip(g.indices, unstack(g.state, len(g.members))):
            states[index] = state
    step = max(g.reached() for g in groups)
    save(checkpoints, step, states, member_records(groups, num_members))


def restore_groups(checkpoints, step: int, groups: list, num_members: int) -> None:
    templates = [None] * num_members
    for g in groups:
        for index, state in zip(g.indices, unstack(g.state, len(g.members))):
            templates[index] = state
    states, records = restore(checkpoints, step, templates)
    for g in groups:
        mine = [records[i] for i in g.indices]
        g.state = jax.tree.map(lambda *xs: jnp.stack(xs), *[states[i] for i in g.indices])
        g.done = mine[0]["evaluations"]
        g.wall_seconds, g.compile_seconds = mine[0]["wall_seconds"], mine[0]["compile_seconds"]
        g.history = [{**{k: np.array([r["metrics"][k] for r in mine], np.float64)
                         for k in mine[0]["metrics"]},
                      "num_queries": np.array([r["num_queries"] for r in mine], np.int64)}]


# ---------------------------------------------------------------------------------------------
# results.json, the summary and the plot.


def results(experiment: Experiment, config: dict, members: Sequence[Member],
            steps: Sequence[np.ndarray], records: Sequence[dict],
            finals: Sequence | None = None) -> dict:
    """The results.json dict (schema in :func:`experiments.runner.run`), in member order;
    ``finals[i]`` is member i's ``final_metrics`` (recorded for problems that have them)."""
    runs = []
    finals = [None] * len(members) if finals is None else finals
    for member, member_steps, record, final in zip(members, steps, records, finals):
        runs.append({
            "name": member.name,
            "method": member.method,
            "hparams": {**member.labels, **member.hparams},
            "steps": member_steps.tolist(),
            "metrics": record["metrics"],
            "num_queries": [None if q < 0 else q for q in record["num_queries"]],
            "wall_seconds": record["wall_seconds"],
            "compile_seconds": record["compile_seconds"],
        })
        if member.problem.final_metrics is not None:
            runs[-1]["final_metrics"] = final
    return jsonable({"experiment": experiment.name, "config": config, "runs": runs})


def non_finite_members(results: dict) -> dict[str, int]:
    """``{name: first step with a null loss}`` for the members that went non-finite."""
    return {run["name"]: next(s for s, v in zip(run["steps"], run["metrics"]["loss"]) if v is None)
            for run in results["runs"] if None in run["metrics"]["loss"]}


def metric_at(run: dict, metric: str, index: int = -1) -> float:
    """A run's ``metric`` at evaluation ``index`` (the last by default); NaN where it was not
    recorded or was not finite (null)."""
    values = run["metrics"].get(metric) or [None]
    return math.nan if values[index] is None else values[index]


def summarize(results: dict, metrics: Sequence[str] | None = None) -> str:
    """A table of each run's first and last value of every metric."""
    runs = results["runs"]
    metrics = metrics or list(runs[0]["metrics"])
    width = max(len(r["name"]) for r in runs) + 2
    lines = [f"{results['experiment']}: start -> end over {runs[0]['steps'][-1]} steps"]
    for run in runs:
        cells = []
        for name in metrics:
            values = run["metrics"].get(name)
            if values:
                start, end = values[0], values[-1]
                cells.append(f"{name} {_fmt(start)} -> {_fmt(end)}")
        lines.append(f"  {run['name']:<{width}}" + "   ".join(cells))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "null" if value is None else f"{value:.4g}"


def draw(experiment: Experiment, results: dict, workdir: pathlib.Path) -> None:
    """Saves ``experiment.plot(results)`` as ``<name>.png`` and ``.pdf``; a dict of figures
    ``{suffix: figure}`` as ``<name><suffix>.png`` and ``.pdf`` each (process 0 alone draws)."""
    if experiment.plot is not None and jax.process_index() == 0:
        figures = experiment.plot(results)
        if not isinstance(figures, Mapping):
            figures = {"": figures}
        for name, figure in figures.items():
            for suffix in (".png", ".pdf"):
                figure.savefig(workdir / f"{experiment.name}{name}{suffix}", dpi=150)
