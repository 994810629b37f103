"""The DDL operators timed alone, per implementation, against the bytes they must move.

Each operator is memory-bound, so its floor is the time to read every input once and write every output once
(`floor_bytes`); `gb_per_s` is that byte count over the measured time, to compare with the device's bandwidth. Every
implementation is first checked against the reference operators in float64 on the same (rounded) inputs: its output
and every input's gradient (`relative_error`, the largest; over `MAX_ERROR` stops the run). Then it is timed in two
passes: the forward without autograd (prefill) and forward plus backward (training). Shapes are the model's: the
rewrite of a scalar `(B, T, d)` and an expanded `(B, T, d, d_v)` state, and TC's token convolution of an expanded
state. Example: `python scripts/benchmark_operators.py --device cuda --dtype bfloat16 --output ops.json`.
"""

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import delta_ops
from .benchmark import _timed, environment, using_implementation
from .delta_ops import channel_major, delta_update, token_mix

PASSES = ("forward", "forward_backward")
MAX_ERROR = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}  # relative to float64 on the same rounded inputs


@dataclass
class OperatorBenchmarkArguments:
    device: str = field(default="cpu", metadata={"help": "Device, e.g. cpu or cuda."})
    dtype: str = field(
        default="float32", metadata={"help": "Storage dtype of the states: float32, bfloat16, float16."}
    )
    batch_size: int = field(default=4, metadata={"help": "Sequences per call."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence."})
    hidden_size: int = field(default=320, metadata={"help": "Features d (768 for the `small` size)."})
    value_channels: int = field(default=4, metadata={"help": "Value channels d_v of the expanded state."})
    kernel_size: int = field(default=4, metadata={"help": "Taps of the token convolution."})
    implementations: list[str] = field(
        default_factory=lambda: ["native", "fused", "triton"],
        metadata={"help": "Operator implementations to time; triton is skipped where its kernels cannot run."},
    )
    repeats: int = field(default=20, metadata={"help": "Timed calls per figure; the median is reported."})
    timer: str = field(default="wall", metadata={"help": "wall or process (as in scripts/benchmark.py)."})
    seed: int = field(default=0, metadata={"help": "Seed of the inputs."})
    output: str | None = field(default=None, metadata={"help": "Write the JSON report here."})

    def __post_init__(self) -> None:
        unknown = [name for name in self.implementations if name not in delta_ops.IMPLEMENTATIONS]
        if unknown or self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"OperatorBenchmarkArguments: invalid implementations={unknown} or dtype={self.dtype!r}; "
                f"implementations are {delta_ops.IMPLEMENTATIONS}, dtypes float32, bfloat16, float16."
            )
        if (
            min(self.batch_size, self.seq_len, self.hidden_size, self.value_channels, self.kernel_size, self.repeats)
            < 1
        ):
            raise ValueError("OperatorBenchmarkArguments: sizes and repeats must be at least 1.")


@dataclass
class _Case:
    """One operator: its float64 reference, the chosen implementation's function (`select`, called while that
    implementation is set), its inputs (float64, on the CPU), whether the Triton kernels take inputs of this shape
    (`triton_applies`, else the triton implementation falls back to the fused code) and the bytes a pass must move."""

    name: str
    reference: Callable[..., torch.Tensor]
    select: Callable[[], Callable[..., torch.Tensor]]
    inputs: list[torch.Tensor]
    float32_inputs: tuple[int, ...]  # always float32 in the model: the target, the gate; under autocast: conv weights
    triton_applies: Callable[[list[torch.Tensor]], bool]
    floor_bytes: Callable[[int], dict[str, int]]  # storage bytes per element -> bytes per pass


def _cases(args: OperatorBenchmarkArguments) -> list[_Case]:
    batch, seq_len, hidden = args.batch_size, args.seq_len, args.hidden_size
    value_channels, kernel_size = args.value_channels, args.kernel_size
    generator = torch.Generator().manual_seed(args.seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    tokens = batch * seq_len
    cases = []
    for label, channels in (("rewrite, scalar state", 1), ("rewrite, expanded state", value_channels)):
        state_shape = (batch, seq_len, hidden) if channels == 1 else (batch, seq_len, hidden, channels)
        gate = 2 * torch.rand(batch, seq_len, 1, generator=generator, dtype=torch.float64)
        inputs = [randn(*state_shape), randn(batch, seq_len, hidden), randn(batch, seq_len, channels), gate]

        def rewrite_bytes(size: int, state: int = tokens * hidden * channels) -> dict[str, int]:
            direction = tokens * hidden * size
            # forward: X and h in, X' out; backward: G, X and h in, dX and dh out
            return {"forward": 2 * state * size + direction, "forward_backward": 5 * state * size + 3 * direction}

        def rewrite_kernels(tensors: list[torch.Tensor]) -> bool:
            return delta_ops._triton_kernels(tensors[0], tensors[1]) is not None

        def rewrite() -> Callable[..., torch.Tensor]:
            return delta_ops.rewrite_function("delta")

        cases.append(_Case(label, delta_update, rewrite, inputs, (2, 3), rewrite_kernels, rewrite_bytes))
    inputs = [randn(batch, seq_len, hidden, value_channels), randn(hidden * value_channels, 1, kernel_size)]
    inputs.append(randn(value_channels))

    def convolution_bytes(size: int) -> dict[str, int]:
        state, out = tokens * hidden * value_channels * size, tokens * hidden * size
        # forward: the states in, the mixed features out; backward: their gradient and the states in, dX out
        return {"forward": state + out, "forward_backward": 3 * state + 2 * out}

    def convolution_kernels(tensors: list[torch.Tensor]) -> bool:
        return delta_ops._triton_for(tensors[0]) is not None

    cases.append(
        _Case(
            "token convolution",
            token_mix,
            delta_ops.token_mix_function,
            inputs,
            (1, 2),
            convolution_kernels,
            convolution_bytes,
        )
    )
    return cases


def _device_inputs(case: _Case, args: OperatorBenchmarkArguments, requires_grad: bool) -> list[torch.Tensor]:
    """The case's inputs on the device in the storage dtype (expanded states channel-major, as in the model)."""
    dtype = getattr(torch, args.dtype)
    tensors = []
    for index, tensor in enumerate(case.inputs):
        tensor = tensor.to(args.device, torch.float32 if index in case.float32_inputs else dtype)
        if index == 0 and tensor.dim() == 4:
            tensor = channel_major(tensor).transpose(-1, -2)  # (B, T, d, d_v) with channel-major memory
        tensors.append(tensor.detach().requires_grad_(requires_grad))
    return tensors


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double().cpu() - expected).norm() / expected.norm()).item()


