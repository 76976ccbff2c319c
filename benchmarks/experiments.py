r"""Benchmarks of the Figure 1 and Figure 2 experiments (issue 3, section 5), ratios in one run.

    python -m benchmarks.experiments            # the full benchmark (~5-8 min on 2 cores)
    python -m benchmarks.experiments --quick    # a fast sanity run (fewer steps; no targets)
    python -m benchmarks.experiments --only fig1 [--only sweep ...]

What it measures (every JAX number comes from the experiments' own code, as users run it):

1. Figure 1 (``configs/test_function.py``: GD, ZO λ → 0 and ZO λ ∈ {0.1, 0.05, 0.01}, 100k steps).
   The baseline is a plain numpy loop doing the same steps (same update rules, Gaussian
   directions from numpy's ``Generator``, loss and trace at the same evaluation steps).
   - compute: the ``wall_seconds`` of results.json (the compiled programs, summed over programs)
     over the numpy loop; target ≤ 1/3. Compilation is reported separately.
   - the whole ``python -m experiments.test_function`` command (a subprocess: imports,
     compilation, checkpoints and plots, fresh workdir), with the JAX persistent compilation
     cache cold (an empty ``JAX_COMPILATION_CACHE_DIR``) and warm (the same directory again);
     target ≤ 1.5× the numpy loop (aim < 1×).
2. Figure 2 (``configs/linear_models.py``: 8 runs × 10k steps, metrics every 10 steps, on
   a7a/w5a from ``--data-dir`` when present, else synthetic data of the same shapes), the whole
   command with a cold compilation cache; target < 2 min. Baseline: a numpy loop on the dense
   N × D features (as the paper's reference), float32, with the same evaluation schedule, timed
   for a few hundred steps per run and extrapolated to the full schedule.
3. A 16-member vmapped sweep (Figure-2 logistic regression on the first dataset, 4 η × 4 λ,
   500 steps) against the same 16 members run one after another, both through
   :func:`experiments.runner.run` (one compiled program per side, compilation excluded:
   ``wall_seconds``); target ≤ 1/3. The members' closed-form-vs-exact trace cross-check
   and the plot are left out of these runs (they are not what the ratio is about, and the
   exact trace of 16 members would dominate the benchmark's time).

Timings on a shared machine are noisy: the Figure-1 numpy loop and commands run twice,
interleaved, and so do the vmapped sweep and its 16 sequential runs; the best time of each is
kept (for the baselines, the conservative choice). The load average is printed.
"""

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import pathlib
import re
import runpy
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
FIG2_DATASETS = ("a7a", "w5a")


# ---------------------------------------------------------------------------------------------
# Reporting.


@dataclasses.dataclass
class Check:
    name: str
    value: float
    target: float | None  # None: reported only.
    unit: str = "x"  # "x": a ratio; "s": seconds.

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.value <= self.target else "FAIL"

    def line(self) -> str:
        value = f"{self.value:.3f}{self.unit}" if self.unit == "x" else f"{self.value:.1f} s"
        if self.target is None:
            return f"  {self.name:<62} {value:>10}"
        target = (f"<= {self.target:.3g}x" if self.unit == "x" else f"< {self.target:.0f} s")
        return f"  {self.name:<62} {value:>10}   target {target:<9} {self.verdict}"


CHECKS: list[Check] = []


def check(name, value, target=None, unit="x") -> Check:
    result = Check(name, value, target, unit)
    CHECKS.append(result)
    print(result.line(), flush=True)
    return result


def say(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Running the experiments' command line.


def load_config(name: str, variant: str | None = None):
    return runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"](
        *([variant] if variant else []))


