"""Benchmarks of the flatness toolkit (issue 11): stochastic Lanczos quadrature at D = 10,001.

Run from the repository root::

    python -m benchmarks.curvature           # full run (about a minute on 2 CPU cores)
    python -m benchmarks.curvature --quick   # sanity run: D = 2,001, few rounds, no targets

``zojax.hessian_spectrum`` with 30 Lanczos steps × 10 probes on the logistic loss with the
affine random-feature map (synthetic a5a, N = 6,414, D = 10,001; :mod:`benchmarks.workloads`),
against the bare dependency structure: a ``lax.scan`` of 30 steps over a ``vmap`` of 10 HVPs
(each step normalizes its 10 products and feeds them to the next). Both are jitted; compilation
is timed separately (``lower().compile()``), then the two run interleaved (two warm-up calls,
``block_until_ready``) and the ratio is the median over rounds of the per-round ratio
(:mod:`benchmarks.harness`). When matfree is installed, its Lanczos
(``matfree.decomp.tridiag_sym``, full reorthogonalization, vmapped over the same probes) is
timed alongside for reference, and so is ``hessian_spectrum(reorthogonalize=True)`` (a
diagnostic: what keeping the bases and reorthogonalizing against them would cost; below ``d``
steps the default is the three-term recurrence alone).
Targets: < 10 s and <= 1.2x the bare scan.
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import zojax
from benchmarks.harness import check, interleaved, ms, ratio, say, spread, summary, table
from benchmarks.workloads import linear_problem
from zojax.problems.linear import logistic_hessian_trace, logistic_loss

NUM_ITERS, NUM_SAMPLES = 30, 10


def bare_scan(features, labels):
    """``w, V -> V'``: 30 steps of ``V ← normalize(vmap(HVP)(V))``, the same dependency chain."""
    grad = jax.grad(logistic_loss)

    def run(w, vectors):
        hvp = jax.vmap(lambda v: jax.jvp(lambda p: grad(p, features, labels), (w,), (v,))[1])

        def step(v, _):
            hv = hvp(v)
            return hv / jnp.linalg.norm(hv, axis=-1, keepdims=True), None

        return jax.lax.scan(step, vectors, None, length=NUM_ITERS)[0]

    return jax.jit(run)


def spectrum(features, labels, reorthogonalize=None):
    return jax.jit(lambda w, key: zojax.hessian_spectrum(
        logistic_loss, key, w, features, labels, num_iters=NUM_ITERS, num_samples=NUM_SAMPLES,
        reorthogonalize=reorthogonalize))


def matfree_spectrum(features, labels):
    """The same quadrature from matfree's Lanczos, or None when matfree is not installed."""
    try:
        from matfree import decomp
    except ImportError:
        return None
    tridiag = decomp.tridiag_sym(NUM_ITERS, reortho="full", materialize=True, custom_vjp=False)
    grad = jax.grad(logistic_loss)

    def run(w, key):
        matvec = lambda v, p: jax.jvp(lambda q: grad(q, features, labels), (p,), (v,))[1]

        def one(k):
            start = jax.random.normal(k, w.shape, w.dtype)
            nodes, vectors = jnp.linalg.eigh(tridiag(matvec, start, w).J_small)
            return nodes, vectors[0] ** 2

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(NUM_SAMPLES))
        return jax.vmap(one)(keys)

    return jax.jit(run)


def compile_seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - start


def section_spectrum(quick: bool) -> None:
    num_features = 2_000 if quick else 10_000
    features, labels, w = linear_problem(num_features)
    dim = w.size
    say("=" * 96)
    say(f"hessian_spectrum: {NUM_ITERS} Lanczos steps x {NUM_SAMPLES} probes, logistic loss, "
        f"affine map, N = {labels.shape[0]}, D = {dim}")
    say("=" * 96)
    key = jax.random.key(0)
    starts = jax.random.normal(jax.random.key(1), (NUM_SAMPLES, dim), w.dtype)
    starts = starts / jnp.linalg.norm(starts, axis=-1, keepdims=True)
    candidates = {"baseline": (bare_scan(features, labels), (w, starts)),
                  "hessian_spectrum": (spectrum(features, labels), (w, key)),
                  "reorthogonalize=True (diagnostic)": (spectrum(features, labels, True),
                                                        (w, key))}
    reference = matfree_spectrum(features, labels)
    if reference is not None:
        candidates["matfree tridiag_sym (reference)"] = (reference, (w, key))
    compiles = {name: compile_seconds(fn, *args) for name, (fn, args) in candidates.items()}
    times = interleaved(candidates, rounds=5 if quick else 21)

    rows = []
    for name in candidates:
        per_round = np.asarray(times[name]) / np.asarray(times["baseline"])
        rows.append((name, f"{compiles[name]:.2f}", ms(times[name]), f"{ratio(times, name):.3f}",
                     spread(per_round)))
    table(("", "compile s", "run ms (median)", "ratio", "spread (min–max)"), rows)

    nodes, weights = candidates["hessian_spectrum"][0](w, key)
    moments = dim * jnp.sum(weights * nodes, axis=1)  # one tr H estimate per probe
    estimate = float(jnp.mean(moments))
    stderr = float(jnp.std(moments, ddof=1) / np.sqrt(NUM_SAMPLES))
    exact = float(logistic_hessian_trace(w, features, labels))
    say(f"tr H from the quadrature: {estimate:.4f} ± {stderr:.4f} (exact {exact:.4f}); "
        f"weights sum to 1 within {float(jnp.max(jnp.abs(weights.sum(1) - 1))):.1e}\n")

    seconds = float(np.median(times["hessian_spectrum"]))
    target = None if quick else 10.0
    check(f"hessian_spectrum seconds (D = {dim}, jitted, compile excluded)", seconds, target,
          unit="s")
    check(f"hessian_spectrum / bare scan of vmapped HVPs (D = {dim})",
          ratio(times, "hessian_spectrum"), None if quick else 1.2)
    check(f"hessian_spectrum compile seconds (D = {dim})", compiles["hessian_spectrum"], None,
          unit="s")
    check(f"hessian_spectrum(reorthogonalize=True) / bare scan (D = {dim})",
          ratio(times, "reorthogonalize=True (diagnostic)"), None)
    if reference is not None:
        check(f"matfree tridiag_sym / bare scan (D = {dim}, reference)",
              ratio(times, "matfree tridiag_sym (reference)"), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem, few rounds")
    args = parser.parse_args()
    started = time.perf_counter()
    say(f"zojax {zojax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}){', --quick' if args.quick else ''}\n")
    section_spectrum(args.quick)
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
