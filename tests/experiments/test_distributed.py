"""experiments/distributed.py: Figure 2's logistic-regression ZO run with its directions split
over 2 processes on localhost (jax.distributed, CPU collectives through gloo) equals the
one-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "experiments.distributed", "--config",
           "configs/distributed.py:smoke"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()  # one CPU device each
             if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_COMPILATION_CACHE_DIR": ""}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    port = _free_port()
    procs = [subprocess.Popen(COMMAND + ["--workdir", str(two),
                                         f"--coordinator_address=localhost:{port}",
                                         "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run(COMMAND + ["--workdir", str(one)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=600)
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return [json.loads((d / "results.json").read_text()) for d in (one, two)], outputs


def test_two_processes_equal_one_process(runs):
    (one, two), outputs = runs
    assert one["config"]["mesh_shape"] == {"directions": 1}
    assert two["config"]["mesh_shape"] == {"directions": 2}  # one device in each process
    (a,), (b,) = one["runs"], two["runs"]
    assert a["steps"] == b["steps"] and a["num_queries"] == b["num_queries"]
    assert a["num_queries"][-1] == 2 * 8 * a["steps"][-1]
    for name, values in a["metrics"].items():
        assert b["metrics"][name] == pytest.approx(values, rel=1e-5, abs=1e-6), name
    # both processes ran the whole run and printed the same summary
    assert all("synthetic/logistic/zo" in output for output in outputs)

