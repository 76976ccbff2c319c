"""Side-by-side timing of two zojax trees (issue 9, section 3): the lines of ``benchmarks.core``
and Figure 2's whole command, old and new alternating, per-round new/old ratios.

Run from the repository root (the new tree)::

    python -m benchmarks.compare --old-commit 1b8e2c5 --json /tmp/compare.json  # 6-10 min
    python -m benchmarks.compare --old /path/to/old/tree --rounds 5
    python -m benchmarks.compare --old /path/to/old/tree --noise   # old vs old: the noise floor
    python -m benchmarks.compare --old /path/to/old/tree --rounds 1 --quick   # seconds: a check

``--old-commit SHA`` makes a ``git worktree`` of SHA in a temporary folder and removes it at the
end. Each round runs, in alternating order (old, new, then new, old, ...), one fresh worker
process per tree, ``python <this file> --worker`` with ``PYTHONPATH`` and cwd set to the tree
under test; the worker code is this file for both trees, and it uses only the public API both
share. It times each jitted function (two warm-up calls, then the median of k calls with
``block_until_ready``) and the memory lines' compiled bytes (argument + output + temp − alias,
in MiB). Both trees are byte-compiled first (a fresh worktree would pay for it). Then the Figure 2
commands run as subprocesses of each tree, wall time including process start, each with a fresh
workdir and a fresh (cold) JAX persistent compilation cache, so that neither tree reuses
programs compiled by the other or by an earlier round. PASS: median new/old ratio <= 1.10.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SMOOTHING, LEARNING_RATE, THRESHOLD = 1e-3, 0.1, 1.10
FIG2 = ["-m", "experiments.linear_models", "--config", "configs/linear_models.py:smoke"]
FIG2_RUNS = {"fig2 smoke (s)": [], "fig2 smoke 2000 steps, D=2001 (s)":
             ["--config.num_steps=2000", "--config.num_features=2000"]}
FIG2_QUICK = {"fig2 smoke 20 steps (s)": ["--config.num_steps=20"]}


# ---------------------------------------------------------------------------------------------
# Worker: runs in a fresh process whose `import zojax` is the tree under test.


def worker(tree, quick):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import zojax
    from zojax.problems.linear import logistic_loss, random_features

    where = Path(zojax.__file__).resolve()
    print(f"zojax from {where}", file=sys.stderr)
    if not where.is_relative_to(Path(tree).resolve()):
        sys.exit(f"zojax was imported from {where}, not from {tree}")
    results = {}

    def timed(name, fn, *args, reps=30):  # ms, median of `reps` calls after two warm-ups
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(max(3, reps // 4) if quick else reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        results[name] = 1e3 * float(np.median(times))

    def zo_step(loss, q, **kwargs):  # jitted (params, state) -> (params, state), and the state
        opt = optax.chain(zojax.two_point(SMOOTHING, q, **kwargs), optax.sgd(LEARNING_RATE))

        def step(params, state):
            updates, state = opt.update(None, state, params, value_fn=loss)
            return optax.apply_updates(params, updates), state

        return jax.jit(step), opt.init

    def linear_problem(num_features):  # synthetic a5a (N = 6,414) through random features
        data = zojax.datasets.synthetic_libsvm(0, like="a5a")
        features, _ = random_features(jax.random.key(0), data.train_inputs,
                                      num_features=num_features)
        w = 0.1 * jax.random.normal(jax.random.key(1), (num_features + 1,), jnp.float32)
        return features, jnp.asarray(data.train_labels), w

    qs = (1, 8) if quick else (1, 8, 64)
    features, labels, w = linear_problem(500 if quick else 2_000)
    dense = jax.block_until_ready(features.dense())

    # 1. dense X: ZO step and the jit(vmap(loss)) baseline over 2q vectors.
    dense_loss = lambda p: logistic_loss(p, dense, labels)
    for q in qs:
        given = jax.random.normal(jax.random.key(2), (2 * q, w.size))
        timed(f"dense vmap(loss) 2q, q={q}", jax.jit(jax.vmap(dense_loss)), given)
        step, init = zo_step(dense_loss, q)
        timed(f"dense ZO step q={q}", step, w, init(w))

    # 2. affine map (X never formed): the RNG variants and the line form.
    affine_loss = lambda p: logistic_loss(p, features, labels)
    variants = {"default": (affine_loss, {}),
                "rademacher": (affine_loss, dict(direction="rademacher")),
                "rbg key": (affine_loss, dict(seed=jax.random.key(0, impl="rbg"))),
                "line form": (zojax.estimators.bind(logistic_loss, features, labels), {})}
    for q in qs:
        for name, (loss, kwargs) in variants.items():
            step, init = zo_step(loss, q, **kwargs)
            timed(f"affine ZO step {name}, q={q}", step, w, init(w), reps=200)

    # 3. other evaluation paths at q = 8.
    for name, kwargs in {"forward": dict(scheme="forward"), "chunk_size=1": dict(chunk_size=1),
                         "chunk_size=4": dict(chunk_size=4)}.items():
        step, init = zo_step(affine_loss, 8, **kwargs)
        timed(f"affine ZO step {name}, q=8", step, w, init(w), reps=200)

    # 4. one affine loss evaluation vs the dense product.
    timed("affine loss", jax.jit(affine_loss), w, reps=200)
    product = jax.jit(lambda x, p: jnp.matmul(x, p, precision=jax.lax.Precision.HIGHEST))
    timed("dense X·w", product, dense, w, reps=200)

    # 5. curvature on a dense X.
    features, labels, w = linear_problem(299 if quick else 999)
    dense = jax.block_until_ready(features.dense())
    key = jax.random.key(3)
    timed(f"hessian_trace dense D={w.size}", jax.jit(
        lambda p: zojax.hessian_trace(logistic_loss, p, dense, labels)), w, reps=10)
    timed("hutchinson_trace 64 samples", jax.jit(lambda p: zojax.hutchinson_trace(
        logistic_loss, key, p, dense, labels, num_samples=64)), w, reps=30)
    timed("zo_trace 64 samples", jax.jit(lambda p: zojax.zo_trace(
        logistic_loss, key, p, dense, labels, delta=1e-2, num_samples=64)), w, reps=30)

    # 6. memory (bytes, not ms) of a donated chunk_size=1 ZO step on a ~1M-parameter MLP.
    sizes, batch = [784, 1024, 256, 10], 64
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = {f"layer{i}": {"w": jax.random.normal(k, (a, b)) / a**0.5, "b": jnp.zeros(b)}
              for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

    def mlp_loss(params, x, y):
        for i in range(len(params)):
            x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
            x = jax.nn.relu(x) if i < len(params) - 1 else x
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, y))

    x, y = jnp.zeros((batch, sizes[0])), jnp.zeros(batch, jnp.int32)
    for q in (1, 8):
        opt = optax.chain(zojax.two_point(SMOOTHING, q, chunk_size=1), optax.sgd(LEARNING_RATE))

        def step(p, state, x, y, opt=opt):
            updates, state = opt.update(None, state, p, value_fn=lambda p: mlp_loss(p, x, y))
            return optax.apply_updates(p, updates), state

        stats = jax.jit(step, donate_argnums=0).lower(params, opt.init(params), x, y).compile()
        stats = stats.memory_analysis()
        results[f"memory MLP chunk_size=1, q={q} (MiB)"] = (
            stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes) / 2**20
    print("RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Driver


def run_worker(tree, quick):
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the worker compiles everything, no cache
    command = [sys.executable, str(HERE), "--worker", "--tree", str(tree)]
    out = subprocess.run(command + ["--quick"] * quick, cwd=tree, env=env, capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(f"worker for {tree} failed:\n{out.stderr[-3000:]}")
    print("   ", *[x for x in out.stderr.splitlines() if x.startswith("zojax from")], flush=True)
    return json.loads(out.stdout.split("RESULTS ", 1)[1])


def run_fig2(tree, quick):
    results = {}
    for name, extra in (FIG2_QUICK if quick else FIG2_RUNS).items():
        with tempfile.TemporaryDirectory(prefix="zojax-compare-") as tmp:
            env = dict(os.environ, PYTHONPATH=str(tree), JAX_COMPILATION_CACHE_DIR=f"{tmp}/cache")
            start = time.perf_counter()
            out = subprocess.run([sys.executable, *FIG2, *extra, "--workdir", f"{tmp}/run"],
                                 cwd=tree, env=env, capture_output=True, text=True)
            results[name] = time.perf_counter() - start
        if out.returncode:
            sys.exit(f"Figure 2 command failed in {tree}:\n{out.stderr[-3000:]}")
    return results


def summarize(rounds):
    import numpy as np

    rows = []
    for name in rounds[0]["old"]:
        old = np.array([r["old"][name] for r in rounds])
        new = np.array([r["new"][name] for r in rounds])
        ratios = new / old
        median = float(np.median(ratios))
        rows.append((name, f"{np.median(old):.2f}", f"{np.median(new):.2f}", f"{median:.3f}",
                     f"{ratios.min():.3f}–{ratios.max():.3f}",
                     "PASS" if median <= THRESHOLD else "FAIL"))
    header = ("line (ms unless marked)", "old", "new", "new/old", "spread (min–max)", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{x:<{w}}" if i == 0 else f"{x:>{w}}"
                       for i, (x, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines), all(row[-1] == "PASS" for row in rows)


def compare(old, new, num_rounds, quick):
    for tree in {old, new}:  # bytecode first: a fresh worktree would pay for it in round 1
        subprocess.run([sys.executable, "-m", "compileall", "-q", "zojax", "experiments",
                        "configs"], cwd=tree, check=True, capture_output=True)
    rounds = []
    for i in range(num_rounds):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        result = {"order": order, "old": {}, "new": {}}
        start = time.perf_counter()
        for side in order:
            tree = old if side == "old" else new
            print(f"round {i + 1}/{num_rounds}: {side} ({tree})", flush=True)
            result[side].update(run_worker(tree, quick))
        for side in order:
            result[side].update(run_fig2(old if side == "old" else new, quick))
        result["seconds"] = time.perf_counter() - start
        result["load"] = os.getloadavg()  # 1, 5, 15 min: other work on the machine is noise
        print(f"round {i + 1} took {result['seconds']:.0f} s, load {result['load'][0]:.1f}",
              flush=True)
        rounds.append(result)
    return rounds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the tree before the change")
    parser.add_argument("--old-commit", help="make a temporary git worktree of this commit")
    parser.add_argument("--new", type=Path, default=HERE.parents[1], help="(default: this repo)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny workloads (a check)")
    parser.add_argument("--noise", action="store_true", help="old vs old: the noise floor")
    parser.add_argument("--json", type=Path, help="write the per-round numbers here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.tree, args.quick)
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
        rounds = compare(old, new, args.rounds, args.quick)
    finally:
        if temp:
            subprocess.run(["git", "-C", str(args.new), "worktree", "remove", "--force", temp],
                           check=True)
    table, ok = summarize(rounds)
    print(f"\nold = {old}\nnew = {new}{' (noise floor: old vs old)' if args.noise else ''}\n"
          f"{args.rounds} rounds, {time.perf_counter() - start:.0f} s\n\n{table}\n\n"
          f"{'PASS' if ok else 'FAIL'}: median new/old <= {THRESHOLD:.2f} on every line")
    if args.json:
        args.json.write_text(json.dumps({"old": str(old), "new": str(new), "noise": args.noise,
                                         "quick": args.quick, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE.parent:  # benchmarks/ must not shadow
        sys.path.pop(0)  # the tree under test (benchmarks/experiments.py vs experiments/)
    main()
