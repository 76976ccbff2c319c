"""The multi-device suite (tests/multidevice) in its own pytest session on 8 fake CPU devices.

XLA reads ``--xla_force_host_platform_device_count`` when JAX starts, so this session (one
device) runs that suite as a subprocess; its tests are not collected here (tests/conftest.py).
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # scheduled first (conftest.py)

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_multidevice_suite_passes_on_8_fake_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/multidevice"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "deselected" not in summary, report
