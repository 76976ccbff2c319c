"""Core performance benchmarks of zojax (issue 2, section 4), printed as ratios from one run.

Run from the repository root::

    python -m benchmarks.core           # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.core --quick   # sanity run: smaller problems, fewer repeats
    python -m benchmarks.core --sections 5   # one section

Sections:

1. ZO step overhead: one jitted ``chain(two_point(λ, q), sgd(η))`` step (params → new params,
   state) against ``jax.jit(jax.vmap(loss))`` over 2q given parameter vectors, for logistic
   regression on a dense X (N = 6,414, D = 10,001 random features of synthetic a5a), then on the
   affine random-feature map, where the random numbers are a visible share of the step; the
   RNG variants a user can pick are timed side by side, and the step through the loss's line
   form (``zojax.estimators.bind``: X w and X u, 1 + q columns instead of 2q).
2. One loss evaluation with the affine map against the dense N × D product X·w.
3. Exact Hessian trace: D = 10,001 with the affine map (seconds), and D = 2,000 on a dense X
   against ``jnp.trace(jax.hessian(f))``; a sweep of ``chunk_size``.
4. Memory from the compiled programs' ``memory_analysis()`` (argument + output + temp − alias)
   on ~1M-parameter MLPs, params donated: forward, ``chunk_size=1`` ZO step and backprop step.
5. The tilted (ZEST) step against the two-point step with the same function evaluations
   (``tilted(num_directions=2q)`` vs ``two_point(num_directions=q)``), unchunked (logistic
   regression, dense X and the affine map's line form) and chunked (``chunk_size=1``, MLP).

Timings interleave baseline and candidate (warm-up first, ``block_until_ready``) and report the
median over rounds of the per-round ratio, which is robust to load drifting during the run.
The timing helpers are :mod:`benchmarks.harness`, the problems :mod:`benchmarks.workloads`.
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import optax

import zojax
from benchmarks.harness import (
    compiled_bytes,
    interleaved,
    ms,
    ratio,
    ready,
    table,
    time_once,
    verdict,
)
from benchmarks.workloads import (
    LEARNING_RATE,
    SMOOTHING,
    linear_problem,
    mlp_init,
    mlp_loss,
    mlp_zo_step,
    step_fn,
    zo_step_fn,
)
from zojax.problems.linear import logistic_hessian_trace, logistic_loss


def jax_random_normal(key, params):
    """The previous default sampler (``jax.random.normal`` per leaf), for comparison."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


# ---------------------------------------------------------------------------------------------
# 1. ZO step overhead


