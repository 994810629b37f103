"""The operator benchmark (`scripts/benchmark_operators.py`): checked before timed, complete records, clear errors.
Timings are never asserted; on the CPU the Triton kernels run in Triton's interpreter (conftest.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddl_transformers import cpu_kernels, delta_ops
from ddl_transformers.benchmark import using_implementation
from ddl_transformers.operator_benchmark import (
    OperatorBenchmarkArguments,
    _cases,
    _device_inputs,
    run_operator_benchmark,
    write_operator_report,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"batch_size": 2, "seq_len": 5, "hidden_size": 12, "value_channels": 3, "kernel_size": 2, "repeats": 1}


def test_every_operator_is_checked_and_timed_in_every_implementation(tmp_path):
    args = OperatorBenchmarkArguments(
        **TINY, implementations=["native", "fused", "reference", "triton"], output=str(tmp_path / "o.json")
    )
    report = run_operator_benchmark(args)
    rows = {(r["operator"], r["implementation"], r["pass"]) for r in report["results"]}
    operators = {"rewrite, scalar state", "rewrite, expanded state", "token convolution"}
    expected_triton = delta_ops._triton_module() is not None  # the interpreter runs the kernels on the CPU here
    implementations = {"native", "fused", "reference"} | ({"triton"} if expected_triton else set())
    assert rows == {(o, i, p) for o in operators for i in implementations for p in ("forward", "forward_backward")}
    tokens, hidden, channels = 2 * 5, 12, 3
    for record in report["results"]:
        assert record["ms"] > 0 and record["relative_error"] < 1e-5
        assert record["gb_per_s"] == pytest.approx(record["floor_bytes"] / record["ms"] / 1e6)
    floors = {(r["operator"], r["pass"]): r["floor_bytes"] for r in report["results"]}
    state, out = tokens * hidden * channels * 4, tokens * hidden * 4  # float32 bytes
    assert floors[("token convolution", "forward")] == state + out
    assert floors[("rewrite, expanded state", "forward_backward")] == 5 * state + 3 * out
    assert floors[("rewrite, scalar state", "forward")] == 3 * out  # X and h in, X' out, each (B, T, d)
    table = write_operator_report(report, args)
    assert table.count("\n| ") == len(report["results"])  # one row per record under the header
    assert json.loads((tmp_path / "o.json").read_text())["results"] == report["results"]


def test_inputs_are_laid_out_as_in_the_model_and_floors_scale_with_the_dtype():
    args = OperatorBenchmarkArguments(**TINY, dtype="bfloat16")
    scalar, expanded, convolution = _cases(args)
    state, direction, target, gate = _device_inputs(expanded, args, requires_grad=False)
    assert state.shape == (2, 5, 12, 3) and state.transpose(-1, -2).is_contiguous(), "channel-major expanded state"
    assert (state.dtype, direction.dtype, target.dtype, gate.dtype) == (torch.bfloat16,) * 2 + (torch.float32,) * 2
    states, conv_weight, read = _device_inputs(convolution, args, requires_grad=False)
    assert states.transpose(-1, -2).is_contiguous() and (conv_weight.dtype, read.dtype) == (torch.float32,) * 2
    tokens, hidden, channels = 2 * 5, 12, 3
    state, out = tokens * hidden * channels * 2, tokens * hidden * 2  # bfloat16 bytes
    assert convolution.floor_bytes(2) == {"forward": state + out, "forward_backward": 3 * state + 2 * out}
    assert scalar.floor_bytes(2) == {"forward": 3 * out, "forward_backward": 8 * out}


class _ScaledGradient(torch.autograd.Function):
    """The identity, with a gradient 1% too large: a backward-only error."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def test_operators_are_timed_with_warm_caches(monkeypatch):
    # a garbage collection before each sub-millisecond call leaves the caches cold (three times slower on the CPU)
    from ddl_transformers import benchmark

    collections = []
    monkeypatch.setattr(benchmark.gc, "collect", lambda: collections.append(1))
    run_operator_benchmark(OperatorBenchmarkArguments(**TINY, implementations=["fused"]))
    assert collections == []


