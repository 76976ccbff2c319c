"""The timing harness every benchmark uses (``core``, ``experiments`` and ``compare``).

- Timing in one process: :func:`interleaved` runs candidates round-robin after two warm-up
  calls, each call ended by ``block_until_ready``; :func:`ratio` is the median over rounds of
  the per-round ratio to a baseline (robust to load drifting during a run), :func:`spread` its
  min–max; :func:`median_seconds` times one function alone.
- Timing across processes: :func:`alternating` runs measurements of two trees in rounds whose
  order alternates (old, new, then new, old, ...); :func:`ratio_table` gives each line's median
  old, median new, median of the per-round new/old ratios, their spread and PASS/FAIL.
- Reporting: :func:`table` and :class:`Check` lines (a value, its target, PASS/FAIL; NaN: n/a).
- Memory: :func:`compiled_bytes` (argument + output + temp − alias of a compiled program).
- Experiment commands: :func:`run_command` runs ``python -m experiments.<name>`` of a tree in a
  subprocess with a given ``JAX_COMPILATION_CACHE_DIR`` and reads its ``results.json``
  (:class:`CommandRun`: whole-command seconds, compute and compile seconds per program).
- The 16-member sweep (:func:`sweep_config`, :func:`lean_sweep`, :func:`run_quietly`), through
  the experiments' public API only, so that it runs on any tree.

This module imports neither zojax nor experiments at module level (jax only where needed):
``benchmarks.compare`` loads it by path into workers whose ``sys.path`` holds another tree.
"""

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import re
import runpy
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
FIG2_DATASETS = ("a7a", "w5a")


# ---------------------------------------------------------------------------------------------
# Timing in one process.


def ready(x):
    """``jax.block_until_ready(x)``: a timing ends when the result exists, not when dispatched."""
    import jax

    return jax.block_until_ready(x)


def interleaved(candidates: dict, rounds: int) -> dict[str, np.ndarray]:
    """Times ``{name: (fn, args)}`` round-robin, after two warm-up calls of each (the first
    compiles); returns ``{name: seconds of each round}``. A round calls every candidate once,
    back to back, so the per-round ratios of two candidates share the machine's load."""
    for fn, args in candidates.values():
        ready(fn(*args))
        ready(fn(*args))
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, (fn, args) in candidates.items():
            start = time.perf_counter()
            ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) for name, t in times.items()}


def ratio(times: dict, name, base="baseline") -> float:
    """Median over rounds of ``times[name] / times[base]`` (the pair ran back to back)."""
    return float(np.median(np.asarray(times[name]) / np.asarray(times[base])))


def spread(ratios) -> str:
    """``"min–max"`` of per-round ratios."""
    return f"{np.min(ratios):.3f}–{np.max(ratios):.3f}"


def median_seconds(fn, *args, reps: int = 30) -> float:
    """Median seconds of ``reps`` calls of ``fn(*args)`` after two warm-up calls."""
    ready(fn(*args))
    ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_once(fn, *args) -> tuple[float, object]:
    """Seconds of one call (compilation included if it is the first) and its result."""
    start = time.perf_counter()
    out = ready(fn(*args))
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------
# Timing across processes: two trees, alternating.


def alternating(trees: dict[str, object], parts, num_rounds: int) -> list[dict]:
    """Runs each ``part(tree) -> {line: value}`` on every tree in ``trees`` (``{"old": ...,
    "new": ...}``), ``num_rounds`` times; round i runs each part on the trees in the order of
    ``trees`` (i even) or reversed (i odd). Returns one dict per round: ``{"order", "old",
    "new", "seconds", "load"}`` (load: the 1/5/15-minute load averages at its end)."""
    sides = list(trees)
    rounds = []
    for i in range(num_rounds):
        order = sides if i % 2 == 0 else sides[::-1]
        result = {"order": order, **{side: {} for side in sides}}
        start = time.perf_counter()
        for part in parts:
            for side in order:
                print(f"round {i + 1}/{num_rounds}: {part.__name__}, {side} ({trees[side]})",
                      flush=True)
                result[side].update(part(trees[side]))
        result["seconds"] = time.perf_counter() - start
        result["load"] = os.getloadavg()  # other work on the machine is noise
        print(f"round {i + 1} took {result['seconds']:.0f} s, load {result['load'][0]:.1f}",
              flush=True)
        rounds.append(result)
    return rounds