def _reference(case: _Case, inputs: list[torch.Tensor], args: OperatorBenchmarkArguments) -> tuple[torch.Tensor, ...]:
    """The float64 reference on the very `inputs` the device gets (rounded to the storage dtype, so that only the
    operator's own error counts): the output gradient drawn, the output and every input's gradient."""
    wide = [t.detach().double().cpu().requires_grad_() for t in inputs]
    expected = case.reference(*wide)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    return grad_out, expected.detach(), *torch.autograd.grad(expected, wide, grad_out)


def _checked_error(
    case: _Case, inputs: list[torch.Tensor], reference: tuple[torch.Tensor, ...], args: OperatorBenchmarkArguments
) -> float:
    """The largest relative error, `||got - expected|| / ||expected||`, against the float64 reference: of the output
    without and with autograd, and of every input's gradient. One over `MAX_ERROR` (or not finite) stops the run: a
    wrong operator is not timed. `inputs`: `_device_inputs` with gradients; `reference`: `_reference` of them."""
    operator = case.select()
    grad_out, expected, *expected_grads = reference
    with torch.no_grad():
        errors = {"output without autograd": _relative_error(operator(*inputs), expected)}
    got = operator(*inputs)
    errors["output"] = _relative_error(got, expected)
    grads = torch.autograd.grad(got, inputs, grad_out.to(got.device, got.dtype))
    errors.update(
        {f"gradient of input {i}": _relative_error(g, e) for i, (g, e) in enumerate(zip(grads, expected_grads))}
    )
    worst = max(errors, key=lambda name: math.inf if math.isnan(errors[name]) else errors[name])
    if not errors[worst] <= MAX_ERROR[args.dtype]:
        raise RuntimeError(
            f"{case.name} ({delta_ops.get_implementation()}, {args.dtype}, {args.device}): its {worst} differs from "
            f"the float64 reference by {errors[worst]:.2e}, over {MAX_ERROR[args.dtype]:.0e}: fix the operator "
            "before timing it."
        )
    return errors[worst]