def section_step_overhead(quick):
    print("=" * 96)
    print("1. ZO step overhead: jit(chain(two_point(λ, q), sgd)) step vs jit(vmap(loss)) over 2q"
          " given vectors")
    print("=" * 96)
    num_features = 2_000 if quick else 10_000
    features, labels, w = linear_problem(num_features)
    dense = ready(features.dense())
    dim = w.size
    qs = (1, 8) if quick else (1, 8, 64)
    print(f"logistic regression, N = {dense.shape[0]}, D = {dim}; λ = {SMOOTHING}, central "
          f"Gaussian directions, chunk_size=None\n")

    key = jax.random.key(0)
    identical = all(
        bool(jnp.array_equal(zojax.directions.gaussian(jax.random.fold_in(key, i), w),
                             jax.random.normal(jax.random.split(jax.random.fold_in(key, i), 1)[0],
                                               w.shape)))
        for i in range(3))
    print(f"default Gaussian directions bit-identical to jax.random.normal: {identical}\n")

    rows = []
    dense_ok = True
    for q in qs:
        loss = lambda p: logistic_loss(p, dense, labels)  # noqa: E731
        step, init = zo_step_fn(loss, q)
        given = jax.random.normal(jax.random.key(2), (2 * q, dim))
        times = interleaved({"baseline": (jax.jit(jax.vmap(loss)), (given,)),
                             "zo_step": (step, (w, init(w)))}, rounds=5 if quick else 15)
        r = ratio(times, "zo_step")
        dense_ok &= r <= 1.15
        rows.append((q, ms(times["baseline"]), ms(times["zo_step"]), f"{r:.3f}", "<= 1.15",
                     verdict(r <= 1.15)))
    print("dense X (materialized N x D):")
    table(("q", "vmap(loss) ms", "ZO step ms", "ratio", "target", ""), rows)

    # Affine map: the RNG is now visible. Variants a user can choose, side by side.
    loss = lambda p: logistic_loss(p, features, labels)  # noqa: E731
    variants = {
        "default (fused threefry)": dict(),
        "jax.random.normal (before)": dict(direction=jax_random_normal),
        "rbg key": dict(seed=jax.random.key(0, impl="rbg")),
        "unsafe_rbg key": dict(seed=jax.random.key(0, impl="unsafe_rbg")),
        "threefry_partitionable=False": dict(),
        "rademacher directions": dict(direction="rademacher"),
    }
    if quick:
        variants = {k: v for k, v in variants.items() if k in ("default (fused threefry)",
                                                               "jax.random.normal (before)")}
    rows = []
    for q in qs:
        given = jax.random.normal(jax.random.key(2), (2 * q, dim))
        directions = given[:q]

        def no_rng(params, directions):  # the same step with the directions given: the floor
            values = jax.vmap(jax.vmap(loss))(
                jnp.stack([params + SMOOTHING * directions, params - SMOOTHING * directions]))
            coeffs = (values[0] - values[1]) / (2 * SMOOTHING)
            return params - LEARNING_RATE * (coeffs @ directions) / directions.shape[0]

        candidates = {"baseline": (jax.jit(jax.vmap(loss)), (given,)),
                      "directions given (no RNG)": (jax.jit(no_rng), (w, directions))}
        for name, kwargs in variants.items():
            if name == "threefry_partitionable=False":
                jax.config.update("jax_threefry_partitionable", False)
                try:  # compiled ahead of time, so that later calls cannot retrace without it
                    step, init = zo_step_fn(loss, q)
                    state = init(w)
                    step = step.lower(w, state).compile()
                finally:
                    jax.config.update("jax_threefry_partitionable", True)
            else:
                step, init = zo_step_fn(loss, q, **kwargs)
                state = init(w)
            candidates[name] = (step, (w, state))
        # The loss's line form, kept by bind (the lambda above drops it): X w and X U.
        step, init = zo_step_fn(zojax.estimators.bind(logistic_loss, features, labels), q)
        candidates["line form (bind)"] = (step, (w, init(w)))
        times = interleaved(candidates, rounds=10 if quick else 40)
        for name in candidates:
            if name != "baseline":
                rows.append((q, name, ms(times["baseline"]), ms(times[name]),
                             f"{ratio(times, name):.3f}"))
    print("affine random-feature map (X never formed); target 1.15 applies to the dense X, "
          "this is the report:")
    table(("q", "variant", "vmap(loss) ms", "step ms", "ratio"), rows)
    return dense_ok


# ---------------------------------------------------------------------------------------------
# 2. Affine loss vs dense product


def section_affine_vs_dense(quick):
    print("=" * 96)
    print("2. One loss evaluation with the affine map vs the dense N x D product X·w")
    print("=" * 96)
    features, labels, w = linear_problem(2_000 if quick else 10_000)
    dense = ready(features.dense())
    affine_loss = jax.jit(lambda p: logistic_loss(p, features, labels))
    product = jax.jit(lambda x, p: jnp.matmul(x, p, precision=jax.lax.Precision.HIGHEST))
    times = interleaved({"baseline": (product, (dense, w)), "affine": (affine_loss, (w,))},
                        rounds=10 if quick else 40)
    r = ratio(times, "affine")
    table(("N x D", "X·w ms", "affine loss ms", "ratio", "target", ""),
          [(f"{dense.shape[0]} x {dense.shape[1]}", ms(times["baseline"]), ms(times["affine"]),
            f"{r:.3f}", "<= 0.10", verdict(r <= 0.1))])
    return r <= 0.1