def ratio_table(rounds: list[dict], threshold: float) -> tuple[str, bool]:
    """The lines of ``rounds`` (from :func:`alternating`): median old, median new, median of the
    per-round new/old ratios, their spread, PASS if that median <= ``threshold``. Lines whose
    value is missing or NaN on a side print n/a and are not judged. Returns the table and
    whether every judged line passed."""
    rows, ok = [], True
    for name in rounds[0]["old"]:
        old = np.array([r["old"].get(name, np.nan) for r in rounds], float)
        new = np.array([r["new"].get(name, np.nan) for r in rounds], float)
        ratios = new / old
        if np.isnan(ratios).any():
            rows.append((name, number(np.median(old)), number(np.median(new)), "n/a", "", ""))
            continue
        median = float(np.median(ratios))
        ok &= median <= threshold
        rows.append((name, number(np.median(old)), number(np.median(new)), f"{median:.3f}",
                     spread(ratios), verdict(median <= threshold)))
    header = ("line (ms unless marked)", "old", "new", "new/old", "spread (min–max)", "")
    return format_table(header, rows, first_left=True), ok


# ---------------------------------------------------------------------------------------------
# Reporting.


def ms(seconds) -> str:
    """Milliseconds of the median of ``seconds``, 8 characters wide."""
    return f"{1e3 * float(np.median(seconds)):8.2f}"