def _median_seconds(args: OperatorBenchmarkArguments, run: Callable[[], Any]) -> float:
    for _ in range(2):  # warm-up: kernel compilation, allocator
        run()
    return statistics.median(_timed(args, run, collect=False) for _ in range(args.repeats))


def _time_case(case: _Case, inputs: list[torch.Tensor], args: OperatorBenchmarkArguments) -> dict[str, float]:
    """Median seconds of each pass on `inputs` (`_device_inputs` with gradients)."""
    operator = case.select()
    grad = torch.randn_like(operator(*inputs).detach())

    def forward() -> None:
        with torch.no_grad():
            operator(*inputs)

    def forward_backward() -> None:
        torch.autograd.grad(operator(*inputs), inputs, grad)

    return {"forward": _median_seconds(args, forward), "forward_backward": _median_seconds(args, forward_backward)}


def _triton_runs_here(args: OperatorBenchmarkArguments) -> bool:
    """Whether the Triton kernels run on this device and dtype (elsewhere the triton implementation is the fused one)."""
    if delta_ops._triton_module() is None:
        return False
    with using_implementation("triton"):
        return delta_ops._triton_for(torch.empty(0, device=args.device, dtype=getattr(torch, args.dtype))) is not None


def run_operator_benchmark(args: OperatorBenchmarkArguments) -> dict[str, Any]:
    """Check, then time, every operator in every usable implementation; one record per operator, implementation
    and pass."""
    element_size = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    records, skipped, cases, references = [], [], _cases(args), {}
    inputs = {case.name: _device_inputs(case, args, requires_grad=True) for case in cases}  # shared by every pass
    for implementation in args.implementations:
        if implementation == "triton" and not _triton_runs_here(args):
            skipped.append(f"triton: its kernels do not run here ({args.device}, or Triton is missing)")
            continue
        if implementation == "native" and not (torch.device(args.device).type == "cpu" and args.dtype == "float32"):
            skipped.append("native: its C kernels take float32 CPU tensors only (it runs the fused code here)")
            continue
        with using_implementation(implementation):
            for case in cases:
                if implementation == "triton" and not case.triton_applies(inputs[case.name]):
                    skipped.append(f"triton, {case.name}: the kernels do not take this size (it runs the fused code)")
                    continue
                if case.name not in references:  # the same rounded inputs for every implementation
                    references[case.name] = _reference(case, inputs[case.name], args)
                error = _checked_error(case, inputs[case.name], references[case.name], args)
                seconds, floor = _time_case(case, inputs[case.name], args), case.floor_bytes(element_size)
                for name in PASSES:
                    records.append(
                        {
                            "operator": case.name,
                            "implementation": implementation,
                            "pass": name,
                            "ms": seconds[name] * 1e3,
                            "floor_bytes": floor[name],
                            "gb_per_s": floor[name] / seconds[name] / 1e9,
                            "relative_error": error,
                        }
                    )
    return {"settings": asdict(args), "environment": environment(), "results": records, "skipped": skipped}


def operator_table(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    lines = [
        "| operator | implementation | pass | ms | floor MB | GB/s at the floor | error vs float64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in report["results"]:
        lines.append(
            f"| {record['operator']} | {record['implementation']} | {record['pass'].replace('_', ' + ')} | "
            f"{record['ms']:.3f} | {record['floor_bytes'] / 1e6:.1f} | {record['gb_per_s']:.1f} | "
            f"{record['relative_error']:.1e} |"
        )
    lines += [f"\nSkipped: {reason}." for reason in report["skipped"]]
    return "\n".join(lines) + "\n"


def write_operator_report(report: dict[str, Any], args: OperatorBenchmarkArguments) -> str:
    """Write the JSON output asked for in `args`; return the markdown table."""
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return operator_table(report)


__all__ = ["OperatorBenchmarkArguments", "operator_table", "run_operator_benchmark", "write_operator_report"]
