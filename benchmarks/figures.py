r"""Benchmarks of the Figure 1 and Figure 2 experiments (issue 3, section 5), ratios in one run.

    python -m benchmarks.figures            # the full benchmark (~5-8 min on 2 cores)
    python -m benchmarks.figures --quick    # a fast sanity run (fewer steps; no targets)
    python -m benchmarks.figures --only fig1 [--only sweep ...]

What it measures (every JAX number comes from the experiments' own code, as users run it):

1. Figure 1 (``configs/test_function.py``: GD, ZO λ → 0 and ZO λ ∈ {0.1, 0.05, 0.01}, 100k steps).
   The baseline is a plain numpy loop doing the same steps (same update rules, Gaussian
   directions from numpy's ``Generator``, loss and trace at the same evaluation steps).
   - compute: the ``wall_seconds`` of results.json (the compiled programs, summed over programs)
     over the numpy loop; target ≤ 1/3. Compilation is reported separately: results.json's
     ``compile_seconds`` summed over programs (n/a when the runner does not record it).
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

The numpy loops are :mod:`benchmarks.baselines`; timing, commands and reporting
:mod:`benchmarks.harness`.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from benchmarks.baselines import fig1_numpy, fig2_numpy
from benchmarks.harness import (
    DEFAULT_DATA_DIR,
    FIG2_DATASETS,
    check,
    fig2_datasets,
    in_seconds,
    lean_sweep,
    load_config,
    run_command,
    run_quietly,
    say,
    summary,
    sweep_config,
)

# ---------------------------------------------------------------------------------------------
# Figure 1.


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
            f"{in_seconds(run.compile_seconds())}, compute {run.compute_seconds():.2f} s)")
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
    # compile_seconds of results.json summed over programs (NaN, n/a: not recorded).
    check("Fig 1 compilation (cold cache)", best(cold.compile_seconds(), cold2.compile_seconds()),
          unit="s")
    check("Fig 1 compilation (warm cache)", best(warm.compile_seconds(), warm2.compile_seconds()),
          unit="s")


def best(*seconds: float) -> float:
    """The smallest of ``seconds`` that was measured (NaN if none was)."""
    measured = [s for s in seconds if not np.isnan(s)]
    return min(measured) if measured else float("nan")


# ---------------------------------------------------------------------------------------------
# Figure 2.


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
    data_dir = pathlib.Path(args.data_dir)
    dataset = fig2_datasets(data_dir)[0]
    config = sweep_config(dataset, data_dir, *((200, 300) if args.quick else (500,)))
    say(f"\n== Sweep: logistic regression on {dataset}, D = {config.num_features + 1}, 16 members "
        f"(4 η × 4 λ), {config.num_steps} steps, metrics every {config.eval_every} steps ==")
    lean, members = lean_sweep(config)  # no exact-trace cross-check (16 x D HVPs), no plot
    assert len(members) == 16, len(members)

    def run(members, workdir):
        return run_quietly(lean, members, config, workdir)

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
    return summary(started)


if __name__ == "__main__":
    sys.exit(main())