@dataclasses.dataclass
class CommandRun:
    seconds: float  # the whole command, process start to exit.
    results: dict
    log: str
    launched: float  # time.time() at launch.

    def compute_seconds(self) -> float:
        """Execution time of the compiled programs: wall_seconds summed over distinct programs
        (members of one program share their value)."""
        programs = {(run["method"], run["wall_seconds"]) for run in self.results["runs"]}
        return sum(seconds for _, seconds in programs)

    def compile_seconds(self) -> float:
        match = re.search(r"Compiled (\d+) program\(s\) for (\d+) members in ([\d.]+) s",
                          self.log)
        return float(match.group(3)) if match else float("nan")

    def num_programs(self) -> int:
        match = re.search(r"Compiled (\d+) program\(s\)", self.log)
        return int(match.group(1)) if match else 0

    def timeline(self) -> list[str]:
        """Where the command's time went, from the runner's log lines."""
        compiled = self.event_seconds(r"^Compiled")
        first_checked = self.event_seconds(r"cross-check at the first", last=True)
        trained = self.event_seconds(r"cross-check at the last")  # + the first problem's check
        checked = self.event_seconds(r"cross-check at the last", last=True)
        return [
            f"    {first_checked:6.1f} s  first cross-checks done (imports, data, setup, exact "
            f"traces; compilation runs alongside)",
            f"    {compiled:6.1f} s  {self.num_programs()} programs compiled (compile log "
            f"{self.compile_seconds():.1f} s)",
            f"    {trained:6.1f} s  training loop done, and one last cross-check (compiled "
            f"programs {self.compute_seconds():.1f} s)",
            f"    {checked:6.1f} s  all last cross-checks done",
            f"    {self.seconds:6.1f} s  exit (results.json, plots)",
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
        return (times[-1] if last else times[0]) if times else float("nan")


def run_command(module: str, config: str, workdir: pathlib.Path, cache_dir: pathlib.Path,
                overrides: list[str]) -> CommandRun:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
               *overrides]
    launched = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{log[-3000:]}")
    results = json.loads((workdir / "results.json").read_text())
    return CommandRun(seconds, results, log, launched)


# ---------------------------------------------------------------------------------------------
# Figure 1: the numpy baseline.


def fig1_numpy_run(method: str, learning_rate: float, smoothing: float | None, x0: np.ndarray,
                   eval_steps: np.ndarray, seed: int) -> dict:
    """One Figure-1 run as a plain numpy loop: x = (y, z) ∈ R^2d, h = (yᵀz − 1)²/2.

    gd: ∇h = r (z, y) with r = yᵀz − 1. zo: u ~ N(0, I_2d),
    ĝ = (h(x + λu) − h(x − λu)) / (2λ) u. forward_grad: ĝ = (uᵀ∇h) u. x ← x − η ĝ. Loss and
    trace ‖x‖² recorded at ``eval_steps``.
    """
    rng = np.random.default_rng(seed)
    d = x0.size // 2
    x = x0.astype(np.float64)  # a copy
    y, z = x[:d], x[d:]  # views: updated in place with x
    losses, traces = [], []

    def record():
        r = y @ z - 1.0
        losses.append(0.5 * r * r)
        traces.append(x @ x)

    def h(p):
        r = p[:d] @ p[d:] - 1.0
        return 0.5 * r * r

    num_steps = int(eval_steps[-1])
    evals = iter(eval_steps[1:].tolist())
    next_eval = next(evals, None)
    record()  # step 0
    for step in range(1, num_steps + 1):
        if method == "gd":
            r = y @ z - 1.0
            g = np.concatenate((r * z, r * y))
        elif method == "zo":
            u = rng.standard_normal(2 * d)
            g = ((h(x + smoothing * u) - h(x - smoothing * u)) / (2 * smoothing)) * u
        elif method == "forward_grad":
            u = rng.standard_normal(2 * d)
            r = y @ z - 1.0
            g = (r * (u[:d] @ z + u[d:] @ y)) * u
        else:
            raise ValueError(method)
        x -= learning_rate * g
        if step == next_eval:
            record()
            next_eval = next(evals, None)
    return {"loss": losses, "hessian_trace": traces}


