r"""Step cost and memory of the literature's estimators (``zojax.variants``) against
``zojax.two_point`` steps that make the same number of objective evaluations.

Run from the repository root::

    python -m benchmarks.variants           # full run (about two minutes on 2 CPU cores)
    python -m benchmarks.variants --quick   # sanity run: a small MLP, few rounds, no targets

Workload: a ReLU MLP (512 → 512 → 512 → 10, d = 530,442: three matrix leaves for LOZO) on a
random batch of 128 rows, softmax cross-entropy; each method chained with ``optax.sgd``, a
``lax.scan`` of 10 steps per call with params and state donated, the candidates interleaved
(:func:`benchmarks.harness.interleaved`; the ratio is the median of per-round ratios). Every
estimator evaluates its directions one at a time (``chunk_size=1``): MeZO's inference-level
memory, and the faster way on this CPU (a vmapped batch of perturbed MLPs is slower here than
the same forwards in sequence).

Pairs (method — the ``two_point`` step with as many evaluations):

- FZOO, N = 4 (5 evaluations) — forward differences, q = 4. Target ≤ 1.0 (Rademacher directions
  cost less to draw than Gaussian ones).
- Sparse-MeZO, q = 1, sparsity 0.75 (2) — central, q = 1. Target ≤ 1.2.
- HiZOO, q = 1 (3: f(x) and x ± λu) — forward, q = 2. Target ≤ 1.2.
- LOZO, q = 1, rank 2 (2) — central, q = 1. Target ≤ 1.2.
- ZO-SVRG, q = 1, a minibatch step (4: x ± λu and x̃ ± λu) — central, q = 2. Target ≤ 1.2.

Memory: the compiled bytes (argument + output + temp − alias, params and state donated,
:func:`benchmarks.harness.memory_bytes`) of one step of each, against its pair's plus the
state the method documents: HiZOO H (d float32) and the step's curvature sum that updates it
(a second gradient-sized accumulator, d float32), LOZO V (n × r per matrix leaf), ZO-SVRG the
snapshot and its estimate (2d), FZOO and Sparse-MeZO none. Target: method ≤ pair + documented
state + 1% of the pair (scalars and alignment).
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import optax

import zojax
from benchmarks.harness import check, interleaved, memory_bytes, ratio, say, spread, summary, table
from benchmarks.workloads import mlp_init, mlp_loss

SMOOTHING, LEARNING_RATE, STEPS_PER_CALL = 1e-3, 1e-3, 10
NO_SNAPSHOT = 10**9  # ZO-SVRG's period in the timed steps: every one a minibatch step


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def pairs(params):
    """``{name: (method, pair, target, documented state bytes)}``."""
    matrices = [p for p in jax.tree.leaves(params) if p.ndim == 2]
    d_bytes = _bytes(params)
    two_point = lambda q, scheme: zojax.two_point(  # noqa: E731
        SMOOTHING, q, scheme=scheme, chunk_size=1)
    return {
        "FZOO (N = 4)": (zojax.fzoo(SMOOTHING, 4, chunk_size=1), two_point(4, "forward"), 1.0,
                         0),
        "Sparse-MeZO (s = 0.75)": (
            zojax.sparse_two_point(SMOOTHING, sparsity=0.75, chunk_size=1),
            two_point(1, "central"), 1.2, 0),
        # H, and the step's curvature sum Σ c_i u_i² that updates it (a second accumulator).
        "HiZOO": (zojax.hizoo(SMOOTHING, hessian_smooth=1e-6, chunk_size=1),
                  two_point(2, "forward"), 1.2, 2 * d_bytes),
        "LOZO (r = 2)": (zojax.lozo(SMOOTHING, rank=2, refresh_every=50, chunk_size=1),
                         two_point(1, "central"), 1.2,
                         sum(p.shape[1] * 2 * p.dtype.itemsize for p in matrices)),
        "ZO-SVRG (minibatch step)": (
            zojax.zo_svrg(SMOOTHING, snapshot_every=NO_SNAPSHOT, chunk_size=1),
            two_point(2, "central"), 1.2, 2 * d_bytes),
    }


def steps_fn(estimator, num_steps: int):
    """A jitted, donating ``(params, state, batch) -> (params, state)`` of ``num_steps`` steps of
    ``chain(estimator, sgd)`` (ZO-SVRG's large batch: the same batch), and the optax transform."""
    opt = optax.chain(estimator, optax.sgd(LEARNING_RATE))

    def run(params, state, batch):
        def step(carry, _):
            params, state = carry
            loss = lambda p: mlp_loss(p, *batch)  # noqa: E731
            updates, state = opt.update(None, state, params, value_fn=loss,
                                        full_value_fn=loss)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), None, length=num_steps)[0]

    return jax.jit(run, donate_argnums=(0, 1)), opt


