r"""Directions sharded over devices: the step time on 1, 2, 4 and 8 devices and the
communication volume of each compiled step.

Run from the repository root (it asks for 8 fake CPU devices itself when XLA_FLAGS is unset)::

    python -m benchmarks.sharding           # q = 64 on the Figure-2 logistic regression
    python -m benchmarks.sharding --quick   # fewer features and rounds

The step is ZO-SGD (``zojax.zo_sgd``, central differences, q = 64 Gaussian directions, a
``lax.scan`` of 10 steps per call) on the Figure-2 logistic regression over D = 10,001 random
features of a synthetic a7a-shaped dataset (16,100 rows × 123 inputs), its directions split with
``directions_sharding=NamedSharding(mesh, P("directions"))`` over meshes of the first 1, 2, 4
and 8 devices. The candidates run interleaved (:func:`benchmarks.harness.interleaved`); the
speed-up is the median of per-round ratios to the one-device step. On this 2-core machine the
8 devices are fake ones sharing the cores: the speed-up is bounded by 2, whatever the program.

The communication volume is read from the compiled program: the bytes of the operands of every
collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute) in its HLO,
:func:`collective_bytes`. Target: at most c·(q + D)·4 bytes with a small constant (c = 4), never
q × D: a step reduces one gradient-sized accumulator and gathers the q values.
"""

import argparse
import os
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")


def collective_bytes(hlo_text: str) -> int:
    """The bytes of every collective's operands in a compiled program's HLO text (``.as_text()``
    of ``jax.jit(f).lower(...).compile()``), in the loops as written (a collective inside a
    ``while`` body counts once per appearance, not per iteration: in a ``lax.scan`` of steps,
    the bytes of one step)."""
    shapes = {}  # instruction name -> bytes of its result
    total = 0
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)", line)
        if not match:
            continue
        name, result, op, rest = match.groups()
        shapes[name] = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                           for t, dims in _SHAPE.findall(result))
        if op.removesuffix("-start") in COLLECTIVES:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            total += sum(shapes.get(operand, 0) for operand in operands)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer features and rounds")
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    import zojax
    from benchmarks import harness
    from zojax.problems import linear

    q, steps = 64, 10
    features = 1_000 if args.quick else 10_000
    rounds = 3 if args.quick else 11
    data = zojax.datasets.synthetic_libsvm(0, like="a7a")
    train, _ = linear.random_features(jax.random.key(0), data.train_inputs, data.test_inputs,
                                      num_features=features)
    labels = jnp.asarray(data.train_labels)
    w0 = linear.init_params(jax.random.key(1), train.shape[1], 0.1)
    dim = w0.size
    value_fn = zojax.estimators.bind(linear.logistic_loss, train, labels)

    def program(sharding):
        opt = zojax.zo_sgd(0.01, 0.1, q, directions_sharding=sharding)

        def run(w, state):
            def step(carry, _):
                w, state = carry
                updates, state = opt.update(None, state, w, value_fn=value_fn)
                return (optax.apply_updates(w, updates), state), None

            return jax.lax.scan(step, (w, state), None, length=steps)[0]

        return jax.jit(run), opt.init(w0)

    candidates, volumes = {}, {}
    for n in (1, 2, 4, 8):
        if n > jax.device_count():
            continue
        mesh = jax.make_mesh((n,), ("directions",), devices=jax.devices()[:n])
        sharding = None if n == 1 else NamedSharding(mesh, PartitionSpec("directions"))
        fn, state = program(sharding)
        volumes[n] = collective_bytes(fn.lower(w0, state).compile().as_text())
        candidates[n] = (fn, (w0, state))
    times = harness.interleaved(candidates, rounds)
    bound = 4 * 4 * (q + dim)
    rows = []
    for n in candidates:
        ratios = times[1] / times[n]
        rows.append((n, harness.ms(times[n] / steps), f"{np.median(ratios):.2f}",
                     harness.spread(ratios), f"{volumes[n]:,}",
                     f"{volumes[n] / (4 * (q + dim)):.2f}",
                     harness.verdict(volumes[n] <= bound)))
    harness.say(f"ZO-SGD, q = {q}, D = {dim:,} (logistic regression, 16,100 rows), "
                f"{jax.device_count()} devices on {os.cpu_count()} cores, {rounds} rounds")
    harness.table(("devices", "step ms", "speed-up", "spread", "collective bytes",
                   "/ 4(q+D)", "≤ 4·4(q+D)"), rows)


if __name__ == "__main__":
    main()