def fig1_numpy(config) -> tuple[float, list[tuple[str, dict]]]:
    """The five runs of ``config`` one after another; returns (seconds, [(name, metrics)])."""
    import jax

    from experiments import runner
    from zojax.problems import test_function

    params = test_function.init_params(jax.random.key(config.init_seed), config.dim,
                                       config.init_scale)
    x0 = np.concatenate([np.asarray(params["y"]), np.asarray(params["z"])])
    steps = runner.eval_steps(config)
    runs = [("gd", "gd", lr, None, 0) for lr in config.gd.learning_rate]
    runs += [(f"zo(λ={lam})", "zo", lr, lam, seed) for lr in config.zo.learning_rate
             for lam in config.zo.smoothing for seed in config.zo.seed]
    runs += [("forward_grad", "forward_grad", lr, None, seed)
             for lr in config.forward_grad.learning_rate for seed in config.forward_grad.seed]
    start = time.perf_counter()
    out = [(name, fig1_numpy_run(method, lr, lam, x0, steps, seed))
           for name, method, lr, lam, seed in runs]
    return time.perf_counter() - start, out


def bench_fig1(args, tmp: pathlib.Path) -> None:
    from experiments import runner

    say("\n== Figure 1: test function, GD / ZO λ→0 / ZO λ ∈ {0.1, 0.05, 0.01}, d = 100 ==")
    config = load_config("test_function")
    overrides = []
    if args.quick:
        config.num_steps = 10_000
        overrides.append("--config.num_steps=10000")
    say(f"  {config.num_steps} steps per run, metrics at {len(runner.eval_steps(config))} steps")

    numpy_times = []
    seconds, numpy_runs = fig1_numpy(config)
    numpy_times.append(seconds)
    say(f"  numpy loop (5 runs):                 {seconds:6.2f} s")

    def command(label, cache, workdir):
        run = run_command("experiments.test_function", "configs/test_function.py",
                          tmp / workdir, tmp / cache, overrides)
        say(f"  command, {label + ':':<28}{run.seconds:6.2f} s  (compile "
            f"{run.compile_seconds():.2f} s, compute {run.compute_seconds():.2f} s)")
        return run

    # Cold: an empty cache directory; warm: the same directory again. Interleaved with the
    # numpy loop, twice.
    cold = command("cold compilation cache", "fig1-cache", "fig1-cold")
    for line in cold.timeline():
        say(line)
    warm = command("warm compilation cache", "fig1-cache", "fig1-warm")
    for line in warm.timeline():
        say(line)
    seconds, _ = fig1_numpy(config)
    numpy_times.append(seconds)
    say(f"  numpy loop again:                    {seconds:6.2f} s")
    cold2 = command("cold cache again", "fig1-cache2", "fig1-cold2")
    warm2 = command("warm cache again", "fig1-cache2", "fig1-warm2")
    commands = (cold, warm, cold2, warm2)

    numpy_seconds = min(numpy_times)
    compute = min(r.compute_seconds() for r in commands)
    cold_seconds = min(cold.seconds, cold2.seconds)
    warm_seconds = min(warm.seconds, warm2.seconds)
    say("  per program (best run): " + ", ".join(
        f"{name} {seconds:.3f} s" for name, seconds in sorted(
            {(run["method"], min(r2["wall_seconds"] for r in commands
                                 for r2 in r.results["runs"] if r2["name"] == run["name"]))
             for run in cold.results["runs"]})))

    # The numpy loop computes the same thing: final traces side by side.
    jax_final = {run["name"]: run["metrics"]["hessian_trace"][-1] for run in cold.results["runs"]}
    say("  final trace, numpy vs zojax: " + ", ".join(
        f"{name} {metrics['hessian_trace'][-1]:.1f}/{value:.1f}"
        for (name, metrics), value in zip(numpy_runs, jax_final.values())))

    quick = args.quick
    check("Fig 1 compute / numpy loop", compute / numpy_seconds, None if quick else 1 / 3)
    check("Fig 1 whole command, cold cache / numpy loop", cold_seconds / numpy_seconds,
          None if quick else 1.5)
    check("Fig 1 whole command, warm cache / numpy loop", warm_seconds / numpy_seconds,
          None if quick else 1.5)
    check("Fig 1 compilation (cold cache)", min(cold.compile_seconds(), cold2.compile_seconds()),
          unit="s")
    check("Fig 1 compilation (warm cache)", min(warm.compile_seconds(), warm2.compile_seconds()),
          unit="s")


