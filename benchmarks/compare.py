"""Side-by-side timing of two zojax trees, old and new alternating, per-round new/old ratios.

Issues 9 and 10: the lines of ``benchmarks.core`` and of ``benchmarks.figures``, shortened.

Run from the repository root (the new tree)::

    python -m benchmarks.compare --old-commit 1b8e2c5 --json /tmp/compare.json  # core, 6-10 min
    python -m benchmarks.compare --old-commit 1b8e2c5 --suite experiments      # 10-15 min
    python -m benchmarks.compare --old /path/to/old/tree --rounds 5 --suite all
    python -m benchmarks.compare --old /path/to/old/tree --noise   # old vs old: the noise floor
    python -m benchmarks.compare --old /path/to/old/tree --rounds 1 --quick   # seconds: a check

``--old-commit SHA`` makes a ``git worktree`` of SHA in a temporary folder and removes it at the
end. ``--suite`` picks the lines (default ``core``, the lines issue 9 compared, so that earlier
commands keep their meaning and duration; ``experiments``; ``all``: both):

- ``core``: one fresh worker process per tree, ``python <this file> --worker core`` with
  ``PYTHONPATH`` and cwd set to the tree under test (the worker code is this file and
  ``benchmarks/workloads.py`` for both trees, loaded by path, using only the public API both
  share), times each jitted function (two warm-up calls, then the median of k calls with
  ``block_until_ready``) and the memory lines' compiled bytes (argument + output + temp −
  alias, in MiB); then Figure 2's smoke command of each tree, each with a fresh workdir and a
  fresh (cold) JAX persistent compilation cache.
- ``experiments``: the timing lines of ``benchmarks.figures`` on shortened workloads, each
  command in a fresh subprocess of the tree: Figure 1 (50,000 steps): compute (results.json's
  ``wall_seconds`` summed over programs, the better of the two runs) and the whole command with
  a cold (empty) and then a warm (the same folder again) compilation cache; Figure 2 (a7a and
  w5a when present in ``--data-dir``, else their synthetic stand-ins; 1,000 steps): the whole
  command with a cold cache and its compute; the 16-member λ/η sweep (300 steps, D = 10,001) in
  a worker (``--worker sweep``, through ``experiments.linear_models.get_experiment`` and
  ``experiments.runner.run`` only): the vmapped program's ``wall_seconds``, the sum over 16
  sequential single-member runs (each the best of 3 repeats in the worker), and their ratio.
  About 2-3 min a round on 2 cores.

A round runs every part on both trees, in alternating order (old, new, then new, old, ...).
Both trees are byte-compiled first (a fresh worktree would pay for it). PASS: median of the
per-round new/old ratios <= 1.10 (spread: their min–max). The numbers are seconds or ms as each
line says; lower is better on every line.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
THRESHOLD = 1.10
SUITES = ("core", "experiments", "all")
FIG2_SMOKE = {"fig2 smoke (s)": [], "fig2 smoke 2000 steps, D=2001 (s)":
              ["--config.num_steps=2000", "--config.num_features=2000"]}
FIG2_SMOKE_QUICK = {"fig2 smoke 20 steps (s)": ["--config.num_steps=20"]}
FIG1_STEPS, FIG2_STEPS, SWEEP_STEPS = 50_000, 1_000, 300  # --quick: 2,000, smoke 20, 20 (D=301)
SWEEP_REPEATS = 3  # the sweep worker keeps the best of this many (--quick: 1)


def _sibling(name):
    """``benchmarks/<name>.py`` next to this file, loaded by path: in a worker, ``sys.path``
    holds the tree under test, whose ``benchmarks/`` may lack it or hold another version."""
    spec = importlib.util.spec_from_file_location(f"_zojax_compare_{name}", HERE.parent /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _sibling("harness")


# ---------------------------------------------------------------------------------------------
# Workers: run in a fresh process whose `import zojax` / `import experiments` is the tree.


def _check_imported_from(module, tree):
    where = Path(module.__file__).resolve()
    print(f"{module.__name__} from {where}", file=sys.stderr)
    if not where.is_relative_to(Path(tree).resolve()):
        sys.exit(f"{module.__name__} was imported from {where}, not from {tree}")


def core_worker(tree, quick) -> dict:
    """ms per call of the core lines (median of k calls after two warm-ups) and MiB of the
    compiled chunk_size=1 ZO step on a ~1M-parameter MLP."""
    import jax
    import jax.numpy as jnp

    import zojax

    _check_imported_from(zojax, tree)
    workloads = _sibling("workloads")  # imports zojax: the tree under test
    from zojax.problems.linear import logistic_loss

    results = {}

    def timed(name, fn, *args, reps=30):
        reps = max(3, reps // 4) if quick else reps
        results[name] = 1e3 * harness.median_seconds(fn, *args, reps=reps)

    qs = (1, 8) if quick else (1, 8, 64)
    features, labels, w = workloads.linear_problem(500 if quick else 2_000)
    dense = harness.ready(features.dense())

    # 1. dense X: ZO step and the jit(vmap(loss)) baseline over 2q vectors.
    dense_loss = lambda p: logistic_loss(p, dense, labels)
    for q in qs:
        given = jax.random.normal(jax.random.key(2), (2 * q, w.size))
        timed(f"dense vmap(loss) 2q, q={q}", jax.jit(jax.vmap(dense_loss)), given)
        step, init = workloads.zo_step_fn(dense_loss, q)
        timed(f"dense ZO step q={q}", step, w, init(w))

    # 2. affine map (X never formed): the RNG variants and the line form.
    affine_loss = lambda p: logistic_loss(p, features, labels)
    variants = {"default": (affine_loss, {}),
                "rademacher": (affine_loss, dict(direction="rademacher")),
                "rbg key": (affine_loss, dict(seed=jax.random.key(0, impl="rbg"))),
                "line form": (zojax.estimators.bind(logistic_loss, features, labels), {})}
    for q in qs:
        for name, (loss, kwargs) in variants.items():
            step, init = workloads.zo_step_fn(loss, q, **kwargs)
            timed(f"affine ZO step {name}, q={q}", step, w, init(w), reps=200)

    # 3. other evaluation paths at q = 8.
    for name, kwargs in {"forward": dict(scheme="forward"), "chunk_size=1": dict(chunk_size=1),
                         "chunk_size=4": dict(chunk_size=4)}.items():
        step, init = workloads.zo_step_fn(affine_loss, 8, **kwargs)
        timed(f"affine ZO step {name}, q=8", step, w, init(w), reps=200)

    # 4. one affine loss evaluation vs the dense product.
    timed("affine loss", jax.jit(affine_loss), w, reps=200)
    product = jax.jit(lambda x, p: jnp.matmul(x, p, precision=jax.lax.Precision.HIGHEST))
    timed("dense X·w", product, dense, w, reps=200)

    # 5. curvature on a dense X.
    features, labels, w = workloads.linear_problem(299 if quick else 999)
    dense = harness.ready(features.dense())
    key = jax.random.key(3)
    timed(f"hessian_trace dense D={w.size}", jax.jit(
        lambda p: zojax.hessian_trace(logistic_loss, p, dense, labels)), w, reps=10)
    timed("hutchinson_trace 64 samples", jax.jit(lambda p: zojax.hutchinson_trace(
        logistic_loss, key, p, dense, labels, num_samples=64)), w, reps=30)
    timed("zo_trace 64 samples", jax.jit(lambda p: zojax.zo_trace(
        logistic_loss, key, p, dense, labels, delta=1e-2, num_samples=64)), w, reps=30)

    # 6. memory (MiB, not ms) of a donated chunk_size=1 ZO step on a ~1M-parameter MLP.
    sizes, batch = [784, 1024, 256, 10], 64
    params = workloads.mlp_init(jax.random.key(0), sizes)
    x, y = jnp.zeros((batch, sizes[0])), jnp.zeros(batch, jnp.int32)
    for q in (1, 8):
        step, init = workloads.mlp_zo_step(q, chunk_size=1)
        results[f"memory MLP chunk_size=1, q={q} (MiB)"] = harness.compiled_bytes(
            step, params, init(params), x, y, donate=True) / 2**20
    return results


def sweep_worker(tree, quick, data_dir) -> dict:
    """The 16-member λ/η sweep: seconds of the vmapped program and of 16 sequential
    single-member runs (``wall_seconds``, compilation excluded), and their ratio."""
    import experiments.runner
    import zojax

    _check_imported_from(zojax, tree)
    _check_imported_from(experiments.runner, tree)
    dataset = harness.fig2_datasets(data_dir)[0]
    steps, features = (20, 300) if quick else (SWEEP_STEPS, None)
    config = harness.sweep_config(dataset, data_dir, steps, features, root=tree)
    lean, members = harness.lean_sweep(config)
    # Best of SWEEP_REPEATS interleaved (vmapped, sequential) repeats in this process (the first
    # compiles, the others reuse its programs): one ~1 s run is at the mercy of the machine.
    vmapped, sequential = [], []
    with tempfile.TemporaryDirectory(prefix="zojax-compare-sweep-") as tmp:
        for r in range(1 if quick else SWEEP_REPEATS):
            vmapped.append(harness.run_quietly(lean, members, config,
                                               Path(tmp) / f"vmap-{r}")[1])
            sequential.append(sum(
                harness.run_quietly(lean, [member], config, Path(tmp) / f"seq-{r}-{i}")[1]
                for i, member in enumerate(members)))
    vmapped, sequential = min(vmapped), min(sequential)
    name = f"sweep 16 members, {config.num_steps} steps, D={config.num_features + 1}"
    return {f"{name}: vmapped (s)": vmapped, f"{name}: 16 sequential (s)": sequential,
            f"{name}: vmapped / sequential (x)": vmapped / sequential}


def run_worker(kind, tree, quick, *extra) -> dict:
    """``python <this file> --worker <kind>`` in ``tree`` (cwd and PYTHONPATH), no persistent
    compilation cache; returns the dict it prints after ``RESULTS``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the worker compiles everything, no cache
    command = [sys.executable, str(HERE), "--worker", kind, "--tree", str(tree), *extra]
    out = subprocess.run(command + ["--quick"] * quick, cwd=tree, env=env, capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(f"{kind} worker for {tree} failed:\n{out.stderr[-3000:]}")
    for line in out.stderr.splitlines():
        if " from /" in line:  # where the worker imported zojax and experiments from
            print("   ", line, flush=True)
    return json.loads(out.stdout.rsplit("RESULTS ", 1)[1])


# ---------------------------------------------------------------------------------------------
# Parts: part(tree) -> {line: value}, run on both trees in every round.


def suite_parts(suite, quick, data_dir) -> list:
    """The measurements of ``suite`` ("core", "experiments" or "all"), in running order."""
    data_dir = Path(data_dir).resolve()
    datasets = harness.fig2_datasets(data_dir)

    def core(tree):
        """The core lines, in a worker."""
        return run_worker("core", tree, quick)

    def fig2_smoke(tree):
        """Figure 2's smoke command, whole, cold cache."""
        results = {}
        for name, extra in (FIG2_SMOKE_QUICK if quick else FIG2_SMOKE).items():
            with tempfile.TemporaryDirectory(prefix="zojax-compare-") as tmp:
                run = harness.run_command("experiments.linear_models",
                                          "configs/linear_models.py:smoke", f"{tmp}/run",
                                          f"{tmp}/cache", extra, tree=tree)
            results[name] = run.seconds
        return results

    def fig1(tree):
        """Figure 1: compute, and the whole command with a cold then a warm cache."""
        steps = 2_000 if quick else FIG1_STEPS
        with tempfile.TemporaryDirectory(prefix="zojax-compare-") as tmp:
            cold, warm = [harness.run_command("experiments.test_function",
                                              "configs/test_function.py", f"{tmp}/{workdir}",
                                              f"{tmp}/cache", [f"--config.num_steps={steps}"],
                                              tree=tree) for workdir in ("cold", "warm")]
        name = f"fig1 {steps} steps"
        return {f"{name}: compute (s)": min(cold.compute_seconds(), warm.compute_seconds()),
                f"{name}: command, cold cache (s)": cold.seconds,
                f"{name}: command, warm cache (s)": warm.seconds}

    def fig2(tree):
        """Figure 2 on a short schedule: the whole command (cold cache) and its compute."""
        if quick:
            config, overrides, name = ("configs/linear_models.py:smoke", ["--config.num_steps=20"],
                                       "fig2 smoke 20 steps")
        else:
            config = "configs/linear_models.py"
            overrides = [f"--config.data_dir={data_dir}", f"--config.datasets={datasets!r}",
                         f"--config.num_steps={FIG2_STEPS}"]
            name = f"fig2 {FIG2_STEPS} steps, {'+'.join(datasets)}"
        with tempfile.TemporaryDirectory(prefix="zojax-compare-") as tmp:
            run = harness.run_command("experiments.linear_models", config, f"{tmp}/run",
                                      f"{tmp}/cache", overrides, tree=tree)
        return {f"{name}: command, cold cache (s)": run.seconds,
                f"{name}: compute (s)": run.compute_seconds()}

    def sweep(tree):
        """The 16-member sweep, in a worker."""
        return run_worker("sweep", tree, quick, "--data-dir", str(data_dir))

    parts = {"core": [core, fig2_smoke], "experiments": [fig1, fig2, sweep]}
    return parts["core"] + parts["experiments"] if suite == "all" else parts[suite]


def compare(old, new, num_rounds, parts):
    """Byte-compiles both trees, then :func:`harness.alternating` rounds of ``parts``."""
    for tree in {old, new}:  # bytecode first: a fresh worktree would pay for it in round 1
        subprocess.run([sys.executable, "-m", "compileall", "-q", "zojax", "experiments",
                        "configs"], cwd=tree, check=True, capture_output=True)
    return harness.alternating({"old": old, "new": new}, parts, num_rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the tree before the change")
    parser.add_argument("--old-commit", help="make a temporary git worktree of this commit")
    parser.add_argument("--new", type=Path, default=HERE.parents[1], help="(default: this repo)")
    parser.add_argument("--suite", choices=SUITES, default="core",
                        help="which lines: benchmarks.core's, benchmarks.figures', or all "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny workloads (a check)")
    parser.add_argument("--noise", action="store_true", help="old vs old: the noise floor")
    parser.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR,
                        help="data root with libsvm/a7a, w5a (default: %(default)s); "
                             "synthetic stand-ins when missing")
    parser.add_argument("--json", type=Path, help="write the per-round numbers here")
    parser.add_argument("--worker", choices=("core", "sweep"), help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"core": lambda: core_worker(args.tree, args.quick),
                  "sweep": lambda: sweep_worker(args.tree, args.quick, args.data_dir)}
        print("RESULTS " + json.dumps(worker[args.worker]()))
        return
    if (args.old is None) == (args.old_commit is None):
        parser.error("give exactly one of --old and --old-commit")
    new = args.new.resolve()
    temp = None
    if args.old_commit:
        temp = tempfile.mkdtemp(prefix="zojax-old-")
        subprocess.run(["git", "-C", str(new), "worktree", "add", "--detach", temp,
                        args.old_commit], check=True, capture_output=True)
    old = Path(temp) if temp else args.old.resolve()
    new = old if args.noise else new
    try:
        start = time.perf_counter()
        rounds = compare(old, new, args.rounds, suite_parts(args.suite, args.quick,
                                                            args.data_dir))
    finally:
        if temp:
            subprocess.run(["git", "-C", str(args.new), "worktree", "remove", "--force", temp],
                           check=True)
    table, ok = harness.ratio_table(rounds, THRESHOLD)
    print(f"\nold = {old}\nnew = {new}{' (noise floor: old vs old)' if args.noise else ''}\n"
          f"suite {args.suite}, {args.rounds} rounds, {time.perf_counter() - start:.0f} s\n\n"
          f"{table}\n\n{'PASS' if ok else 'FAIL'}: median new/old <= {THRESHOLD:.2f} on every "
          "line")
    if args.json:
        args.json.write_text(json.dumps({"old": str(old), "new": str(new), "noise": args.noise,
                                         "quick": args.quick, "suite": args.suite,
                                         "rounds": rounds}, indent=1))


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE.parent:  # benchmarks/ must not shadow
        sys.path.pop(0)  # the tree under test
    main()
