"""The benchmark end to end at a minuscule shape: the report's structure and its ratios, never its timings."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache

from ddl_transformers import allocator, delta_ops
from ddl_transformers.benchmark import (
    METRICS,
    BenchmarkArguments,
    _paired_ratios,
    markdown_table,
    run_benchmark,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent


def tiny_arguments(tmp_path, **overrides) -> BenchmarkArguments:
    settings = {
        "presets": ["ddl-cc"],
        "size": "tiny",
        "seq_len": 8,
        "batch_size": 2,
        "decode_batch_sizes": [1, 2],
        "prompt_len": 4,
        "decode_tokens": 2,
        "warmup": 0,
        "repeats": 2,
        "output": str(tmp_path / "benchmark.json"),
        "markdown": str(tmp_path / "benchmark.md"),
    }
    return BenchmarkArguments(**{**settings, **overrides})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    args = tiny_arguments(tmp_path_factory.mktemp("benchmark"))
    report = run_benchmark(args, log=None)
    write_report(report, args)
    return report, args


def test_one_record_per_preset_baseline_first(report):
    report, _ = report
    assert [record["preset"] for record in report["results"]] == ["baseline", "ddl-cc"]
    for record in report["results"]:
        for key in METRICS:
            assert key in record and key in record["ratios"]
        assert record["train_tokens_per_s"] > 0 and record["prefill_tokens_per_s"] > 0
        assert set(record["decode_tokens_per_s"]) == {"batch_1", "batch_2"}
        assert record["peak_memory_mb"] is None or record["peak_memory_mb"] > 0


def test_ratios_are_values_over_the_baseline(report):
    report, _ = report
    baseline = report["results"][0]
    for record in report["results"]:
        ratios = record["ratios"]
        for key in ("train_tokens_per_s", "prefill_tokens_per_s", "parameters"):
            assert ratios[key] == pytest.approx(record[key] / baseline[key])
        for batch, value in record["decode_tokens_per_s"].items():
            assert ratios["decode_tokens_per_s"][batch] == pytest.approx(
                value / baseline["decode_tokens_per_s"][batch]
            )
        if record["peak_memory_mb"] is not None:
            assert ratios["peak_memory_mb"] == pytest.approx(record["peak_memory_mb"] / baseline["peak_memory_mb"])
    assert all(value == 1.0 for key, value in baseline["ratios"].items() if key != "decode_tokens_per_s")
    assert report["results"][1]["parameters"] > baseline["parameters"]


def test_presets_may_be_given_with_commas():
    assert BenchmarkArguments(presets=["baseline,ddl-cc", "ddl-tc@reference"]).presets == [
        "baseline",
        "ddl-cc",
        "ddl-tc@reference",
    ]
    with pytest.raises(ValueError, match="ddl-nope"):
        BenchmarkArguments(presets=["baseline,ddl-nope"])


def test_paired_ratios_pair_each_round_with_the_baselines():
    baseline_rounds = [
        {"train_tokens_per_s": 100.0, "decode_tokens_per_s": {"batch_1": 10.0}},
        {"train_tokens_per_s": 50.0, "decode_tokens_per_s": {"batch_1": 20.0}},
    ]
    rounds = [
        {"train_tokens_per_s": 90.0, "decode_tokens_per_s": {"batch_1": 5.0}},
        {"train_tokens_per_s": 40.0, "decode_tokens_per_s": {"batch_1": 20.0}},
    ]
    paired = _paired_ratios(rounds, baseline_rounds)
    # per round 0.9 and 0.8 (the ratio of the medians, 65 / 75, would be 0.867)
    assert paired["train_tokens_per_s"]["median"] == pytest.approx(0.85)
    assert paired["train_tokens_per_s"]["q1"] <= 0.85 <= paired["train_tokens_per_s"]["q3"]
    assert paired["decode_tokens_per_s"]["batch_1"]["median"] == pytest.approx(0.75)


def test_report_has_paired_ratios(report):
    report, _ = report
    for record in report["results"]:
        train = record["paired_ratios"]["train_tokens_per_s"]
        assert train["q1"] <= train["median"] <= train["q3"]
        assert set(record["paired_ratios"]["decode_tokens_per_s"]) == {"batch_1", "batch_2"}
    assert report["results"][0]["paired_ratios"]["train_tokens_per_s"]["median"] == 1.0


def test_outputs_are_written(report):
    report, args = report
    on_disk = json.loads(Path(args.output).read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    assert on_disk["settings"]["seq_len"] == 8 and on_disk["environment"]["torch"]
    assert on_disk["environment"]["retained_freed_memory"] is (allocator._mallopt() is not None)  # by default
    table = Path(args.markdown).read_text()
    assert table == markdown_table(report)
    values, paired = table.split("\n\n", 1)
    assert values.count("\n") == 1 + len(report["results"])  # header, rule, one row per preset
    assert paired.count("| ddl-cc |") == 1 and values.count("| ddl-cc |") == 1


def test_reference_variants_run_in_the_same_rounds(tmp_path):
    args = tiny_arguments(tmp_path, presets=["ddl-tc@reference", "ddl-tc"], repeats=1, memory=False)
    report = run_benchmark(args, log=None)
    assert [record["preset"] for record in report["results"]] == ["baseline", "ddl-tc@reference", "ddl-tc"]
    assert report["results"][1]["parameters"] == report["results"][2]["parameters"]
    assert [record["peak_memory_mb"] for record in report["results"]] == [None] * 3
    assert delta_ops.get_implementation() == delta_ops.DEFAULT_IMPLEMENTATION


def test_cli_parses_its_flags():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    flags = "--presets ddl-cc ddl-tc --size tiny --device cpu --dtype bfloat16 --seq_len 4 --batch_size 2 --compile"
    (args,) = script.HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(flags.split())
    assert args.presets == ["ddl-cc", "ddl-tc"] and args.dtype == "bfloat16" and args.compile and args.seq_len == 4
    with pytest.raises(ValueError, match="timer"):
        BenchmarkArguments(timer="cycles")
    with pytest.raises(ValueError, match="presets"):
        BenchmarkArguments(presets=["ddl-cc@compiled"])
    assert BenchmarkArguments(presets=["ddl-cc@triton"]).presets == ["ddl-cc@triton"]


def test_autocast_keeps_float32_weights_and_runs_in_bfloat16(tmp_path):
    from ddl_transformers.benchmark import _Runner

    args = tiny_arguments(tmp_path, dtype="bfloat16", autocast=True, memory=False)
    runner = _Runner("ddl-cc", args)
    assert all(param.dtype == torch.float32 for param in runner.model.parameters())
    with runner.precision():
        logits = runner.model(input_ids=runner.tokens).logits
    assert logits.dtype == torch.bfloat16
    before = runner.model.lm_head.weight.detach().clone()
    dtypes = []
    runner.model.lm_head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    runner.train_step()
    assert not torch.equal(runner.model.lm_head.weight, before), "the mixed-precision step updates the weights"
    runner.prefill()
    runner.decode(1)
    assert len(dtypes) == 3 + args.decode_tokens and set(dtypes) == {torch.bfloat16}, dtypes
    assert run_benchmark(args, log=None)["settings"]["autocast"] is True
    for dtype in ("float32", "float64"):
        with pytest.raises(ValueError, match="--autocast needs --dtype bfloat16 or float16"):
            tiny_arguments(tmp_path, autocast=True, dtype=dtype)


def test_static_decode_cache_gives_the_dynamic_caches_logits(tmp_path):
    from ddl_transformers.benchmark import _Runner

    assert BenchmarkArguments(compile=True).decode_cache == "static"
    assert BenchmarkArguments().decode_cache == "dynamic"
    with pytest.raises(ValueError, match="decode_cache"):
        BenchmarkArguments(decode_cache="paged")
    logits = {}
    for kind, cache_class in (("dynamic", DynamicCache), ("static", StaticCache)):
        runner = _Runner("ddl-tc", tiny_arguments(tmp_path, decode_cache=kind, memory=False))
        assert isinstance(runner.new_cache(), cache_class)
        steps = []
        runner.model.lm_head.register_forward_hook(
            lambda module, inputs, output, steps=steps: steps.append(output[:, -1])
        )
        runner.decode(2)
        logits[kind] = torch.stack(steps)  # the prompt's last position, then every decode step
    assert logits["static"].shape == (1 + runner.args.decode_tokens, 2, runner.model.config.vocab_size)
    torch.testing.assert_close(logits["static"], logits["dynamic"], rtol=1e-5, atol=1e-5)
    # compiled: fixed shapes for the static cache's decode steps; a growing dynamic cache keeps the dynamic-shape model
    for kind in ("dynamic", "static"):
        runner = _Runner("ddl-cc", tiny_arguments(tmp_path, compile=True, decode_cache=kind, memory=False))
        assert (runner.decode_step is runner.forward) == (kind == "dynamic")


def test_compiled_decode_steps_use_generates_compile_mode(tmp_path, monkeypatch):
    from ddl_transformers.benchmark import _Runner

    assert BenchmarkArguments().decode_compile_mode == CompileConfig().mode == "reduce-overhead"
    with pytest.raises(ValueError, match="invalid decode_compile_mode='fast'; allowed values are"):
        BenchmarkArguments(decode_compile_mode="fast")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(options) or model)
    for mode in ("reduce-overhead", "max-autotune-no-cudagraphs"):
        compiled.clear()
        _Runner("ddl-cc", tiny_arguments(tmp_path, compile=True, decode_compile_mode=mode, memory=False))
        assert compiled == [{}, {"dynamic": False, "mode": mode}]  # the training and prefill model keeps its mode


def test_timed_collects_garbage_first_only_when_asked(monkeypatch):
    import gc

    from ddl_transformers import benchmark

    collections = []
    monkeypatch.setattr(benchmark.gc, "collect", lambda: collections.append(gc.isenabled()))
    seconds = benchmark._timed(BenchmarkArguments(), lambda: collections.append(gc.isenabled()))
    assert collections == [True, False] and gc.isenabled() and seconds >= 0  # collected, then paused while timed
    collections.clear()
    benchmark._timed(BenchmarkArguments(), lambda: None, collect=False)
    assert collections == [] and gc.isenabled()