# ---------------------------------------------------------------------------------------------
# Figure 2: the numpy baseline on dense features.


def fig2_datasets(data_dir: pathlib.Path) -> tuple[str, ...]:
    def present(name):
        return any((data_dir / "libsvm" / f"{name}{bz}").exists() for bz in ("", ".bz2"))

    if all(present(n) and present(f"{n}.t") for n in FIG2_DATASETS):
        return FIG2_DATASETS
    return tuple(f"synthetic-{n}" for n in FIG2_DATASETS)


def fig2_numpy_run(loss: str, method: str, learning_rate: float, smoothing: float,
                   train: tuple, test: tuple, w0: np.ndarray, eval_steps: np.ndarray,
                   num_steps: int, seed: int) -> tuple[float, float, int, int]:
    """A Figure-2 run on dense (N, D) float32 features for ``num_steps`` steps, metrics (train
    and test loss, closed-form trace, accuracy) at ``eval_steps``; returns (step seconds,
    evaluation seconds, steps, evaluations)."""
    x_train, b_train, norms_train = train
    rng = np.random.default_rng(seed)
    w = w0.astype(np.float32)
    n = x_train.shape[0]

    def sigmoid(t):
        return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow

    def objective(w):
        m = b_train * (x_train @ w)
        if loss == "svm":
            return np.mean(np.square(np.maximum(0.0, 1.0 - m)))
        return np.mean(np.logaddexp(0.0, -m))

    def gradient(w):
        m = b_train * (x_train @ w)
        if loss == "svm":
            coef = -2.0 * b_train * np.maximum(0.0, 1.0 - m)
        else:
            coef = -b_train * sigmoid(-m)
        return (coef.astype(np.float32) @ x_train) / n

    def metrics(x, b, norms):
        scores = x @ w
        m = b * scores
        if loss == "svm":
            value = np.mean(np.square(np.maximum(0.0, 1.0 - m)))
            trace = 2.0 * np.mean(np.where(m < 1.0, norms, 0.0))
        else:
            value = np.mean(np.logaddexp(0.0, -m))
            p = sigmoid(scores)
            trace = np.mean(p * (1.0 - p) * norms)
        accuracy = np.mean(np.where(scores >= 0, 1.0, -1.0) == b)
        return value, trace, accuracy

    evals = set(eval_steps.tolist())
    step_seconds = eval_seconds = 0.0
    num_evals = 0
    for step in range(num_steps + 1):
        if step:
            start = time.perf_counter()
            if method == "gd":
                g = gradient(w)
            else:
                u = rng.standard_normal(w.size, dtype=np.float32)
                g = ((objective(w + smoothing * u) - objective(w - smoothing * u))
                     / (2 * smoothing)) * u
            w -= np.float32(learning_rate) * g.astype(np.float32)
            step_seconds += time.perf_counter() - start
        if step in evals:
            start = time.perf_counter()
            metrics(*train)
            metrics(*test)
            eval_seconds += time.perf_counter() - start
            num_evals += 1
    return step_seconds, eval_seconds, num_steps, num_evals


def fig2_numpy(config, datasets, data_dir, steps_per_run: int) -> tuple[float, list[str]]:
    """Extrapolated seconds of the full Figure 2 as numpy loops on dense features."""
    import jax

    from experiments import linear_models, runner
    from zojax.problems import linear

    config.data_dir = str(data_dir)
    schedule = runner.eval_steps(config)
    total = 0.0
    lines = []
    for dataset in datasets:
        data = linear_models.load_dataset(dataset, config)
        projection_key, init_key = jax.random.split(jax.random.key(config.seed[0]))
        train, test = linear.random_features(projection_key, data.train_inputs, data.test_inputs,
                                             num_features=config.num_features)
        w0 = np.asarray(linear.init_params(init_key, train.shape[1], config.init_scale))
        splits = []
        for features, labels in ((train, data.train_labels), (test, data.test_labels)):
            dense = np.asarray(features.dense(), np.float32)
            splits.append((dense, np.asarray(labels, np.float32),
                           np.sum(np.square(dense, dtype=np.float32), axis=1)))
        del train, test
        for loss in config.losses:
            for method in config.methods:
                fields = config[loss][method]
                lam = fields.smoothing[0] if method == "zo" else None
                step_s, eval_s, steps, evals = fig2_numpy_run(
                    loss, method, fields.learning_rate[0], lam, splits[0], splits[1], w0,
                    schedule, steps_per_run, config.seed[0])
                full = step_s / steps * config.num_steps + eval_s / evals * len(schedule)
                total += full
                lines.append(f"    {dataset}/{loss}/{method}: {1e3 * step_s / steps:6.1f} ms/step "
                             f"+ {1e3 * eval_s / evals:6.1f} ms/evaluation -> "
                             f"{full / 60:5.1f} min per {config.num_steps}-step run "
                             f"({len(schedule)} evaluations)")
        shapes = f"train {splits[0][0].shape}, test {splits[1][0].shape}"
        lines.append(f"    ({dataset}: dense float32 features, {shapes})")
        del splits
    return total, lines


