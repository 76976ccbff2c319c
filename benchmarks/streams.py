r"""The fast direction stream (``stream="fast"``, :mod:`zojax.directions`): ZO step time in
forward passes on all-MiniLM-L6-v2 and SmolLM2-135M, against ``jax.random``'s stream.

Run from the repository root::

    python -m benchmarks.streams                  # both models (SmolLM2's low-memory steps
                                                  # compile for minutes on 2 cores)
    python -m benchmarks.streams --model minilm   # one of them
    python -m benchmarks.streams --quick          # the random 2-layer stand-ins, no targets

Workloads: those of :mod:`benchmarks.low_memory` (a batch of 16 × 64 tokens, float32, every
parameter trained). Steps: ``zojax.zo_sgd(1e-4, 1e-3, 1)`` (central, q = 1) jitted with the
params and the optimizer state donated:

- the default mode (``chunk_size=1``) with Gaussian directions from each stream;
- ``low_memory=True`` with ``zojax.layerwise(loss)`` (each layer perturbed as it runs, the
  embedding rows of the batch only), Gaussian from ``jax.random``, Rademacher from the fast
  stream (packed: 64 signs per hash); with ``--value-fn`` also the plain loss as ``value_fn``.

Time: each step against the forward pass, interleaved (median of the per-round ratios, with
their spread). Targets (issue 38): the default mode with the fast stream <= 2.5 forwards, and the
low-memory mode with the packed Rademacher <= 2.5. Also timed: one direction the size of the
params drawn and stored (``jax.jit(sampler)``) from each stream, against the forward pass.
"""

import argparse
import time

import jax
import numpy as np

import zojax
from benchmarks import llama as llama_benchmark
from benchmarks import minilm as minilm_benchmark
from benchmarks.harness import check, host_line, interleaved, ms, say, spread, summary, table
from benchmarks.low_memory import train_step
from benchmarks.minilm import Stepper
from experiments.models import llama, minilm

TARGET = 2.5
# (name, mode of benchmarks.low_memory.train_step, direction, stream, target)
STEPS = (
    ("default, gaussian, jax", "default", "gaussian", "jax", None),
    ("default, gaussian, fast", "default", "gaussian", "fast", TARGET),
    ("default, rademacher, fast", "default", "rademacher", "fast", None),
    ("low-memory layerwise, gaussian, jax", "low-memory, layerwise", "gaussian", "jax", None),
    ("low-memory layerwise, rademacher, fast", "low-memory, layerwise", "rademacher", "fast",
     TARGET),
)
VALUE_FN_STEPS = (
    ("low-memory value_fn, gaussian, jax", "low-memory, value_fn", "gaussian", "jax", None),
    ("low-memory value_fn, rademacher, fast", "low-memory, value_fn", "rademacher", "fast",
     TARGET),
)
DRAWS = (("draw gaussian, jax", zojax.directions.gaussian),
         ("draw gaussian, fast", zojax.directions.fast_gaussian),
         ("draw rademacher, fast", zojax.directions.packed_rademacher))


def optimizer(mode: str, direction: str, stream: str):
    options = dict(chunk_size=1) if mode == "default" else dict(low_memory=True)
    return zojax.zo_sgd(1e-4, 1e-3, 1, direction=direction, stream=stream, **options)


def section_time(name, params, batch, loss, steps, rounds: int, quick: bool) -> None:
    candidates, compile_seconds = {"baseline": (jax.jit(loss), (params, batch))}, {}
    for label, mode, direction, stream, _ in steps:
        opt = optimizer(mode, direction, stream)
        stepper = Stepper(train_step(opt, loss, mode), params, opt.init(params), batch)
        candidates[label], compile_seconds[label] = (stepper, ()), stepper.compile_seconds
        say(f"compiled {label}: {stepper.compile_seconds:.0f} s")
    key = jax.random.key(0)
    for label, sampler in DRAWS:
        candidates[label] = (jax.jit(sampler), (key, params))
    times = interleaved(candidates, rounds)
    rows = [("forward (loss)", "", ms(times["baseline"]), "1.000", "")]
    for label in list(candidates)[1:]:
        to_forward = times[label] / times["baseline"]
        rows.append((label, f"{compile_seconds[label]:.0f}" if label in compile_seconds else "",
                     ms(times[label]), f"{np.median(to_forward):.3f}", spread(to_forward)))
    table(("program (q = 1)", "compile s", "ms (median)", "/ forward", "spread"), rows)
    say(f"{rounds} rounds, interleaved; the steps update their params in place")
    for label, _, _, _, target in steps:
        check(f"{name}: ZO step, {label} / forward",
              float(np.median(times[label] / times["baseline"])), None if quick else target)
    for label, _ in DRAWS[1:]:
        check(f"{name}: {label} / draw gaussian, jax",
              float(np.median(times[label] / times["draw gaussian, jax"])))
    say("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the random 2-layer stand-ins, a tiny batch, few rounds, no targets")
    parser.add_argument("--model", choices=("minilm", "llama", "both"), default="both")
    parser.add_argument("--value-fn", action="store_true",
                        help="also the low-memory steps with the plain loss as value_fn")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (9)")
    args = parser.parse_args()
    started = time.perf_counter()
    say(host_line(args.quick))
    shape = (4, 16) if args.quick else (16, 64)
    rounds = args.rounds or (3 if args.quick else 9)
    steps = STEPS + (VALUE_FN_STEPS if args.value_fn else ())
    models = {"minilm": (minilm, minilm_benchmark), "llama": (llama, llama_benchmark)}
    for name in ("minilm", "llama") if args.model == "both" else (args.model,):
        module, benchmark = models[name]
        if args.quick:
            loaded = module.default()
        else:
            try:
                loaded = module.pretrained()
            except (ModuleNotFoundError, FileNotFoundError) as error:
                say(f"SKIPPED {name}: the pretrained weights are not available ({error})")
                continue
        params, batch, loss = benchmark.workload(loaded, *shape)
        say("=" * 100)
        say(f"{name}: {loaded.name}, batch {shape[0]} × {shape[1]} tokens, float32")
        say("=" * 100)
        section_time(name, params, batch, loss, steps, rounds, args.quick)
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
