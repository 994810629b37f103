"""Throughput and memory of DDL presets against the additive baseline, measured in one process.

Every preset is built once, then the measurements run interleaved after warm-up rounds: within a round, each figure
(training step, prefill, decoding at each batch size) is taken for every preset back to back (A B C), so that the
presets compared see the same machine load. The medians over the rounds are reported with their ratios to `baseline`
from the same run, and the paired ratios (median and quartiles over rounds of the ratio within each round). Peak memory of a
training step is CUDA's `max_memory_allocated`, or on CPU the peak resident memory of a fresh subprocess per preset
(above its resident memory after imports). A preset named `NAME@reference` runs with the reference operators of
`delta_ops` in the same rounds, which gives a before/after comparison under the same machine load.
"""

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch._inductor import list_mode_options
from transformers import Cache, CompileConfig, DynamicCache, StaticCache

from . import cpu_kernels, delta_ops
from .allocator import retain_freed_memory_on
from .modeling_ddl import DDLForCausalLM
from .presets import PRESETS, SIZES, preset_config

# A CPU-sized shape where attention and the MLP dominate the cost of a step, as in real models.
BENCHMARK_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "vocab_size": 8192,
        "hidden_size": 320,
        "intermediate_size": 864,
        "num_hidden_layers": 4,
        "num_attention_heads": 5,
        "max_position_embeddings": 1024,
    },
}
METRICS = ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mb", "parameters")