def bench_fig2(args, tmp: pathlib.Path) -> None:
    data_dir = pathlib.Path(args.data_dir)
    datasets = fig2_datasets(data_dir)
    variant = "smoke" if args.quick else None  # quick: the smoke schedule and 300 features
    config = load_config("linear_models", variant)
    config.datasets = datasets
    config.data_dir = str(data_dir)
    overrides = [f"--config.data_dir={data_dir}", f"--config.datasets={datasets!r}"]
    real = datasets == FIG2_DATASETS
    runs = len(datasets) * len(config.losses) * len(config.methods)
    say(f"\n== Figure 2: SVM and logistic regression, GD vs ZO, D = {config.num_features + 1} ==")
    source = f"real data, {data_dir}" if real else "synthetic stand-ins"
    say(f"  {runs} runs on {datasets} ({source}), {config.num_steps} steps, metrics every "
        f"{config.eval_every} steps"
        + (" (quick: the smoke variant)" if variant else ""))

    config_arg = "configs/linear_models.py" + (f":{variant}" if variant else "")
    run = run_command("experiments.linear_models", config_arg, tmp / "fig2", tmp / "fig2-cache",
                      overrides)
    compute = run.compute_seconds()
    say(f"  whole command (cold compilation cache): {run.seconds:6.1f} s")
    for line in run.timeline():
        say(line)
    say("    per program: " + ", ".join(f"{r['name']} {r['wall_seconds']:.1f} s"
                                         for r in run.results["runs"]))

    steps_per_run = min(args.fig2_numpy_steps, config.num_steps)
    say(f"  numpy loop on dense features, {steps_per_run} steps per run, extrapolated to "
        f"{config.num_steps} steps:")
    numpy_seconds, lines = fig2_numpy(config, datasets, data_dir, steps_per_run)
    for line in lines:
        say(line)
    say(f"    total: {numpy_seconds / 3600:.2f} h for the {runs} runs "
        f"({numpy_seconds / runs / config.num_steps * 1e3:.0f} ms per step); zojax: "
        f"{compute / runs / config.num_steps * 1e3:.2f} ms per step (compiled programs)")

    check(f"Fig 2 whole command ({runs} runs, cold compilation cache)", run.seconds,
          None if args.quick else 120, unit="s")
    check("Fig 2 compute / numpy loop (same schedule)", compute / numpy_seconds)
    check("Fig 2 whole command / numpy loop", run.seconds / numpy_seconds)


# ---------------------------------------------------------------------------------------------
# The 16-member sweep.


