r"""Parameter-efficient ZO (:mod:`zojax.lora`, :mod:`experiments.models.prefix`) on
all-MiniLM-L6-v2 and SmolLM2-135M: compiled memory and time of a ZO step that trains LoRA
adapters or a prefix, against full-parameter ZO.

Run from the repository root::

    python -m benchmarks.peft                  # both models (SmolLM2's full steps compile for
                                               # many minutes on 2 cores)
    python -m benchmarks.peft --model minilm   # one of them
    python -m benchmarks.peft --quick          # the random 2-layer stand-ins, a tiny batch

Workloads: those of :mod:`benchmarks.low_memory` (:func:`benchmarks.minilm.workload`, encoder and
linear head; :func:`benchmarks.llama.workload`, the label words' logits), a batch of 16 × 64
tokens, float32. Steps (q = 1, central, Gaussian), jitted with the trained params and the
optimizer state donated, as MeZO runs them (the issue's η and λ; the values do not change the
cost):

- full, default: ``zo_sgd(1e-6, 1e-3, chunk_size=1)``, every parameter (the head included);
- full, low-memory: the same with ``low_memory=True`` (one perturbed copy of the parameters);
- LoRA: ``zo_sgd(1e-4, 1e-3)`` on rank-8 adapters (α = 16) of the attention's query and value
  kernels (``zojax.lora.objective``: the base params a frozen argument of the step, the adapted
  matrices merged at each evaluation);
- prefix: ``zo_sgd(1e-2, 1e-1)`` on 5-entry key/value prefixes of every layer
  (``with_prefix``, ``zojax.lora.freeze``), on the model with the prefix;
- LoRA and prefix with ``low_memory=True`` too: the trained part is small either way, but the
  default mode evaluates x + λu and x − λu as one batch of two (two forward passes' activations
  and merged matrices alive at once), the low-memory mode one after the other.

The head of MiniLM's workload stays frozen under LoRA and prefix (a cost benchmark: its 770
values would not change it).

1. Memory: argument + output + temp − alias of each compiled program
   (:func:`benchmarks.minilm.program_bytes`): the forward pass and each step, in MiB and, above
   the forward pass, in parameter sizes P. Reported, no target.
2. Time: each step against the full default step and the forward pass, interleaved (median of
   per-round ratios). Reported, no target.
"""

import argparse
import functools
import time

import jax
import numpy as np
import optax

import zojax
from benchmarks import llama as llama_benchmark
from benchmarks import minilm as minilm_benchmark
from benchmarks.harness import check, host_line, interleaved, ms, say, spread, summary, table
from benchmarks.minilm import Stepper, program_bytes
from experiments.models import llama, minilm, prefix
from zojax.directions import num_params
from zojax.objective import bind

RANK, ALPHA, PREFIX = 8, 16.0, 5
LORA_PATHS = r".*(query|value|q_proj|v_proj)/kernel"
MODES = ("full, default", "full, low-memory", "LoRA", "LoRA, low-memory", "prefix",
         "prefix, low-memory")


def full_step(opt, loss):
    """``(params, state, batch) -> (params, state)`` of every parameter (not jitted)."""
    def step(params, state, batch):
        updates, state = opt.update(None, state, params, value_fn=bind(loss, batch))
        return optax.apply_updates(params, updates), state

    return step


def tuned_step(opt, loss, objective):
    """``(trained, state, (batch, params)) -> (trained, state)``: ``objective(loss, params)``
    (``zojax.lora.objective`` or ``freeze``) on the trained part, ``params`` frozen."""
    def step(trained, state, data):
        batch, params = data
        value_fn = bind(objective(loss, params), batch)
        updates, state = opt.update(None, state, trained, value_fn=value_fn)
        return optax.apply_updates(trained, updates), state

    return step


