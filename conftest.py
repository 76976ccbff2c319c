"""Settings for the whole test session (tests/ and the doctests under zojax/).

XLA's CPU compiler takes most of the suite's time: the tests compile hundreds of small programs
each (test_pipeline.py: 386 compilations, 45 of its 56 s). The tests therefore compile cheaply:

- JAX's ``jax_disable_most_optimizations``: LLVM's optimization passes are off (it contracts
  a·b + c into fused multiply-adds only when it optimizes);
- ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false``: XLA generates each fusion's code with its
  older elemental emitters, which compile in about half the time of the MLIR fusion emitters
  (a fresh clone's ``.ci/run`` on 2 cores, install included: 15.6 → 10.4 minutes).

XLA's HLO passes (fusion, buffer assignment) run as always, so the tests of compiled memory
measure what users get (the bytes are the same to the byte); the generated kernels are slower,
which the tests' small programs do not notice, and results can differ in their last bits
(fused multiply-adds, the order of a reduction), so a test holds to a derived tolerance, not to
one compiler's rounding. Benchmarks and experiments keep the defaults.
``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` runs the suite with XLA's defaults (both settings off; an
``xla_cpu_use_fusion_emitters`` already in ``XLA_FLAGS`` wins); subprocesses that tests start
inherit the setting.

Test files marked ``pytest.mark.slow`` (a minute or more: the experiments' smoke runs, the docs
build, the multi-device session, the largest batteries) are collected first, so that pytest-xdist,
which hands out whole files in collection order, starts them first and its workers finish
together rather than one waiting on a long file started last.
"""

import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
CHEAP = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true")
if CHEAP and "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        (os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_fusion_emitters=false")).strip()

import jax  # noqa: E402  (after the environment: JAX reads it when first imported)

jax.config.update("jax_disable_most_optimizations", CHEAP)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test file of a minute or more, scheduled first")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
