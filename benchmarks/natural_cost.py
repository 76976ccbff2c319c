r"""Benchmarks of natural perturbations (ZO-NP, ``zojax.natural``) against ZO-I on the same blocks
(``zojax.block_two_point``, Gaussian directions).

Run from the repository root::

    python -m benchmarks.natural_cost           # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.natural_cost --quick   # sanity run: small models, few rounds, no targets

Both estimators are chained with ``optax.sgd`` and share q (``num_directions``), the block size
N (``max_block_size``), the smoothing and block-coordinate sampling (one block per step). Every
timed program is jitted with its parameters and optimizer state donated, so the (M, N, N)
Fisher and factor arrays of ZO-NP are updated in place; compilation is excluded.

1. Step cost: a ZO-NP step *without* a Fisher refresh against a ZO-I step, on (i) an MLP
   (64 → 64 tanh → 10, d = 4,810) on scikit-learn's digits, a ``lax.scan`` of steps per call,
   at N = 128 and N = 512, and (ii) the 1.7M-parameter MLP-Mixer
   (:func:`experiments.models.mixer_1_7m`) on a random CIFAR-shaped batch of 8, one step per
   call, N = 512, with ``max_fisher_blocks=64`` (134 MB of F and L instead of 7 GB: a step's
   cost does not depend on M; section 3 covers the memory of every M). ZO-NP starts from the
   state one refreshing step left (count 1, one block's Fisher refreshed by the zeroth-order
   Jacobian) and runs with ``update_every`` so large that no timed step refreshes. The
   candidates run interleaved (:func:`benchmarks.harness.interleaved`); the ratio is the
   median of per-round ratios. Target: ZO-NP / ZO-I <= 1.2 on the Mixer and on the MLP at
   N = 128. The MLP at N = 512 is a diagnostic: a no-refresh step reads one N×N factor and
   does q matvecs with it, O(q N²), which a model of d = 4,810 (N² = 54 d) cannot hide. A
   diagnostic row times what a no-refresh step does to the ZO-NP state alone
   (``zojax.blocks.refresh(..., enabled=False)``, no objective): the refresh branch skipped.
2. Refresh cost: one step *with* a refresh of the sampled block (``update_every=1``,
   ``jacobian="zeroth_order"``: N_b + 1 calls of ``output_fn`` on the batch) against one
   without, alternating, and the queries of each (``num_queries`` differences). Reported only.
3. Memory: the compiled memory (argument + output + temp − alias, as
   :func:`benchmarks.harness.compiled_bytes`, optimizer state donated) of one step (the refresh
   branch included) of ZO-NP and of ZO-I on the 1.7M-parameter Mixer at N = 512, a batch of 100
   (the paper's batch and Fisher inputs), for ``max_fisher_blocks`` M in {16, 64, all 3334
   blocks}, from abstract shapes (``jax.eval_shape``: nothing is allocated). The stored blocks
   are F and L, 2·M·N²·4 bytes. Target: ZO-NP's bytes beyond ZO-I's <= 1.1 × the stored
   blocks. The ZO-NP / ZO-I ratio is printed next to the paper's 2.6x (40.87 GB vs 15.68 GB,
   measured in its own framework); a copy of an (M, N, N) array in the compiled program is counted.
"""

import argparse
import dataclasses
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax
from benchmarks.harness import (
    check,
    interleaved,
    memory_bytes,
    ms,
    ratio,
    say,
    spread,
    summary,
    table,
)
from experiments.models import MLP, MLPMixer, digits_data, mixer_1_7m
from zojax.directions import num_params

SMOOTHING, LEARNING_RATE = 1e-3, 0.01
NO_REFRESH = 2**30  # update_every of the timed ZO-NP steps: none of them refreshes
PAPER_RATIO = 40.87 / 15.68  # ZO-NP / ZO-I memory, MLP-Mixer of 1,706,762 params, N = 512


@dataclasses.dataclass
class Workload:
    name: str
    model: object  # a flax module: model.apply({"params": p}, x) -> logits (n, classes)
    params: object
    batch: tuple  # (inputs, integer labels)
    num_directions: int
    max_block_size: int
    max_fisher_blocks: int | None
    steps_per_call: int  # steps in the lax.scan of one timed call
    rounds: int
    refresh_rounds: int
    target: float | None = 1.2  # of ZO-NP / ZO-I per step (None: a diagnostic row)

    def logits(self, params, inputs):
        return self.model.apply({"params": params}, inputs)

    def loss(self, params, batch):
        logits = self.logits(params, batch[0])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    def natural(self, update_every):
        return zojax.natural(SMOOTHING, self.num_directions, max_block_size=self.max_block_size,
                             update_every=update_every, max_fisher_blocks=self.max_fisher_blocks)

    def identity(self):
        return zojax.block_two_point(SMOOTHING, self.num_directions,
                                     max_block_size=self.max_block_size)


