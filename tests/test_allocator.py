"""Retained freed CPU memory: training steps reuse the last step's pages instead of faulting fresh ones in."""

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ddl_transformers import allocator
from ddl_transformers.allocator import retain_freed_memory

REPO = Path(__file__).resolve().parent.parent
GLIBC = allocator._mallopt() is not None

# Six training steps of ddl-cc at the benchmark's CPU shape on one thread; the page faults of each step.
PROBE = """
import json, resource, sys, torch
from ddl_transformers.allocator import retain_freed_memory
from ddl_transformers.benchmark import BenchmarkArguments, _Runner
torch.set_num_threads(1)
applied = retain_freed_memory() if sys.argv[1] == "retain" else None  # None: glibc's default
runner = _Runner("ddl-cc", BenchmarkArguments(presets=["ddl-cc"], memory=False))
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
    for key in ("GLIBC_TUNABLES", "LD_PRELOAD"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    probes = {
        mode: subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, text=True, env=env)
        for mode in ("default", "retain")
    }
    results = {}
    for mode, probe in probes.items():
        stdout, _ = probe.communicate(timeout=600)
        assert probe.returncode == 0, f"the {mode} probe failed (its error is above)"
        results[mode] = json.loads(stdout.strip().splitlines()[-1])
    assert results["default"][0] is None and results["retain"][0] is True
    # from the third step on: glibc's default faults tens of MB in per step (about 165 MB at 2 threads), retained
    # usually a few pages (a step now and then still grows the heap, hence the median)
    default, retained = (statistics.median(results[mode][1][2:]) for mode in ("default", "retain"))
    assert default > 4 * 2**20 // 4096  # over 4 MB per step, in 4 KiB pages
    assert retained * 4 < default


class FakeMallopt:
    """Records `mallopt` calls; refuses an mmap threshold above `max_mmap_threshold`, as older glibc does."""

    def __init__(self, max_mmap_threshold: int):
        self.max_mmap_threshold, self.calls = max_mmap_threshold, []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return int(parameter != allocator._M_MMAP_THRESHOLD or value <= self.max_mmap_threshold)


@pytest.mark.parametrize("max_mmap_threshold", [2**31 - 1, 2**25])
def test_an_mmap_threshold_above_32_mib_that_glibc_refuses_falls_back_to_32_mib(monkeypatch, max_mmap_threshold):
    mallopt = FakeMallopt(max_mmap_threshold)
    monkeypatch.setattr(allocator, "_mallopt", lambda: mallopt)
    assert retain_freed_memory(2**30) is True
    mmap_thresholds = [value for parameter, value in mallopt.calls if parameter == allocator._M_MMAP_THRESHOLD]
    assert mmap_thresholds == ([2**30] if max_mmap_threshold > 2**30 else [2**30, 2**25])
    assert (allocator._M_TRIM_THRESHOLD, 2**30) in mallopt.calls


@pytest.mark.parametrize("limit", [0, -1, 2**31, 1e9, True])
def test_a_limit_that_is_not_a_c_int_of_bytes_is_refused(limit):
    with pytest.raises(ValueError, match="limit_bytes"):
        retain_freed_memory(limit)


def test_nothing_changes_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator._mallopt() is None
    assert retain_freed_memory() is False
