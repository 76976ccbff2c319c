"""Shared fixtures."""

import os
from pathlib import Path

import jax
import pytest

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# tests/multidevice needs 8 devices, which XLA_FLAGS must ask for before JAX starts: it runs in
# its own session (tests/test_multidevice.py); a session without them does not collect it.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore = ["multidevice"]