class Stepper:
    """Calls a compiled donating ``fn(params, state, batch)`` on the carry it holds."""

    def __init__(self, estimator, params, batch, num_steps):
        fn, opt = steps_fn(estimator, num_steps)
        one, _ = steps_fn(estimator, 1)  # the first step: ZO-SVRG's snapshot, LOZO's V drawn
        copy = jax.tree.map(jnp.copy, params)
        self.carry = one(copy, opt.init(copy), batch)
        self.batch = batch
        self.fn = fn.lower(*self.carry, batch).compile()

    def __call__(self):
        self.carry = self.fn(*self.carry, self.batch)
        return self.carry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP, few rounds")
    args = parser.parse_args()
    started = time.perf_counter()
    say(f"zojax {zojax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}){', --quick' if args.quick else ''}\n")
    width, rows, rounds = (64, 32, 3) if args.quick else (512, 128, 15)
    params = mlp_init(jax.random.key(0), (width, width, width, 10))
    batch = (jax.random.normal(jax.random.key(1), (rows, width)),
             jax.random.randint(jax.random.key(2), (rows,), 0, 10))
    say(f"MLP {width} → {width} → {width} → 10 (d = {zojax.directions.num_params(params):,}), "
        f"batch {rows}, {STEPS_PER_CALL} steps per call, {rounds} rounds")
    lines, memory = [], []
    for name, (method, pair, target, state_bytes) in pairs(params).items():
        times = interleaved({"method": (Stepper(method, params, batch, STEPS_PER_CALL), ()),
                             "pair": (Stepper(pair, params, batch, STEPS_PER_CALL), ())},
                            rounds)
        lines.append((name, times, target))
        sizes = []
        for estimator in (method, pair):
            fn, opt = steps_fn(estimator, 1)
            sizes.append(memory_bytes(fn.lower(params, opt.init(params), batch).compile()))
        memory.append((name, *sizes, state_bytes))
    table(("method", "ms / step", "pair ms / step", "ratio", "spread"),
          [(name, f"{1e3 * float(jnp.median(t['method'])) / STEPS_PER_CALL:.2f}",
            f"{1e3 * float(jnp.median(t['pair'])) / STEPS_PER_CALL:.2f}",
            f"{ratio(t, 'method', 'pair'):.3f}", spread(t["method"] / t["pair"]))
           for name, t, _ in lines])
    table(("method", "step MB", "pair MB", "extra MB", "documented state MB"),
          [(name, f"{m / 1e6:.2f}", f"{p / 1e6:.2f}", f"{(m - p) / 1e6:.2f}", f"{s / 1e6:.2f}")
           for name, m, p, s in memory])
    for name, times, target in lines:
        check(f"{name}: step / two_point step (same evaluations)",
              ratio(times, "method", "pair"), None if args.quick else target)
    for name, method_bytes, pair_bytes, state_bytes in memory:
        check(f"{name}: memory / (two_point's + documented state)",
              method_bytes / (pair_bytes + state_bytes), None if args.quick else 1.01)
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