# ---------------------------------------------------------------------------------------------
# 3. Exact Hessian trace


def section_trace(quick):
    print("=" * 96)
    print("3. Exact Hessian trace (zojax.hessian_trace) of the logistic loss")
    print("=" * 96)
    ok = True
    default = zojax.curvature.DEFAULT_CHUNK_SIZE

    features, labels, w = linear_problem(2_000 if quick else 10_000)
    exact = float(logistic_hessian_trace(w, features, labels))
    rows = []
    for chunk in (default,) if quick else (128, 256, 512, 1024, 2048):
        trace = jax.jit(lambda p, c=chunk: zojax.hessian_trace(logistic_loss, p, features,
                                                               labels, chunk_size=c))
        first, value = time_once(trace, w)
        second, _ = time_once(trace, w)
        rel = abs(float(value) - exact) / exact
        rows.append((w.size, chunk, f"{first:.2f}", f"{second:.2f}", f"{rel:.1e}"))
    print(f"affine map, closed form {exact:.4f} (default chunk_size = {default}):")
    table(("D", "chunk", "first call s (incl. compile)", "second call s", "rel. error"), rows)

    dim = 500 if quick else 2_000
    features, labels, w = linear_problem(dim - 1)
    dense = ready(features.dense())
    reference = jax.jit(lambda p: jnp.trace(jax.hessian(logistic_loss)(p, dense, labels)))
    candidates = {"baseline": (reference, (w,))}
    chunks = (default,) if quick else (128, 256, 512, 1024, dim)
    for chunk in chunks:
        candidates[chunk] = (jax.jit(lambda p, c=chunk: zojax.hessian_trace(
            logistic_loss, p, dense, labels, chunk_size=c)), (w,))
    times = interleaved(candidates, rounds=2 if quick else 5)
    rows = []
    for chunk in chunks:
        r = ratio(times, chunk)
        target = chunk == default
        ok &= r <= 1.5 if target else True
        rows.append((dim, chunk, ms(times["baseline"]), ms(times[chunk]), f"{r:.3f}",
                     "<= 1.5" if target else "", verdict(r <= 1.5) if target else ""))
    print(f"dense X ({dense.shape[0]} x {dim}) vs jnp.trace(jax.hessian(f)):")
    table(("D", "chunk", "trace(hessian) ms", "hessian_trace ms", "ratio", "target", ""), rows)
    return ok


# ---------------------------------------------------------------------------------------------
# 4. Memory


def section_memory(quick):
    print("=" * 96)
    print("4. Memory (argument + output + temp − alias of the compiled program), params donated")
    print("=" * 96)
    models = {"wide 784-1024-256-10": [784, 1024, 256, 10],
              "deep 784-256x16-10": [784] + [256] * 16 + [10]}
    batches = (64, 1024) if quick else (64, 1024, 4096)
    qs = (1, 8, 64)
    rows, ok, crossover = [], True, []
    for model, sizes in models.items():
        params = mlp_init(jax.random.key(0), sizes)
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        num = sum(x.size for x in jax.tree.leaves(params))
        for batch in batches:
            inputs = jnp.zeros((batch, sizes[0]))
            labels = jnp.zeros((batch,), jnp.int32)
            forward = compiled_bytes(mlp_loss, params, inputs, labels)

            sgd = optax.sgd(LEARNING_RATE)

            def grad_step(p, state, x, y, sgd=sgd):
                updates, state = sgd.update(jax.grad(mlp_loss)(p, x, y), state, p)
                return optax.apply_updates(p, updates), state

            backprop = compiled_bytes(grad_step, params, sgd.init(params), inputs, labels,
                                      donate=True)
            zo = []
            for q in qs:
                step, init = mlp_zo_step(q, chunk_size=1)
                zo.append(compiled_bytes(step, params, init(params), inputs, labels,
                                         donate=True))
            excess = [(z - forward) / param_bytes for z in zo]
            spread = max(zo) / min(zo) - 1
            good = max(excess) <= 4 and spread <= 0.10
            ok &= good
            if backprop > max(zo):
                crossover.append(f"{model}, batch {batch}")
            rows.append((model, f"{num / 1e6:.2f}M", batch, f"{forward / 2**20:.1f}",
                         f"+{(backprop - forward) / param_bytes:.2f}P",
                         " ".join(f"+{e:.2f}P" for e in excess), f"{100 * spread:.1f}%",
                         "backprop" if backprop > max(zo) else "ZO", verdict(good)))
    print("P = parameter bytes; columns give step memory minus forward memory, in P")
    table(("model", "params", "batch", "forward MiB", "grad step", "ZO q=1 q=8 q=64",
           "q spread", "larger", "<=4P, <=10%"), rows)
    print("backprop needs more than the chunk_size=1 ZO step (saved activations) at: "
          + ("; ".join(crossover) if crossover else "none of these"))
    print()
    return ok


