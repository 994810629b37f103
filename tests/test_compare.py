"""The side-by-side study on a micro budget: tables, statistics, plots and Hub-ready run folders."""

import json
import math

import pytest

from ddl_transformers.compare import CompareArguments, paired_difference, run_comparison

MICRO = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,max_position_embeddings=64"


def micro_study(output_dir, **overrides) -> CompareArguments:
    settings = {
        "presets": "baseline,ddl-cc",
        "seeds": "0,1",
        "config_overrides": MICRO,
        "output_dir": str(output_dir),
        "vocab_size": 300,
        "block_size": 32,
        "max_steps": 4,
        "eval_points": 2,
        "max_train_samples": 300,
        "max_eval_samples": 30,
        **overrides,
    }
    return CompareArguments(**settings)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    markdown = run_comparison(micro_study(folder))
    return folder, markdown


def test_study_writes_tables_plots_and_models(study):
    folder, markdown = study
    for name in ("results.json", "results.md", "loss_curves.png", "perplexity.png"):
        assert (folder / name).is_file(), name
    results = json.loads((folder / "results.json").read_text())
    assert [row["preset"] for row in results["summary"]] == ["baseline", "ddl-cc"]
    assert len(results["runs"]) == 4
    benchmark = results["settings"]["benchmark"][0]
    for row in results["summary"]:
        entry = row["benchmarks"][benchmark]
        per_seed = list(entry["per_seed"].values())
        assert entry["word_perplexity_mean"] == pytest.approx(sum(per_seed) / 2)
        assert row["train_tokens"] == 4 * 16 * 32
    cc = results["summary"][1]["benchmarks"][benchmark]["vs_baseline_word_perplexity"]
    assert cc["seeds"] == 2 and cc["standard_error"] is not None
    assert "ddl-cc (n=2)" in markdown and "standard errors over 2 paired seeds" in markdown
    for run in results["runs"]:
        run_folder = folder / "runs" / f"{run['preset']}-seed{run['seed']}"
        assert (run_folder / "model.safetensors").is_file() and (run_folder / "comparison.md").is_file()
        assert "Against the additive baseline" in (run_folder / "README.md").read_text()
        assert len(run["validation_curve"]) >= 2
    audited = folder / "runs" / "ddl-cc-seed0"
    assert json.loads((audited / "gate_audit.json").read_text())["has_gate"] is True
    assert "How the model uses its gate" in (audited / "README.md").read_text()
    assert not (folder / "runs" / "ddl-cc-seed1" / "gate_audit.json").exists()  # first seed only


def test_seeds_fix_the_data_order_across_presets(tmp_path, monkeypatch):
    import ddl_transformers.training as training
    from ddl_transformers.compare import train_one

    batches = []
    original = training.causal_lm_collator

    def recording(features):
        batches.append(tuple(tuple(f["input_ids"][:6]) for f in features))
        return original(features)

    monkeypatch.setattr(training, "causal_lm_collator", recording)
    args = micro_study(tmp_path, max_steps=3, reuse_finished_runs=False)
    tokenizer_dir = tmp_path / "tokenizer"
    from ddl_transformers.data import load_corpus, train_tokenizer

    train_tokenizer(load_corpus("ptb", max_train_samples=300)["train"], vocab_size=300).save_pretrained(tokenizer_dir)
    orders = {}
    for preset, seed in [("baseline", 0), ("ddl-cc", 0), ("ddl-cc", 1)]:
        batches.clear()
        train_one(args, preset, seed, str(tokenizer_dir))
        orders[(preset, seed)] = list(batches[:3])
    assert orders[("baseline", 0)] == orders[("ddl-cc", 0)]
    assert orders[("ddl-cc", 0)] != orders[("ddl-cc", 1)]


@pytest.mark.parametrize("retain", [True, False])
def test_runs_pass_on_the_retained_memory_setting(tmp_path, monkeypatch, retain):
    from ddl_transformers import compare

    def stop(model_args, data_args, training_args):
        raise StopIteration(training_args.retain_freed_cpu_memory)

    monkeypatch.setattr(compare, "run_training", stop)
    args = micro_study(tmp_path, reuse_finished_runs=False, retain_freed_cpu_memory=retain)
    with pytest.raises(StopIteration) as stopped:
        compare.train_one(args, "baseline", 0, str(tmp_path / "tokenizer"))
    assert stopped.value.args == (retain,)


def test_finished_runs_are_reused_and_references_added(study):
    folder, _ = study
    model_file = folder / "runs" / "baseline-seed0" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    reference = str(folder / "runs" / "ddl-cc-seed0")
    markdown = run_comparison(micro_study(folder, reference_model=[reference]))
    assert model_file.stat().st_mtime_ns == before
    assert "reference: ddl-cc-seed0" in markdown
    results = json.loads((folder / "results.json").read_text())
    benchmark = results["settings"]["benchmark"][0]
    reference_ppl = results["references"][0]["evaluations"][benchmark]["word_perplexity"]
    own = [r for r in results["runs"] if r["preset"] == "ddl-cc" and r["seed"] == 0][0]
    assert reference_ppl == pytest.approx(own["evaluations"][benchmark]["word_perplexity"], rel=1e-5)


def test_finished_runs_with_other_settings_are_not_reused(study):
    folder, _ = study
    with pytest.raises(ValueError, match="max_steps: found 4, study wants 5"):
        run_comparison(micro_study(folder, max_steps=5))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        run_comparison(
            micro_study(folder, config_overrides=MICRO.replace("num_hidden_layers=2", "num_hidden_layers=1"))
        )


def test_paired_difference_and_standard_error():
    result = paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 11.0, 1: 12.5, 2: 13.0})
    differences = [-1.0, -0.5, -2.0]
    mean = sum(differences) / 3
    error = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2) / math.sqrt(3)
    assert result == {"difference": pytest.approx(mean), "standard_error": pytest.approx(error), "seeds": 3}
    assert paired_difference({0: 1.0}, {0: 2.0})["standard_error"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"presets": "baseline,ddl-xx"}, "ddl-xx"), ({"seeds": "0,a"}, "integers"), ({"size": "huge"}, "huge")],
)
def test_bad_study_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        micro_study(tmp_path, **overrides)


def test_train_tokens_sets_the_step_budget(tmp_path):
    args = micro_study(tmp_path, max_steps=None, train_tokens=10_000)
    assert args.max_steps == math.ceil(10_000 / (16 * 32))
