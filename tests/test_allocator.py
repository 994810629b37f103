"""Retained freed CPU memory: training steps reuse the last step's pages instead of faulting fresh ones in."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ddl_transformers.allocator import retain_freed_memory

REPO = Path(__file__).resolve().parent.parent
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Six training steps of ddl-cc at the benchmark's CPU shape; the page faults of each step.
PROBE = """
import json, resource, sys
from ddl_transformers.allocator import retain_freed_memory
from ddl_transformers.benchmark import BenchmarkArguments, _Runner
applied = retain_freed_memory() if sys.argv[1] == "retain" else None  # None: glibc's default
runner = _Runner("ddl-cc", BenchmarkArguments(presets=["ddl-cc"], memory=False, threads=1))
faults = []
with runner.operators():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        runner.train_step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([applied, faults]))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_training_steps_reuse_freed_memory_without_page_faults():
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    probes = {
        mode: subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, text=True, env=env)
        for mode in ("default", "retain")
    }
    results = {mode: json.loads(probe.communicate()[0].strip().splitlines()[-1]) for mode, probe in probes.items()}
    assert results["default"][0] is None and results["retain"][0] is True
    # after two steps: glibc's default faults tens of MB in per step (about 165 MB at 2 threads); retained, a few pages
    default, retained = (sum(results[mode][1][2:]) for mode in ("default", "retain"))
    assert default > 4 * 2**20 // 4096 * 4  # over 4 MB per step, in 4 KiB pages
    assert retained * 4 < default


@pytest.mark.parametrize("limit", [0, -1, 2**31])
def test_a_limit_outside_a_c_int_is_refused(limit):
    with pytest.raises(ValueError, match="limit_bytes"):
        retain_freed_memory(limit)


def test_nothing_changes_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert retain_freed_memory() is False