def programs(module, benchmark, loaded, shape):
    """``{mode: (step, trained, batch argument, forward (fn, args))}`` of every mode."""
    params, batch, loss = benchmark.workload(loaded, *shape)
    adapters = zojax.lora.init(jax.random.key(0), params, LORA_PATHS, RANK)
    with_prefix = module.with_prefix(loaded, PREFIX)
    prefix_params, _, prefix_loss = benchmark.workload(with_prefix, *shape)
    trained_prefix = prefix.select(prefix_params)
    lora = functools.partial(zojax.lora.objective, alpha=ALPHA)
    return {
        "full, default": (full_step(zojax.zo_sgd(1e-6, 1e-3, chunk_size=1), loss), params,
                          batch, (loss, (params, batch))),
        "full, low-memory": (full_step(zojax.zo_sgd(1e-6, 1e-3, low_memory=True), loss), params,
                             batch, (loss, (params, batch))),
        **{f"LoRA{mode}": (tuned_step(zojax.zo_sgd(1e-4, 1e-3, low_memory=low), loss, lora),
                           adapters, (batch, params), (loss, (params, batch)))
           for mode, low in (("", False), (", low-memory", True))},
        **{f"prefix{mode}": (tuned_step(zojax.zo_sgd(1e-2, 1e-1, low_memory=low), prefix_loss,
                                        zojax.lora.freeze), trained_prefix,
                             (batch, prefix_params), (prefix_loss, (prefix_params, batch)))
           for mode, low in (("", False), (", low-memory", True))},
    }, params


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def section_memory(name, modes, params) -> None:
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    forwards, above, rows = {}, {}, []
    for mode, (step, trained, data, (loss, loss_args)) in modes.items():
        if id(loss) not in forwards:
            forwards[id(loss)] = program_bytes(loss, *abstract(loss_args))["total"]
        forward = forwards[id(loss)]
        opt_state = jax.eval_shape(zojax.zo_sgd(1.0, 1.0).init, abstract(trained))
        p = program_bytes(step, abstract(trained), opt_state, abstract(data), donate=(0, 1))
        above[mode] = (p["total"] - forward) / size
        rows.append((mode, f"{num_params(trained):,}", f"{forward / 2**20:.1f}",
                     f"{p['temp'] / 2**20:.1f}", f"{p['total'] / 2**20:.1f}",
                     f"{above[mode]:+.3f}", f"{p['seconds']:.0f}"))
    say(f"{name}: P = {size / 2**20:.1f} MiB ({num_params(params):,} values)")
    table(("step (q = 1)", "trained values", "forward MiB", "temp MiB", "total MiB",
           "− forward, P", "compile s"), rows)
    for mode, value in above.items():
        check(f"{name} memory: {mode}: (step − forward) / P", value)
    say("")


def section_time(name, modes, quick: bool) -> None:
    candidates = {}
    for mode, (step, trained, data, _) in modes.items():
        state = zojax.zo_sgd(1.0, 1.0).init(trained)
        candidates[mode] = (Stepper(step, trained, state, data), ())
    forward, args = modes["full, default"][3]
    candidates["baseline"] = (jax.jit(forward), args)
    times = interleaved(candidates, 3 if quick else 7)
    rows = [("forward (loss)", ms(times["baseline"]), "1.000", "", "")]
    for mode in MODES:
        to_forward = times[mode] / times["baseline"]
        to_full = times[mode] / times["full, default"]
        rows.append((f"ZO step, {mode}", ms(times[mode]), f"{np.median(to_forward):.3f}",
                     spread(to_forward), f"{np.median(to_full):.3f}"))
    table(("program (q = 1)", "ms (median)", "/ forward", "spread", "/ full default step"),
          rows)
    for mode in MODES:
        check(f"{name} time: {mode} step / forward",
              float(np.median(times[mode] / times["baseline"])))
    say("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the random 2-layer stand-ins, a tiny batch, few rounds")
    parser.add_argument("--model", choices=("minilm", "llama", "both"), default="both")
    args = parser.parse_args()
    started = time.perf_counter()
    say(host_line(args.quick))
    shape = (4, 16) if args.quick else (16, 64)
    ports = {"minilm": (minilm, minilm_benchmark), "llama": (llama, llama_benchmark)}
    for name in ("minilm", "llama") if args.model == "both" else (args.model,):
        module, benchmark = ports[name]
        if args.quick:
            loaded = module.default()
        else:
            try:
                loaded = module.pretrained()
            except (ModuleNotFoundError, FileNotFoundError) as error:
                say(f"SKIPPED {name}: the pretrained weights are not available ({error})")
                continue
        say("=" * 100)
        say(f"{name}: {loaded.name}, batch {shape[0]} × {shape[1]} tokens, float32; LoRA r = "
            f"{RANK}, α = {ALPHA:g} on {LORA_PATHS}; prefix {PREFIX} tokens")
        say("=" * 100)
        modes, params = programs(module, benchmark, loaded, shape)
        section_memory(name, modes, params)
        section_time(name, modes, args.quick)
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