# ---------------------------------------------------------------------------------------------
# 5. Tilted vs two-point step

TILT = 1.0


def section_tilted(quick):
    print("=" * 96)
    print("5. tilted step (ZEST, num_directions=2q) vs two_point step (q): same evaluations")
    print("=" * 96)
    features, labels, w = linear_problem(2_000 if quick else 10_000)
    dense = ready(features.dense())
    q = 8
    unchunked = {
        f"logistic dense X, D = {w.size}": lambda p: logistic_loss(p, dense, labels),
        "logistic affine map, line form": zojax.estimators.bind(logistic_loss, features, labels),
    }
    rows, ok = [], True
    for name, loss in unchunked.items():
        two_point, init = zo_step_fn(loss, q)
        tilted, tilted_init = step_fn(loss, zojax.tilted(SMOOTHING, TILT, 2 * q))
        times = interleaved({"baseline": (two_point, (w, init(w))),
                             "tilted": (tilted, (w, tilted_init(w)))},
                            rounds=5 if quick else 25)
        r = ratio(times, "tilted")
        ok &= r <= 1.1
        rows.append((name, "None", q, ms(times["baseline"]), ms(times["tilted"]), f"{r:.3f}",
                     verdict(r <= 1.1)))
    sizes = [784, 1024, 256, 10]
    params = mlp_init(jax.random.key(0), sizes)
    inputs = jax.random.normal(jax.random.key(1), (64, sizes[0]))
    targets = jax.random.randint(jax.random.key(2), (64,), 0, sizes[-1])
    candidates = {}
    for label, estimator in (("baseline", None),
                             ("tilted", zojax.tilted(SMOOTHING, TILT, 2 * q, chunk_size=1))):
        step, init = mlp_zo_step(q, chunk_size=1, estimator=estimator)
        candidates[label] = (jax.jit(step), (params, init(params), inputs, targets))
    times = interleaved(candidates, rounds=5 if quick else 25)
    r = ratio(times, "tilted")
    ok &= r <= 1.1
    num = sum(x.size for x in jax.tree.leaves(params))
    rows.append((f"MLP {num / 1e6:.2f}M params, batch 64", 1, q, ms(times["baseline"]),
                 ms(times["tilted"]), f"{r:.3f}", verdict(r <= 1.1)))
    table(("problem", "chunk_size", "q pairs", "two_point ms", "tilted ms", "ratio", "<= 1.1"),
          rows)
    print()
    return ok


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problems, few repeats")
    parser.add_argument("--sections", default="12345", help="the sections to run, e.g. 5")
    args = parser.parse_args()
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"zojax {zojax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{load:.1f}){', --quick' if args.quick else ''}\n")
    sections = {
        "1. ZO step overhead (dense X)": section_step_overhead,
        "2. affine loss <= 1/10 dense product": section_affine_vs_dense,
        "3. exact trace": section_trace,
        "4. memory": section_memory,
        "5. tilted step <= 1.1 two_point step": section_tilted,
    }
    results = {name: section(args.quick) for name, section in sections.items()
               if name[0] in args.sections}
    print("=" * 96)
    for name, good in results.items():
        print(f"{verdict(good)}  {name}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
