"""Settings for the whole test session (tests/ and the doctests under zojax/).

XLA's CPU compiler takes most of the suite's time: the tests compile hundreds of small programs
each (test_pipeline.py: 386 compilations, 45 of its 56 s). The tests therefore compile with JAX's
``jax_disable_most_optimizations``: LLVM's optimization passes are off, XLA's HLO passes (fusion,
buffer assignment) run as always, so the tests of compiled memory measure what users get; the
generated kernels are slower, which the tests' small programs do not notice, and results can
differ in their last bits (LLVM contracts a·b + c into fused multiply-adds only when it
optimizes), so a test holds to a derived tolerance, not to one compiler's rounding.
Benchmarks and experiments keep the defaults. ``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` runs the
suite with them; subprocesses that tests start inherit the setting.

Test files marked ``pytest.mark.slow`` (a minute or more: the experiments' smoke runs, the docs
build, the multi-device session, the largest batteries) are collected first, so that pytest-xdist,
which hands out whole files in collection order, starts them first and its workers finish
together rather than one waiting on a long file started last.
"""

import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the environment: JAX reads it when first imported)

jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test file of a minute or more, scheduled first")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
