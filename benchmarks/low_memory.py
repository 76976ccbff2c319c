r"""The low-memory mode (:mod:`zojax.low_memory`) on all-MiniLM-L6-v2 and SmolLM2-135M: compiled
memory above the forward pass and step time, against the default mode.

Run from the repository root::

    python -m benchmarks.low_memory                  # both models (~20 min on 2 cores)
    python -m benchmarks.low_memory --model minilm   # one of them
    python -m benchmarks.low_memory --quick          # the random 2-layer stand-ins, no targets

Workloads: :func:`benchmarks.minilm.workload` (encoder + linear head on the pooled embedding)
and :func:`benchmarks.llama.workload` (the label words' logits, two rows of the tied head), a
batch of 16 × 64 tokens, float32, every parameter trained. Steps: ``zojax.zo_sgd(1e-4, 1e-3,
q)`` (central, Gaussian) jitted with the params and the optimizer state donated, in three
modes: the default mode (``chunk_size=1``), ``low_memory=True`` with the plain loss as
``value_fn`` (the whole perturbed copy), and ``low_memory=True`` with ``zojax.layerwise(loss)``
(each layer's parameters perturbed as the layer runs, the embedding rows of the batch only).

1. Memory: argument + output + temp − alias of each compiled program
   (:func:`benchmarks.minilm.program_bytes`), minus the forward pass's, in parameter sizes P,
   for q = 1 and 16. Targets: low-memory, any value_fn <= 1.05 P; per layer <= 0.25 P; each
   mode flat in q (max / min − 1 of its totals <= 0.10). Also ``zo_adam`` per layer, against
   forward + Adam's two moments (2 P).
2. Time (q = 1): each mode's step against the default mode's step and the forward pass,
   interleaved (median of per-round ratios). The low-memory mode draws each direction three
   times (x + λu, x − λu, the update) where the default mode draws it once.
"""

import argparse
import time

import jax
import numpy as np
import optax

import zojax
from benchmarks import llama as llama_benchmark
from benchmarks import minilm as minilm_benchmark
from benchmarks.harness import check, host_line, interleaved, ms, say, spread, summary, table
from benchmarks.minilm import Stepper, program_bytes
from experiments.models import llama, minilm
from zojax.objective import bind

QS = (1, 16)
MODES = ("default", "low-memory, value_fn", "low-memory, layerwise")


def optimizer(mode: str, q: int, adam: bool = False):
    options = dict(chunk_size=1) if mode == "default" else dict(low_memory=True)
    if adam:
        return zojax.zo_adam(1e-5, 1e-3, q, **options)
    return zojax.zo_sgd(1e-4, 1e-3, q, **options)


def train_step(opt, loss, mode: str):
    """``(params, state, batch) -> (params, state)`` (not jitted)."""
    objective = zojax.layerwise(loss) if mode.endswith("layerwise") else loss

    def step(params, state, batch):
        updates, state = opt.update(None, state, params, value_fn=bind(objective, batch))
        return optax.apply_updates(params, updates), state

    return step


def section_memory(name, params, batch, loss, quick: bool) -> None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    forward = program_bytes(loss, abstract, batch)
    rows, totals = [], {}
    for mode in MODES:
        for q in QS:
            opt = optimizer(mode, q)
            p = program_bytes(train_step(opt, loss, mode), abstract,
                              jax.eval_shape(opt.init, abstract), batch, donate=(0, 1))
            totals[mode, q] = p["total"]
            rows.append((mode, q, f"{p['temp'] / 2**20:.1f}", f"{p['total'] / 2**20:.1f}",
                         f"{(p['total'] - forward['total']) / size:+.3f}", f"{p['seconds']:.0f}"))
    opt = optimizer("low-memory, layerwise", 1, adam=True)
    adam = program_bytes(train_step(opt, loss, "low-memory, layerwise"), abstract,
                         jax.eval_shape(opt.init, abstract), batch, donate=(0, 1))
    rows.append(("zo_adam, low-memory, layerwise", 1, f"{adam['temp'] / 2**20:.1f}",
                 f"{adam['total'] / 2**20:.1f}",
                 f"{(adam['total'] - forward['total']) / size:+.3f}", f"{adam['seconds']:.0f}"))
    say(f"{name}: P = {size / 2**20:.1f} MiB; forward pass: total {forward['total'] / 2**20:.1f} "
        f"MiB (temp {forward['temp'] / 2**20:.1f} MiB)")
    table(("step", "q", "temp MiB", "total MiB", "− forward, P", "compile s"), rows)
    targets = {"low-memory, value_fn": 1.05, "low-memory, layerwise": 0.25}
    for mode in MODES:
        for q in QS:
            check(f"{name} memory: {mode}, q = {q}: (step − forward) / P",
                  (totals[mode, q] - forward["total"]) / size,
                  None if quick else targets.get(mode))
        check(f"{name} memory: {mode}: q = {QS} max / min − 1",
              max(totals[mode, q] for q in QS) / min(totals[mode, q] for q in QS) - 1,
              None if quick else 0.10, unit="")
    check(f"{name} memory: zo_adam, layerwise, q = 1: (step − forward − 2 P) / P",
          (adam["total"] - forward["total"]) / size - 2)
    say("")


def section_time(name, params, batch, loss, quick: bool) -> None:
    steppers = {}
    for mode in MODES:
        opt = optimizer(mode, 1)
        steppers[mode] = Stepper(train_step(opt, loss, mode), params, opt.init(params), batch)
    candidates = {"baseline": (jax.jit(loss), (params, batch)),
                  **{mode: (s, ()) for mode, s in steppers.items()}}
    rounds = 3 if quick else 7
    times = interleaved(candidates, rounds)
    rows = [("forward (loss)", ms(times["baseline"]), "1.000", "", "")]
    for mode in MODES:
        to_forward = times[mode] / times["baseline"]
        to_default = times[mode] / times["default"]
        rows.append((f"ZO step, {mode}", ms(times[mode]), f"{np.median(to_forward):.3f}",
                     spread(to_forward), f"{np.median(to_default):.3f}"))
    table(("program (q = 1)", "ms (median)", "/ forward", "spread", "/ default step"), rows)
    for mode in MODES[1:]:
        check(f"{name} time: {mode} step / default step",
              float(np.median(times[mode] / times["default"])))
    say("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the random 2-layer stand-ins, a tiny batch, few rounds, no targets")
    parser.add_argument("--model", choices=("minilm", "llama", "both"), default="both")
    args = parser.parse_args()
    started = time.perf_counter()
    say(host_line(args.quick))
    shape = (4, 16) if args.quick else (16, 64)
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
        section_memory(name, params, batch, loss, args.quick)
        section_time(name, params, batch, loss, args.quick)
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