def number(value, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` for NaN (a measurement not available)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def in_seconds(value, digits: int = 2) -> str:
    """``"1.23 s"``, or ``n/a`` for NaN."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f} s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_table(header, rows, first_left: bool = False) -> str:
    """Columns right-aligned (the first left-aligned with ``first_left``), a rule under the
    header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(row):
        return "  ".join(f"{str(x):<{w}}" if first_left and i == 0 else f"{str(x):>{w}}"
                         for i, (x, w) in enumerate(zip(row, widths)))

    head = line(header)
    return "\n".join([head, "-" * len(head), *map(line, rows)])


def table(header, rows) -> None:
    """Prints :func:`format_table` and a blank line."""
    print(format_table(header, rows))
    print()


def say(*args) -> None:
    print(*args, flush=True)


@dataclasses.dataclass
class Check:
    """One measured line: ``value`` against ``target`` (``value <= target`` passes)."""

    name: str
    value: float
    target: float | None  # None: reported only.
    unit: str = "x"  # "x": a ratio; "s": seconds; "": a plain number.

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        return verdict(self.value <= self.target)  # NaN (not measured) fails a target

    def line(self) -> str:
        if math.isnan(self.value):
            value = "n/a"
        else:
            value = {"x": f"{self.value:.3f}x", "": f"{self.value:.2f}"}.get(
                self.unit, f"{self.value:.1f} s")
        if self.target is None:
            return f"  {self.name:<62} {value:>10}"
        target = {"x": f"<= {self.target:.3g}x", "": f"<= {self.target:.3g}"}.get(
            self.unit, f"< {self.target:.0f} s")
        return f"  {self.name:<62} {value:>10}   target {target:<9} {self.verdict}"


CHECKS: list[Check] = []


def check(name, value, target=None, unit="x") -> Check:
    """Records and prints a :class:`Check` (collected in ``CHECKS`` for the summary)."""
    result = Check(name, value, target, unit)
    CHECKS.append(result)
    say(result.line())
    return result


def summary(started: float) -> int:
    """Prints every check again, and whether the targets were met; returns the exit status."""
    say(f"\n== Summary ({time.perf_counter() - started:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f}) ==")
    for result in CHECKS:
        say(result.line())
    failed = [c for c in CHECKS if c.verdict == "FAIL"]
    if not any(c.target is not None for c in CHECKS):
        say("No targets checked (--quick runs shortened workloads).")
    else:
        say(f"{len(failed)} target(s) missed." if failed else "All targets met.")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Memory.


def memory_bytes(compiled) -> int:
    """argument + output + temp − alias bytes of a compiled program (``jit(...).lower(...)
    .compile()``): what it holds at its peak, donated inputs counted once."""
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def compiled_bytes(fn, *args, donate: bool = False) -> int:
    """:func:`memory_bytes` of ``jit(fn)`` compiled for ``args`` (the first argument donated
    with ``donate``)."""
    import jax

    jitted = jax.jit(fn, donate_argnums=0) if donate else jax.jit(fn)
    return memory_bytes(jitted.lower(*args).compile())


# ---------------------------------------------------------------------------------------------
# Experiment commands.


def load_config(name: str, variant: str | None = None, root: pathlib.Path = REPO):
    """``get_config(variant)`` of ``root/configs/<name>.py``."""
    return runpy.run_path(str(pathlib.Path(root) / "configs" / f"{name}.py"))["get_config"](
        *([variant] if variant else []))


def fig2_datasets(data_dir: pathlib.Path) -> tuple[str, ...]:
    """a7a and w5a when ``data_dir/libsvm`` has them (train and test), else their synthetic
    stand-ins ``synthetic-a7a``, ``synthetic-w5a`` (same shapes)."""
    def present(name):
        return any((pathlib.Path(data_dir) / "libsvm" / f"{name}{bz}").exists()
                   for bz in ("", ".bz2"))

    if all(present(n) and present(f"{n}.t") for n in FIG2_DATASETS):
        return FIG2_DATASETS
    return tuple(f"synthetic-{n}" for n in FIG2_DATASETS)


@dataclasses.dataclass
class CommandRun:
    """One finished experiment command and its ``results.json``."""

    seconds: float  # the whole command, process start to exit.
    results: dict
    log: str
    launched: float  # time.time() at launch.

    def per_program(self, field: str) -> list[float]:
        """``field`` of each compiled program: members sharing a program share its value, so
        runs are deduplicated by (method, value). NaN where a run lacks the field."""
        values = {(run["method"], run.get(field)) for run in self.results["runs"]}
        return [math.nan if value is None else float(value) for _, value in values]

    def compute_seconds(self) -> float:
        """Execution time of the compiled programs: ``wall_seconds`` summed over programs."""
        return sum(self.per_program("wall_seconds"))

    def compile_seconds(self) -> float:
        """Compilation: results.json's ``compile_seconds`` summed over programs (programs
        compile in parallel threads, so this can exceed the time the command spent on it; 0
        may be a compilation-cache hit); NaN for a runner that does not record it."""
        return sum(self.per_program("compile_seconds"))

    def longest_compile_seconds(self) -> float:
        """The longest ``compile_seconds`` of one program (NaN when not recorded)."""
        return max(self.per_program("compile_seconds"))

    def num_programs(self) -> int:
        """Compiled programs that ran (runs deduplicated by (method, wall_seconds))."""
        return len(self.per_program("wall_seconds"))

    def compile_text(self) -> str:
        """Compilation for display: the sum over programs and the longest one."""
        return (f"compile {in_seconds(self.compile_seconds())} summed over programs, longest "
                f"{in_seconds(self.longest_compile_seconds())}")

    def timeline(self) -> list[str]:
        """Where the command's time went, from the runner's log lines (n/a: no such line; the
        compilation figures come from results.json)."""
        first_checked = self.event_seconds(r"cross-check at the first", last=True)
        compiled = self.event_seconds(r"^Compiled")  # display only
        trained = self.event_seconds(r"cross-check at the last")  # + the first problem's check
        checked = self.event_seconds(r"cross-check at the last", last=True)
        return [
            f"    {in_seconds(first_checked, 1):>8}  first cross-checks done (imports, data, "
            f"setup, exact traces; compilation runs alongside)",
            f"    {in_seconds(compiled, 1):>8}  {self.num_programs()} programs compiled "
            f"({self.compile_text()})",
            f"    {in_seconds(trained, 1):>8}  training loop done, and one last cross-check "
            f"(compiled programs {self.compute_seconds():.1f} s)",
            f"    {in_seconds(checked, 1):>8}  all last cross-checks done",
            f"    {in_seconds(self.seconds, 1):>8}  exit (results.json, plots)",
        ]

    def event_seconds(self, pattern: str, last: bool = False) -> float:
        """Seconds from launch to the first (or last) absl log line matching ``pattern``."""
        times = []
        for line in self.log.splitlines():
            match = re.match(r"[IWE](\d{4} \d\d:\d\d:\d\d\.\d+) .*?\] (.*)", line)
            if match and re.search(pattern, match.group(2)):
                launched = datetime.datetime.fromtimestamp(self.launched)
                stamp = datetime.datetime.strptime(f"{launched.year}{match.group(1)}",
                                                   "%Y%m%d %H:%M:%S.%f")
                times.append((stamp - launched).total_seconds())
        return (times[-1] if last else times[0]) if times else math.nan


def run_command(module: str, config: str, workdir: pathlib.Path, cache_dir: pathlib.Path,
                overrides=(), tree: pathlib.Path = REPO) -> CommandRun:
    """``python -m <module> --config=<config> --workdir=<workdir> <overrides>`` of ``tree``
    (cwd and ``PYTHONPATH``), with ``JAX_COMPILATION_CACHE_DIR=cache_dir`` (an empty folder: a
    cold cache); timed from process start to exit. Raises RuntimeError (with the log's tail)
    when the command fails."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
               *overrides]
    launched = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {tree} failed ({done.returncode}):\n"
                           f"{log[-3000:]}")
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    return CommandRun(seconds, results, log, launched)


# ---------------------------------------------------------------------------------------------
# The 16-member sweep, through the public API of experiments (any tree).


def sweep_config(dataset: str, data_dir, num_steps: int, num_features: int | None = None,
                 root: pathlib.Path = REPO):
    """Figure 2's config reduced to logistic-regression ZO on ``dataset``, 4 η × 4 λ."""
    config = load_config("linear_models", root=root)
    config.data_dir = str(data_dir)
    config.datasets = (dataset,)
    config.losses = ("logistic",)
    config.methods = ("zo",)
    config.logistic.zo.learning_rate = (0.003, 0.01, 0.03, 0.1)
    config.logistic.zo.smoothing = (0.03, 0.1, 0.3, 1.0)
    config.num_steps = num_steps
    if num_features is not None:
        config.num_features = num_features
    return config


def lean_sweep(config):
    """The sweep's experiment without the exact-trace cross-check (16 × D Hessian-vector
    products, which would dominate), the plot and the summary; returns it and its members."""
    import experiments.linear_models

    experiment = experiments.linear_models.get_experiment(config)
    problems, members = {}, []
    for member in experiment.members:
        problem = problems.setdefault(id(member.problem), dataclasses.replace(
            member.problem, reference_metrics={}))
        members.append(dataclasses.replace(member, problem=problem))
    lean = dataclasses.replace(experiment, members=members, plot=None, summary=lambda r: "")
    return lean, members


def run_quietly(experiment, members, config, workdir) -> tuple[dict, float, float]:
    """``experiments.runner.run`` of ``experiment`` with ``members``, output swallowed; returns
    (results, the program's ``wall_seconds``, the call's seconds including compilation)."""
    import experiments.runner

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        results = experiments.runner.run(dataclasses.replace(experiment, members=members),
                                         config, workdir)
    return results, results["runs"][0]["wall_seconds"], time.perf_counter() - start


def cpu_isa() -> str:
    """The widest x86 vector extension of this CPU (from /proc/cpuinfo), or ''."""
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return next((isa for flag, isa in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
                 if flag in flags), "")


def host_line(quick: bool) -> str:
    """One line saying what ran: the versions, the CPU (its vector extension), cores and load."""
    import platform

    import jax

    import zojax

    return (f"zojax {zojax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform} "
            f"({platform.processor() or platform.machine()} {cpu_isa()}, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f}){', --quick' if quick else ''}\n")