@pytest.mark.parametrize(
    "wrong, part",
    [
        (lambda out: out * 1.01, "output without autograd"),
        (lambda out: out * float("nan"), "output without autograd"),
        (_ScaledGradient.apply, "gradient of input 0"),
    ],
)
def test_a_wrong_operator_is_not_timed(wrong, part, monkeypatch):
    def wrong_token_mix(states, conv_weight, read, history=None):
        return wrong(delta_ops.fused_token_mix(states, conv_weight, read, history))

    monkeypatch.setattr(delta_ops, "token_mix_function", lambda: wrong_token_mix)
    message = rf"token convolution \(fused, float32, cpu\): its {part} differs from the float64 reference by"
    with pytest.raises(RuntimeError, match=message):
        run_operator_benchmark(OperatorBenchmarkArguments(**TINY, implementations=["fused"]))
    assert delta_ops.get_implementation() == delta_ops.DEFAULT_IMPLEMENTATION


def test_using_implementation_restores_the_previous_one_after_an_error():
    with pytest.raises(KeyError), using_implementation("reference"):
        assert delta_ops.get_implementation() == "reference"
        raise KeyError("inside")
    assert delta_ops.get_implementation() == delta_ops.DEFAULT_IMPLEMENTATION


@pytest.mark.skipif(delta_ops._triton_module() is None, reason="needs Triton (its interpreter on the CPU)")
def test_triton_rows_run_the_kernels_or_say_they_do_not(monkeypatch):
    module, calls = delta_ops._triton_module(), []
    for name in ("rewrite_forward", "rewrite_backward", "token_conv_forward", "token_conv_backward"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    args = OperatorBenchmarkArguments(**TINY, implementations=["triton"])
    report = run_operator_benchmark(args)
    assert len(report["results"]) == 6 and report["skipped"] == []
    assert {"rewrite_forward", "rewrite_backward", "token_conv_forward", "token_conv_backward"} == set(calls)
    monkeypatch.setattr(module, "fits", lambda hidden, value_channels: False)  # a state too large for one program
    report = run_operator_benchmark(args)
    assert {r["operator"] for r in report["results"]} == {"token convolution"}
    assert report["skipped"] == [
        f"triton, rewrite, {kind} state: the kernels do not take this size (it runs the fused code)"
        for kind in ("scalar", "expanded")
    ]


def test_triton_is_skipped_where_its_kernels_do_not_run(monkeypatch):
    monkeypatch.setattr(delta_ops, "_triton_module", lambda: None)
    report = run_operator_benchmark(OperatorBenchmarkArguments(**TINY, implementations=["triton"]))
    assert report["results"] == [] and report["skipped"] == [
        "triton: its kernels do not run here (cpu, or Triton is missing)"
    ]


def test_native_rows_run_the_c_kernels_on_float32_cpu_tensors_only(monkeypatch):
    calls = []
    original = cpu_kernels.rewrite
    monkeypatch.setattr(cpu_kernels, "rewrite", lambda *a, **k: calls.append(1) or original(*a, **k))
    report = run_operator_benchmark(
        OperatorBenchmarkArguments(**{**TINY, "device": "cpu:0"}, implementations=["native"])
    )
    assert len(report["results"]) == 6 and report["skipped"] == [] and calls  # the rewrites' forward rows
    report = run_operator_benchmark(OperatorBenchmarkArguments(**TINY, implementations=["native"], dtype="bfloat16"))
    assert report["results"] == [] and report["skipped"] == [
        "native: its C kernels take float32 CPU tensors only (it runs the fused code here)"
    ]


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match=r"invalid implementations=\['cuda'\]"):
        OperatorBenchmarkArguments(implementations=["cuda"])
    with pytest.raises(ValueError, match="dtype='float64'"):
        OperatorBenchmarkArguments(dtype="float64")
    with pytest.raises(ValueError, match="at least 1"):
        OperatorBenchmarkArguments(seq_len=0)


def test_the_script_prints_the_table(tmp_path):
    argv = [f"--{key}={value}" for key, value in TINY.items()] + ["--implementations", "fused", "--dtype", "bfloat16"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmark_operators.py"), *argv, "--output", str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "| token convolution | fused | forward + backward |" in result.stdout
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["settings"]["dtype"] == "bfloat16" and len(report["results"]) == 6
    assert all(0 < r["relative_error"] < 2e-2 for r in report["results"])  # bfloat16: rounded, but close