@dataclass
class BenchmarkArguments:
    presets: list[str] = field(
        default_factory=lambda: ["baseline", "ddl-scalar", "ddl-cc", "ddl-tc"],
        metadata={
            "help": "Presets to compare; `baseline` is added first if missing (ratios are to it). `NAME@reference` "
            "runs a preset with the reference operators in the same interleaved rounds (a before/after comparison)."
        },
    )
    size: str = field(default="cpu", metadata={"help": f"Model size: {', '.join([*BENCHMARK_SIZES, *SIZES])}."})
    device: str = field(default="cpu", metadata={"help": "Device, e.g. cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    autocast: bool = field(
        default=False,
        metadata={
            "help": "Keep float32 weights and run every step under torch.autocast in --dtype (mixed precision, as "
            "Trainer's bf16/fp16 flags do); without it the whole model is cast to --dtype."
        },
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence of the training and prefill batches."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per training and prefill batch."})
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "Decode batch sizes."})
    prompt_len: int = field(default=32, metadata={"help": "Prompt tokens before the timed decode steps."})
    decode_tokens: int = field(default=32, metadata={"help": "Timed decode steps per repetition."})
    warmup: int = field(default=1, metadata={"help": "Untimed rounds over all presets before the timed ones."})
    repeats: int = field(default=5, metadata={"help": "Timed rounds; medians are reported."})
    compile: bool = field(default=False, metadata={"help": "Wrap every model in torch.compile."})
    decode_cache: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the decode steps: dynamic (DynamicCache, the default) or static (StaticCache sized to "
            "the prompt and the decode steps, the default with --compile: a compiled decode step needs fixed shapes)."
        },
    )
    decode_compile_mode: str = field(
        default=CompileConfig.mode,
        metadata={
            "help": "torch.compile mode of the static-cache decode steps with --compile; by default generate's "
            f"({CompileConfig.mode}: CUDA graphs on a GPU, the default mode on the CPU)."
        },
    )
    implementation: str = field(
        default=delta_ops.DEFAULT_IMPLEMENTATION,
        metadata={
            "help": "DDL operators: native (default: the fused ones, with C kernels for their paths without "
            "autograd on float32 CPU tensors), fused (PyTorch only), reference (the plain autograd code) or "
            "triton (the fused ones with the rewrite as Triton kernels on CUDA)."
        },
    )
    memory: bool = field(default=True, metadata={"help": "Measure the peak memory of a training step."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's choice)."})
    timer: str = field(
        default="wall",
        metadata={
            "help": "wall (elapsed time) or process (this process's CPU time: steadier on a shared machine, "
            "meaningful with --threads 1 only)."
        },
    )
    retain_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "On the CPU, keep freed memory in the process (`allocator.retain_freed_memory`, as "
            "scripts/train.py does), for every preset alike; false measures glibc's default malloc, which faults "
            "each step's fresh tensors in again. The peak memory probes are not affected."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and tokens."})
    output: str | None = field(default=None, metadata={"help": "Write the JSON report here."})
    markdown: str | None = field(default=None, metadata={"help": "Write the markdown table here."})

    def __post_init__(self) -> None:
        self.presets = [name for item in self.presets for name in item.split(",") if name]  # "a,b" or "a b"
        if self.decode_cache is None:
            self.decode_cache = "static" if self.compile else "dynamic"
        if self.decode_cache not in ("dynamic", "static"):
            raise ValueError(
                f"BenchmarkArguments: invalid decode_cache={self.decode_cache!r}; allowed values are dynamic, static."
            )
        modes = sorted(list_mode_options())  # "default" among them
        if self.decode_compile_mode not in modes:
            raise ValueError(
                f"BenchmarkArguments: invalid decode_compile_mode={self.decode_compile_mode!r}; allowed values are "
                f"{modes}."
            )
        if self.timer not in ("wall", "process"):
            raise ValueError(f"BenchmarkArguments: invalid timer={self.timer!r}; allowed values are wall, process.")
        if self.autocast and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(
                f"BenchmarkArguments: --autocast needs --dtype bfloat16 or float16, not dtype={self.dtype!r}."
            )
        if self.implementation not in delta_ops.IMPLEMENTATIONS:
            raise ValueError(
                f"BenchmarkArguments: invalid implementation={self.implementation!r}; "
                f"allowed values are {delta_ops.IMPLEMENTATIONS}."
            )
        unknown = [
            name
            for name in self.presets
            if split_variant(name, self.implementation)[0] not in PRESETS
            or split_variant(name, self.implementation)[1] not in delta_ops.IMPLEMENTATIONS
        ]
        if unknown or self.size not in {**BENCHMARK_SIZES, **SIZES}:
            raise ValueError(
                f"BenchmarkArguments: invalid presets={unknown} or size={self.size!r}; presets are {list(PRESETS)}, "
                f"sizes {[*BENCHMARK_SIZES, *SIZES]}."
            )


def benchmark_config(name: str, args: BenchmarkArguments):
    size, overrides = (args.size, {}) if args.size in SIZES else ("tiny", BENCHMARK_SIZES[args.size])
    overrides = {**overrides, "max_position_embeddings": max(1024, args.seq_len, args.prompt_len + args.decode_tokens)}
    return preset_config(name, size, attn_implementation="sdpa", **overrides)


def build_model(name: str, args: BenchmarkArguments) -> DDLForCausalLM:
    torch.manual_seed(args.seed)
    dtype = torch.float32 if args.autocast else getattr(torch, args.dtype)
    return DDLForCausalLM(benchmark_config(name, args)).to(device=args.device, dtype=dtype)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(args: BenchmarkArguments, fn: Callable[[], Any], collect: bool = True) -> float:
    """Seconds of `fn()`, with Python's garbage collector run before (unless `collect` is False) and paused during it
    (as `timeit` does), so that a collection triggered by one preset's objects is not charged to another. A collection
    leaves the caches cold, which a sub-millisecond operator would pay several times over: the operator benchmark
    passes `collect=False`."""
    clock = time.process_time if args.timer == "process" else time.perf_counter
    if collect:
        gc.collect()
    gc.disable()
    try:
        _synchronize(args.device)
        start = clock()
        fn()
        _synchronize(args.device)
        return clock() - start
    finally:
        gc.enable()


def split_variant(name: str, default_implementation: str = delta_ops.DEFAULT_IMPLEMENTATION) -> tuple[str, str]:
    """`"ddl-cc@reference"` -> `("ddl-cc", "reference")`; a plain preset name runs the default implementation."""
    preset, _, implementation = name.partition("@")
    return preset, implementation or default_implementation


class _Runner:
    """One preset's model, optimiser and inputs, and its timed steps, run with its operator implementation."""

    def __init__(self, name: str, args: BenchmarkArguments):
        self.name, self.args = name, args
        preset, self.implementation = split_variant(name, args.implementation)
        self.model = build_model(preset, args)
        self.parameters = self.model.num_parameters()
        # the Trainer's default optimiser (`optim="adamw_torch_fused"`): one fused call for every parameter
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.forward = torch.compile(self.model) if args.compile else self.model
        # with a static cache, decode steps compiled apart with fixed shapes (the prompt's prefill eager), as `generate`
        # does; a dynamic cache grows every step, so its steps need the model compiled with dynamic shapes
        self.decode_step = self.forward
        if args.compile and args.decode_cache == "static":
            self.decode_step = torch.compile(self.model, dynamic=False, mode=args.decode_compile_mode)
        generator = torch.Generator().manual_seed(args.seed)
        vocab = self.model.config.vocab_size
        self.tokens = torch.randint(vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
        self.prompts = {
            batch: torch.randint(vocab, (batch, args.prompt_len), generator=generator).to(args.device)
            for batch in args.decode_batch_sizes
        }

    def precision(self) -> AbstractContextManager:
        """Autocast in the chosen dtype with `--autocast`; else nothing (the weights are already in that dtype)."""
        if not self.args.autocast:
            return nullcontext()
        return torch.autocast(torch.device(self.args.device).type, dtype=getattr(torch, self.args.dtype))

    def train_step(self) -> None:
        self.model.train()
        with self.precision():
            loss = self.forward(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def prefill(self) -> None:
        self.model.eval()
        with self.precision():
            self.forward(input_ids=self.tokens, use_cache=True, logits_to_keep=1)

    def new_cache(self) -> Cache:
        """An empty cache of the kind `--decode_cache` names, for one prompt and its decode steps."""
        if self.args.decode_cache == "static":
            length = self.args.prompt_len + self.args.decode_tokens
            return StaticCache(config=self.model.config, max_cache_len=length)
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def decode(self, batch: int) -> float:
        """Seconds of `decode_tokens` greedy steps with the cache, after the prompt's prefill. Positions are passed,
        as `generate` does, so that no step reads the cache's length."""
        self.model.eval()
        cache, prompt_len = self.new_cache(), self.args.prompt_len
        with self.precision():
            out = self.model(input_ids=self.prompts[batch], cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        positions = torch.arange(prompt_len, prompt_len + self.args.decode_tokens, device=self.args.device)

        def steps() -> None:
            nonlocal token
            with self.precision():
                for position in positions.view(-1, 1, 1):
                    out = self.decode_step(input_ids=token, cache=cache, use_cache=True, position_ids=position)
                    token = out.logits[:, -1:].argmax(-1)

        return _timed(self.args, steps)

    def measurements(self) -> list[tuple[str, str | None, Callable[[], float]]]:
        """`(metric, decode batch or None, measure)` for every figure of a round; `measure` returns tokens/s."""
        args = self.args
        tokens = args.batch_size * args.seq_len
        figures = [
            ("train_tokens_per_s", None, lambda: tokens / _timed(args, self.train_step)),
            ("prefill_tokens_per_s", None, lambda: tokens / _timed(args, self.prefill)),
        ]
        for batch in args.decode_batch_sizes:
            figures.append(
                ("decode_tokens_per_s", f"batch_{batch}", lambda b=batch: b * args.decode_tokens / self.decode(b))
            )
        return figures

    def measure(self, index: int) -> tuple[str, str | None, float]:
        """The `index`-th figure of `measurements`, with this preset's operator implementation."""
        metric, batch, measure = self.measurements()[index]
        with self.operators():
            return metric, batch, measure()

    def operators(self) -> AbstractContextManager:
        """This preset's operator implementation while the block runs."""
        return using_implementation(self.implementation)


@contextmanager
def using_implementation(name: str) -> Iterator[None]:
    """`delta_ops.set_implementation(name)` while the block runs, then the previous implementation again."""
    previous = delta_ops.get_implementation()
    delta_ops.set_implementation(name)
    try:
        yield
    finally:
        delta_ops.set_implementation(previous)


def _median_record(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    record = {}
    for key, value in rounds[0].items():
        if isinstance(value, dict):
            record[key] = {sub: statistics.median(r[key][sub] for r in rounds) for sub in value}
        else:
            record[key] = statistics.median(r[key] for r in rounds)
    return record


def _paired_ratios(rounds: list[dict[str, Any]], baseline_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """For each throughput: the median and quartiles over rounds of this preset's figure over the baseline's in the
    same round. Pairing within a round cancels the slow drift of a shared machine's speed."""

    def summary(ratios: list[float]) -> dict[str, float]:
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return {"median": statistics.median(ratios), "q1": q1, "q3": q3}

    paired = {}
    for key, value in baseline_rounds[0].items():
        pairs = list(zip(rounds, baseline_rounds))
        if isinstance(value, dict):
            paired[key] = {sub: summary([r[key][sub] / b[key][sub] for r, b in pairs]) for sub in value}
        else:
            paired[key] = summary([r[key] / b[key] for r, b in pairs])
    return paired


def _ratio(value: Any, reference: Any) -> Any:
    if isinstance(value, dict):
        return {key: _ratio(value[key], reference[key]) for key in value}
    if value is None or not reference:
        return None
    return value / reference


def _status_mb(field: str) -> float:
    """A memory field of `/proc/self/status` (`VmRSS`, or `VmHWM`: the peak of this process since its exec; unlike
    `ru_maxrss` it is not inherited from the parent)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**10


def measure_peak_memory_mb(names: list[str], args: BenchmarkArguments, steps: int = 2) -> dict[str, float | None]:
    """Peak memory of training steps (weights, gradients, AdamW state and activations) of each preset, in MiB.

    CUDA: `max_memory_allocated`, one preset after the other. CPU: the peak resident memory of a fresh process per
    preset (run side by side) above its resident memory after imports (None where `/proc` is missing)."""
    if args.device.startswith("cuda"):
        return {name: _cuda_peak_memory_mb(name, args, steps) for name in names}
    if not os.path.exists("/proc/self/status"):
        return dict.fromkeys(names)
    code = (
        "import json, sys; from ddl_transformers.benchmark import _memory_probe; "
        "print(json.dumps(_memory_probe(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))))"
    )
    # A fixed glibc mmap threshold returns freed tensors to the OS at once, so resident memory tracks live tensors;
    # malloc settings of this process's environment (e.g. retained freed memory) are not passed on.
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), *sys.path]), MALLOC_MMAP_THRESHOLD_="65536"
    )
    probes = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, name, json.dumps(asdict(args)), str(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in names
    }
    peaks = {}
    for name, probe in probes.items():
        stdout, stderr = probe.communicate()
        if probe.returncode:
            raise RuntimeError(f"The memory probe of {name} failed:\n{stderr}")
        peaks[name] = json.loads(stdout.strip().splitlines()[-1])
    return peaks


def _cuda_peak_memory_mb(name: str, args: BenchmarkArguments, steps: int) -> float:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(args.device)
    before = torch.cuda.memory_allocated(args.device)
    runner = _Runner(name, replace(args, compile=False))
    with runner.operators():
        for _ in range(steps):
            runner.train_step()
        _synchronize(args.device)
    peak = torch.cuda.max_memory_allocated(args.device) - before
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**20


def _memory_probe(name: str, args: dict[str, Any], steps: int) -> float:
    """Run inside a fresh process: training steps of one preset; peak RSS above the RSS after imports, in MiB."""
    args = BenchmarkArguments(**{**args, "compile": False})
    if args.threads:
        torch.set_num_threads(args.threads)
    before = _status_mb("VmRSS")
    runner = _Runner(name, args)
    with runner.operators():
        for _ in range(steps):
            runner.train_step()
    return _status_mb("VmHWM") - before


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_extension": cpu_kernels.extension() is not None,  # the decoding kernels as C++ calls (else ctypes)
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run_benchmark(args: BenchmarkArguments, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Measure every preset of `args` and return the report: settings, environment, one record per preset."""
    log = log or (lambda message: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = args.retain_freed_memory and retain_freed_memory_on(args.device)
    presets = ["baseline", *[name for name in args.presets if name != "baseline"]]
    started = {**environment(), "retained_freed_memory": retained}
    runners = [_Runner(name, args) for name in presets]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in presets}
    figures = len(runners[0].measurements())
    # every preset compiles its training step, prefill and each decode batch: room for all, so none falls back to eager
    graphs = len(presets) * (2 + len(args.decode_batch_sizes))
    room = torch._dynamo.config.patch(recompile_limit=max(8, 2 * graphs)) if args.compile else nullcontext()
    with room:
        for index in range(args.warmup + args.repeats):
            results: dict[str, dict[str, Any]] = {runner.name: {"decode_tokens_per_s": {}} for runner in runners}
            for figure in range(figures):  # each figure of every preset back to back: the pairs see the same load
                for runner in runners:
                    metric, batch, value = runner.measure(figure)
                    if batch is None:
                        results[runner.name][metric] = value
                    else:
                        results[runner.name][metric][batch] = value
            if index >= args.warmup:
                for name, result in results.items():
                    rounds[name].append(result)
            log(f"round {index + 1}/{args.warmup + args.repeats} done")
    parameters = {runner.name: runner.parameters for runner in runners}
    del runners, runner  # the loop variable still holds the last preset's model and optimiser state
    records = [{"preset": name, **_median_record(rounds[name]), "parameters": parameters[name]} for name in presets]
    for record in records:  # logged before the memory probes, so a run stopped during them keeps its timings
        log(f"{record['preset']}: {record}")

    peaks = measure_peak_memory_mb(presets, args) if args.memory else dict.fromkeys(presets)
    for record in records:
        record["peak_memory_mb"] = peaks[record["preset"]]
        log(f"{record['preset']}: peak training memory {record['peak_memory_mb']} MiB")
    for record in records:
        record["ratios"] = {key: _ratio(record[key], records[0][key]) for key in METRICS}
        record["paired_ratios"] = _paired_ratios(rounds[record["preset"]], rounds[presets[0]])
    finished = environment()
    started["load_average_end"] = finished["load_average"]
    return {"settings": asdict(args), "environment": started, "results": records}


def _number(value: Any, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table: value (ratio to baseline) per metric and preset."""
    batches = list(report["results"][0]["decode_tokens_per_s"])
    header = ["preset", "parameters", "train tok/s", "prefill tok/s"]
    header += [f"decode tok/s ({batch.replace('_', ' ')})" for batch in batches] + ["peak train memory MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in report["results"]:
        ratios = record["ratios"]

        def cell(value: Any, ratio: Any, digits: int = 0) -> str:
            return f"{_number(value, digits)} ({_number(ratio, 3)})"

        row = [
            record["preset"],
            f"{record['parameters'] / 1e6:.2f}M ({ratios['parameters']:.3f})",
            cell(record["train_tokens_per_s"], ratios["train_tokens_per_s"]),
            cell(record["prefill_tokens_per_s"], ratios["prefill_tokens_per_s"]),
            *[cell(record["decode_tokens_per_s"][b], ratios["decode_tokens_per_s"][b], 1) for b in batches],
            cell(record["peak_memory_mb"], ratios["peak_memory_mb"], 1),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Paired ratios to `baseline`: the median over rounds of the ratio within each round [quartiles].",
        "",
    ]
    header = ["preset", "train", "prefill", *[f"decode ({batch.replace('_', ' ')})" for batch in batches]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in report["results"]:
        paired = record["paired_ratios"]

        def spread(summary: dict[str, float]) -> str:
            return f"{summary['median']:.3f} [{summary['q1']:.3f}, {summary['q3']:.3f}]"

        row = [record["preset"], spread(paired["train_tokens_per_s"]), spread(paired["prefill_tokens_per_s"])]
        row += [spread(paired["decode_tokens_per_s"][b]) for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], args: BenchmarkArguments) -> str:
    """Write the JSON and markdown outputs asked for in `args`; return the markdown table."""
    table = markdown_table(report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    return table


__all__ = ["BENCHMARK_SIZES", "BenchmarkArguments", "markdown_table", "measure_peak_memory_mb", "run_benchmark"]