def digits_workload(quick: bool, max_block_size: int) -> Workload:
    """The digits MLP at ``max_block_size``: 128 (N² = 3.4 d, the target), or 512 (N² = 54 d:
    the O(q N²) of the q matvecs L_b r and the read of L_b, inherent to the method, against a
    model whose forward pass costs O(d); a diagnostic)."""
    inputs, labels, _, _ = digits_data(0)
    model = MLP(64)
    params = model.init(jax.random.key(0), inputs[:1])["params"]
    return Workload(f"digits MLP, N = {max_block_size}", model, params,
                    (inputs[:256], labels[:256]), num_directions=8,
                    max_block_size=max_block_size, max_fisher_blocks=None,
                    steps_per_call=10 if quick else 100, rounds=3 if quick else 21,
                    refresh_rounds=3 if quick else 11,
                    target=1.2 if max_block_size <= 128 else None)


def small_mixer() -> MLPMixer:
    return MLPMixer(num_classes=10, patch_size=8, hidden_dim=32, tokens_mlp_dim=16,
                    channels_mlp_dim=64, depth=2)


def mixer_workload(quick: bool) -> Workload:
    model = small_mixer() if quick else mixer_1_7m()
    n = 4 if quick else 8
    inputs = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(2), (n,), 0, 10)
    params = model.init(jax.random.key(0), inputs[:1])["params"]
    return Workload("MLP-Mixer", model, params, (inputs, labels), num_directions=4,
                    max_block_size=64 if quick else 512, max_fisher_blocks=4 if quick else 64,
                    steps_per_call=1, rounds=3 if quick else 9, refresh_rounds=1 if quick else 2)


# ---------------------------------------------------------------------------------------------
# Jitted steps with a donated carry.


def steps_fn(workload: Workload, estimator, num_steps: int):
    """A jitted ``(params, state, batch) -> (params, state)`` of ``num_steps`` steps of
    ``chain(estimator, sgd)`` (a ``lax.scan``), params and state donated; and the optax
    transform."""
    opt = optax.chain(estimator, optax.sgd(LEARNING_RATE))

    def run(params, state, batch):
        def step(carry, _):
            params, state = carry
            updates, state = opt.update(
                None, state, params, value_fn=lambda p: workload.loss(p, batch),
                output_fn=lambda p: workload.logits(p, batch[0]))
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), None, length=num_steps)[0]

    return jax.jit(run, donate_argnums=(0, 1)), opt


