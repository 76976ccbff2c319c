r"""Does ZO-NP beat ZO-I at equal query budgets on digits? (issue 14's target)

Run from the repository root::

    python -m benchmarks.natural_perturbations [--workdir DIR]   # about 20 min on 2 CPU cores
    python -m benchmarks.natural_perturbations --quick           # the smoke config, no target

Runs ``experiments.natural_perturbations`` with its default config (digits, the CNN and the
MLP, ZO-I, ZO-co and ZO-NP at every Q, 3 seeds, ``query_budget`` queries per member, Jacobian
probes counted; its results.json is the README's table), then a diagnostic: ZO-NP with
``jacobian="autodiff"`` (the
Fisher from ``jax.jvp``, one query a refresh), which spends the budget on losses as ZO-I does
and so separates what the Fisher buys from what its zeroth-order Jacobians cost. Runs are
resumable (``--workdir``, default ``/tmp/zojax/benchmarks/natural_perturbations``).

Target, per (model, Q >= 10): ZO-NP − ZO-I in final test accuracy, averaged over seeds (paired
by seed), exceeds its standard error: the line ``(ZO-I − ZO-NP) / SE`` must be <= −1.
"""

import argparse
import math
import pathlib
import time

import numpy as np

from benchmarks.harness import check, say, summary
from configs import natural_perturbations as np_config
from experiments import natural_perturbations as experiment

QS = (10, 20, 50, 100)


def run(config, workdir: pathlib.Path) -> dict:
    return experiment.train_and_evaluate(config, workdir)


def accuracies(results: dict) -> dict:
    """``{(model, Q, method): {seed: final test accuracy}}``."""
    out: dict = {}
    for r in results["runs"]:
        h = r["hparams"]
        value = r["metrics"]["test_accuracy"][-1]
        out.setdefault((h["model"], h["num_directions"], r["method"]), {})[h["seed"]] = (
            np.nan if value is None else value)
    return out


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error of ``a[s] − b[s]`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    d = np.asarray([a[s] - b[s] for s in seeds], float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke config, no target")
    parser.add_argument("--workdir", default="/tmp/zojax/benchmarks/natural_perturbations")
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = pathlib.Path(args.workdir)
    config = np_config.get_config("smoke" if args.quick else None)
    main_results = run(config, workdir / "zeroth_order")
    config.methods = ("zo_np",)
    config.zo_np.jacobian = "autodiff"
    autodiff_results = run(config, workdir / "autodiff")
    acc = accuracies(main_results)
    autodiff = accuracies(autodiff_results)

    say(f"\nfinal test accuracy, digits, {config.query_budget:,} queries per member, "
        f"{len(config.seeds)} seeds (mean ± SE; differences paired by seed)")
    header = ("model", "Q", "ZO-I", "ZO-NP", "ZO-NP − ZO-I", "ZO-NP autodiff − ZO-I",
              "ZO-NP steps / ZO-I steps")
    rows = []
    steps = {(r["hparams"]["model"], r["hparams"]["num_directions"], r["method"]):
             r["steps"][-1] for r in main_results["runs"]}
    for model in config.models:
        for q in [q for q in config.num_perturbations if args.quick or q in QS]:
            zo_i, zo_np = acc[(model, q, "zo_i")], acc[(model, q, "zo_np")]
            diff, se = paired(zo_np, zo_i)
            diff_auto, se_auto = paired(autodiff[(model, q, "zo_np")], zo_i)
            rows.append((model, q, f"{np.mean(list(zo_i.values())):.4f}",
                         f"{np.mean(list(zo_np.values())):.4f}", f"{diff:+.4f} ± {se:.4f}",
                         f"{diff_auto:+.4f} ± {se_auto:.4f}",
                         f"{steps[(model, q, 'zo_np')] / steps[(model, q, 'zo_i')]:.2f}"))
            check(f"{model}, Q={q}: (ZO-I − ZO-NP) / SE", -diff / se if se > 0 else math.nan,
                  None if args.quick else -1.0, unit="")
    say(f"\n{experiment.table(main_results)}\n")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        say("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    return summary(started)


if __name__ == "__main__":
    raise SystemExit(main())