def bench_sweep(args, tmp: pathlib.Path) -> None:
    from experiments import linear_models, runner

    data_dir = pathlib.Path(args.data_dir)
    dataset = fig2_datasets(data_dir)[0]
    config = load_config("linear_models")
    config.data_dir = str(data_dir)
    config.datasets = (dataset,)
    config.losses = ("logistic",)
    config.methods = ("zo",)
    config.logistic.zo.learning_rate = (0.003, 0.01, 0.03, 0.1)
    config.logistic.zo.smoothing = (0.03, 0.1, 0.3, 1.0)
    config.num_steps = 500
    if args.quick:
        config.num_steps, config.num_features = 200, 300
    say(f"\n== Sweep: logistic regression on {dataset}, D = {config.num_features + 1}, 16 members "
        f"(4 η × 4 λ), {config.num_steps} steps, metrics every {config.eval_every} steps ==")

    experiment = linear_models.get_experiment(config)
    # Without the exact-trace cross-check (16 x 10,001 Hessian-vector products) and the plot.
    problems = {}
    members = []
    for member in experiment.members:
        problem = problems.setdefault(id(member.problem), dataclasses.replace(
            member.problem, reference_metrics={}))
        members.append(dataclasses.replace(member, problem=problem))
    assert len(members) == 16, len(members)
    lean = dataclasses.replace(experiment, members=members, plot=None, summary=lambda r: "")

    def run(members, workdir):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            results = runner.run(dataclasses.replace(lean, members=members), config, workdir)
        seconds = time.perf_counter() - start
        return results, results["runs"][0]["wall_seconds"], seconds

    # Two rounds of (vmapped, sequential), interleaved against the machine's noise; the better
    # round of each is kept. The first vmapped call and the first sequential one compile.
    vmapped, vmapped_total, sequential, sequential_total = [], [], [], []
    for round_ in range(2):
        vmapped_results, compute, total = run(members, tmp / f"sweep-vmap-{round_}")
        vmapped.append(compute)
        vmapped_total.append(total)
        final_losses = []
        sequential.append(0.0)
        sequential_total.append(0.0)
        for i, member in enumerate(members):
            results, compute, total = run([member], tmp / f"sweep-seq-{round_}-{i}")
            sequential[-1] += compute
            sequential_total[-1] += total
            final_losses.append(results["runs"][0]["metrics"]["loss"][-1])
    ours = np.array([r["metrics"]["loss"][-1] for r in vmapped_results["runs"]], float)
    difference = (np.abs(ours - np.array(final_losses, float))
                  / np.abs(np.array(final_losses, float)))
    say(f"  vmapped (1 program, 16 members): compute {vmapped[0]:.2f} s, again {vmapped[1]:.2f} s "
        f"(whole call {vmapped_total[0]:.1f} s incl. compilation, again "
        f"{vmapped_total[1]:.1f} s)")
    say(f"  sequential (16 runs, 1 program): compute {sequential[0]:.2f} s, again "
        f"{sequential[1]:.2f} s (whole calls {sequential_total[0]:.1f} s incl. one "
        f"compilation, again {sequential_total[1]:.1f} s)")
    say(f"  final losses, vmapped vs sequential: {np.sum(difference <= 1e-5)}/16 within rtol "
        f"1e-5, max relative difference {np.nanmax(difference):.1e} (float32 reduction order, "
        f"amplified in the large-η members whose loss grows)")
    check("Sweep: 16 vmapped / 16 sequential (compute)", min(vmapped) / min(sequential),
          None if args.quick else 1 / 3)
    check("Sweep: 16 vmapped / 16 sequential (whole calls)",
          min(vmapped_total) / min(sequential_total), None)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps everywhere: a sanity run, targets not checked")
    parser.add_argument("--only", action="append", choices=("fig1", "fig2", "sweep"),
                        help="run only these parts (repeatable)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                        help="data root with libsvm/ (default: %(default)s); synthetic "
                             "stand-ins when a7a/w5a are missing")
    parser.add_argument("--fig2-numpy-steps", type=int, default=40,
                        help="steps per run of the Figure-2 numpy baseline (extrapolated)")
    args = parser.parse_args(argv)
    parts = args.only or ["fig1", "fig2", "sweep"]

    import jax

    started = time.perf_counter()
    say(f"zojax experiment benchmarks ({'quick' if args.quick else 'full'}): jax {jax.__version__}"
        f", {jax.devices()[0].platform}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="zojax-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        for part in ("fig1", "fig2", "sweep"):
            if part in parts:
                {"fig1": bench_fig1, "fig2": bench_fig2, "sweep": bench_sweep}[part](args, tmp)
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


if __name__ == "__main__":
    sys.exit(main())