def copied(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


class Stepper:
    """Calls a donating ``fn(*carry, batch) -> carry`` on the carry it holds (a copy of the one
    given), compiled ahead (for :func:`interleaved`)."""

    def __init__(self, fn, carry, batch):
        self.batch = batch
        self.carry = copied(carry)
        start = time.perf_counter()
        self.fn = fn.lower(*self.carry, batch).compile()
        self.compile_seconds = time.perf_counter() - start

    def __call__(self):
        self.carry = self.fn(*self.carry, self.batch)
        return self.carry

    @property
    def queries(self) -> int:
        """``num_queries`` of the optax state (the carry ``(params, state)``)."""
        return int(self.carry[1][0].num_queries)


def bookkeeping_fn(workload: Workload):
    """A donating ``(natural_state, params, batch) -> (natural_state, params)`` of
    ``zojax.blocks.refresh(..., enabled=False)``: what a no-refresh ZO-NP step does to its
    state (a diagnostic: the per-step cost of the Fisher storage, no objective evaluated)."""
    opts = zojax.blocks.NaturalOptions(workload.max_block_size, update_every=NO_REFRESH,
                                       max_fisher_blocks=workload.max_fisher_blocks)

    def run(state, params, batch):
        key = jax.random.fold_in(jax.random.key(0), state.count)
        never = state.count < 0  # False, but traced as a step's finiteness is: the refresh
        # branch stays in the program (a constant False would fold it away)
        state = zojax.blocks.refresh(opts, state, key, params,
                                     lambda p: workload.logits(p, batch[0]), never)[0]
        return state, params

    return jax.jit(run, donate_argnums=(0, 1))


def alternate(candidates: dict, rounds: int) -> dict[str, np.ndarray]:
    """:func:`interleaved` without its warm-up calls (for steps too slow to repeat): each
    candidate is compiled and was called once before."""
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# 1–2. Step and refresh cost.


def section_cost(workload: Workload, quick: bool) -> None:
    params, batch = workload.params, workload.batch
    lay = zojax.blocks.layout(params, workload.max_block_size)
    say("=" * 100)
    say(f"{workload.name}: d = {lay.dim:,} params, N = {lay.size}, B = {lay.num_blocks} blocks, "
        f"M = {workload.max_fisher_blocks or lay.num_blocks} slots, q = "
        f"{workload.num_directions}, batch {batch[0].shape[0]}")
    say("=" * 100)

    # The ZO-NP state: one refreshing step from init (count 0 refreshes), which is also the
    # refresh candidate's first (untimed) call.
    refresh_fn, refresh_opt = steps_fn(workload, workload.natural(update_every=1), 1)
    refresh = Stepper(refresh_fn, (params, refresh_opt.init(params)), batch)
    start = time.perf_counter()
    jax.block_until_ready(refresh())
    first_refresh = time.perf_counter() - start
    state = refresh.carry[1]
    natural_state = state[0].perturbation_state
    assert int(natural_state.count) == 1 and int(natural_state.num_refreshes) == 1
    say(f"first refresh: {first_refresh:.2f} s; refreshed block "
        f"{int(jnp.max(natural_state.block_of_slot))}, max |F - I| = "
        f"{float(jnp.max(jnp.abs(natural_state.fisher - jnp.eye(lay.size)))):.2e} (ema 0.01)")

    k = workload.steps_per_call
    natural_fn, _ = steps_fn(workload, workload.natural(update_every=NO_REFRESH), k)
    identity_fn, identity_opt = steps_fn(workload, workload.identity(), k)
    candidates = {"baseline": Stepper(identity_fn, (params, identity_opt.init(params)), batch),
                  "ZO-NP": Stepper(natural_fn, (params, state), batch),
                  "bookkeeping": Stepper(bookkeeping_fn(workload), (natural_state, params),
                                         batch)}
    before = {name: candidates[name].queries for name in ("baseline", "ZO-NP")}
    times = interleaved({name: (c, ()) for name, c in candidates.items()}, workload.rounds)
    refreshes = int(candidates["ZO-NP"].carry[1][0].perturbation_state.num_refreshes)
    assert refreshes == 1, f"a timed ZO-NP step refreshed ({refreshes} refreshes)"
    calls = workload.rounds + 2
    rows = []
    for name, label in (("baseline", "ZO-I (block_two_point)"),
                        ("ZO-NP", "ZO-NP, no refresh (natural)"),
                        ("bookkeeping", "diagnostic: blocks.refresh(enabled=False)")):
        steps = 1 if name == "bookkeeping" else k  # steps per call
        per_round = (times[name] / steps) / (times["baseline"] / k)
        queries = ((candidates[name].queries - before[name]) / (calls * k)
                   if name in before else 0)
        rows.append((label, f"{candidates[name].compile_seconds:.2f}", steps, ms(times[name]),
                     f"{1e3 * np.median(times[name]) / steps:.3f}", f"{queries:g}",
                     f"{np.median(per_round):.3f}", spread(per_round)))
    table(("", "compile s", "steps / call", "ms / call", "ms / step", "queries / step",
           "ratio / step", "spread (min–max)"), rows)
    check(f"{workload.name}: ZO-NP step (no refresh) / ZO-I step", ratio(times, "ZO-NP"),
          None if quick else workload.target)

    # Refresh cost: single steps, with and without, alternating.
    single_fn, _ = steps_fn(workload, workload.natural(update_every=NO_REFRESH), 1)
    single = Stepper(single_fn, (params, state), batch)
    jax.block_until_ready(single())
    jax.block_until_ready(single())
    refreshing = {"no refresh": single, "refresh": refresh}
    before = {name: c.queries for name, c in refreshing.items()}
    times = alternate(refreshing, workload.refresh_rounds)
    queries = {name: (c.queries - before[name]) / workload.refresh_rounds
               for name, c in refreshing.items()}
    rows = [(name, f"{refreshing[name].compile_seconds:.2f}", ms(times[name]),
             f"{queries[name]:g}", f"{ratio(times, name, 'no refresh'):.1f}")
            for name in refreshing]
    table(("ZO-NP, one step", "compile s", "ms (median)", "queries", "ratio"), rows)
    extra = queries["refresh"] - queries["no refresh"]
    say(f"a refresh: {extra:g} output queries (N_b + 1 = {lay.size + 1} calls of output_fn x "
        f"{batch[0].shape[0]} rows for a full block), {workload.refresh_rounds} round(s)\n")
    refresh_ratio = ratio(times, "refresh", "no refresh")
    check(f"{workload.name}: ZO-NP step with refresh / without (zeroth-order Jacobian)",
          refresh_ratio, None)
    check(f"{workload.name}: amortized over update_every = 100 steps, 1 + (that - 1) / 100",
          1 + (refresh_ratio - 1) / 100, None)


# ---------------------------------------------------------------------------------------------
# 3. Memory.


def hlo_copies(compiled_text: str, shape: str) -> int:
    """Copies (``copy``, ``copy-start``) producing an array of ``shape`` (``"f32[M,N,N]"``)."""
    pattern = re.compile(rf"= {re.escape(shape)}\{{[^}}]*\}} copy(-start)?\(")
    return len(pattern.findall(compiled_text))


def step_bytes(workload: Workload, estimator, params, batch, block_shape: str | None = None):
    """``(bytes, copies)``: argument + output + temp − alias bytes (as
    :func:`benchmarks.harness.compiled_bytes`) of one step, the optimizer state donated, and
    the copies of ``block_shape`` arrays in the compiled program (one compilation for both)."""
    opt = optax.chain(estimator, optax.sgd(LEARNING_RATE))

    def step(state, params, batch):
        updates, state = opt.update(
            None, state, params, value_fn=lambda p: workload.loss(p, batch),
            output_fn=lambda p: workload.logits(p, batch[0]))
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(opt.init, params)
    compiled = jax.jit(step, donate_argnums=0).lower(state, params, batch).compile()
    total = memory_bytes(compiled)
    copies = hlo_copies(compiled.as_text(), block_shape) if block_shape else 0
    return total, copies


def section_memory(quick: bool) -> None:
    model = small_mixer() if quick else mixer_1_7m()
    block, n, q = (64, 16, 4) if quick else (512, 100, 4)
    batch = (jax.ShapeDtypeStruct((n, 32, 32, 3), jnp.float32),
             jax.ShapeDtypeStruct((n,), jnp.int32))
    params = jax.eval_shape(model.init, jax.random.key(0), batch[0])["params"]
    lay = zojax.blocks.layout(params, block)
    matrix = 4 * lay.size ** 2  # bytes of one N×N float32 matrix
    say("=" * 100)
    say(f"Memory: MLP-Mixer, d = {num_params(params):,} params, N = {lay.size}, B = "
        f"{lay.num_blocks} blocks, q = {q}, batch {n}; compiled one step, state donated")
    say("=" * 100)
    workload = Workload("MLP-Mixer", model, params, batch, q, block, None, 1, 0, 0)
    identity, _ = step_bytes(workload, workload.identity(), params, batch)
    rows = []
    for slots in ((4, None) if quick else (16, 64, None)):
        workload.max_fisher_blocks = slots
        m = slots or lay.num_blocks
        start = time.perf_counter()
        natural, copies = step_bytes(workload, workload.natural(update_every=100), params,
                                     batch, f"f32[{m},2,{lay.size},{lay.size}]")
        seconds = time.perf_counter() - start
        stored = 2 * m * matrix
        extra = natural - identity
        paper = f"{PAPER_RATIO:.2f}" if slots is None and not quick else ""
        rows.append((f"{m}{' (all)' if slots is None else ''}", f"{stored / 1e6:,.1f}",
                     f"{identity / 1e6:,.1f}", f"{natural / 1e6:,.1f}", f"{extra / 1e6:,.1f}",
                     f"{(extra - stored) / matrix:.1f}", f"{extra / stored:.3f}",
                     f"{natural / identity:.2f}", paper, copies, f"{seconds:.1f}"))
        check(f"memory: ZO-NP extra over ZO-I / stored F, L (M = {m})", extra / stored,
              None if quick else 1.1)
        if slots is None:
            check(f"memory: ZO-NP / ZO-I (M = all {m}; paper {PAPER_RATIO:.2f}x)",
                  natural / identity, None)
    table(("M", "stored F+L MB", "ZO-I MB", "ZO-NP MB", "extra MB", "extra - stored, N×N",
           "extra/stored", "NP/I", "paper NP/I", "(M,N,N) copies", "compile s"), rows)
    say("extra: ZO-NP's bytes beyond ZO-I's; extra - stored: what is left of it after F and L, "
        "in N×N float32 matrices\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few rounds")
    args = parser.parse_args()
    started = time.perf_counter()
    say(f"zojax {zojax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}){', --quick' if args.quick else ''}\n")
    section_cost(digits_workload(args.quick, 128), args.quick)
    section_cost(digits_workload(args.quick, 512), args.quick)
    section_cost(mixer_workload(args.quick), args.quick)
    section_memory(args.quick)
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
