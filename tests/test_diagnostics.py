"""The gate audit (`ddl_transformers/diagnostics.py`, `scripts/audit_gates.py`)."""

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
import treebank
from conftest import ALL_PRESETS, perturbed_model

from ddl_transformers import data
from ddl_transformers.diagnostics import REGIMES, audit_gates, regime_shares, write_audit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "audit_gates.py"
DIAGNOSTICS = ROOT / "ddl_transformers" / "diagnostics.py"
LINES = treebank.penn["valid"].split("\n")[:300]
LAYERS = 2


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer(datasets.Dataset.from_dict({"text": LINES}), vocab_size=300)


def make_model(name, tokenizer, **overrides):
    eos = tokenizer.eos_token_id
    return perturbed_model(
        name,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=eos,
        eos_token_id=eos,
        num_hidden_layers=LAYERS,
        max_position_embeddings=64,
        **overrides,
    )


def set_constant_gate(model, beta: float):
    """Zero the gate weights and set the bias so that every position gets `beta` (±30 logits saturate)."""
    half = beta / 2
    logit = 30.0 if half >= 1 else -30.0 if half <= 0 else math.log(half / (1 - half))
    with torch.no_grad():
        for layer in model.model.layers:
            for residual in (layer.attn_residual, layer.mlp_residual):
                residual.beta_proj.weight.zero_()
                residual.beta_proj.bias.fill_(logit)


def test_audit_runs_on_every_preset(tokenizer, tmp_path):
    for name in ALL_PRESETS:
        model = make_model(name, tokenizer)
        # 160 tokens in windows of 64: two full windows in one batch, then a short one on its own
        audit = audit_gates(model, tokenizer, LINES, max_tokens=160, batch_size=4, source="ptb")
        json.dumps(audit, allow_nan=False)
        assert (audit["tokens"], audit["window"], audit["windows"]) == (160, 64, 3)
        assert [(row["layer"], row["sublayer"]) for row in audit["sublayers"]] == [
            (i, sub) for i in range(LAYERS) for sub in ("attn", "mlp")
        ]
        assert [row["module"] for row in audit["sublayers"]][:2] == [
            "model.layers.0.attn_residual",
            "model.layers.0.mlp_residual",
        ]
        depth = audit["state_norm_across_depth"]
        assert len(depth) == LAYERS + 1 and all(math.isfinite(x) and x > 0 for x in depth)
        assert audit["thresholds"]["skip_below"] == 0.1 and audit["thresholds"]["disjoint"]
        assert all(row["positions"] == 160 for row in audit["sublayers"])
        paths = write_audit(audit, str(tmp_path / name))
        assert json.loads(Path(paths["json"]).read_text())["has_gate"] == audit["has_gate"]
        assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        if name == "baseline":
            assert audit["has_gate"] is False and "no gate" in audit["message"]
            assert "overall" not in audit and not any("regimes" in row for row in audit["sublayers"])
            assert "no gate" in audit["summary_markdown"]
            continue
        assert audit["has_gate"] is True and "message" not in audit
        assert audit["model"]["residual_mode"] == ("write_only" if name == "write-only" else "delta")
        assert audit["summary_markdown"].count("\n| ") == 2 * LAYERS + 1  # header and one row per sublayer
        for row in audit["sublayers"]:
            assert 0.0 < row["beta_min"] <= row["beta_max"] < 2.0
            quantiles = list(row["beta_quantiles"].values())
            assert quantiles == sorted(quantiles) and len(quantiles) == 7
            assert sum(row["beta_histogram"]["counts"]) == 160
            assert len(row["beta_histogram"]["edges"]) == 41
            assert sum(row["regimes"][regime] for regime in REGIMES) == pytest.approx(1.0)
            assert row["reading_error_before"] > 0 and math.isfinite(row["reading_error_after"])
        assert sum(audit["overall"]["regimes"][regime] for regime in REGIMES) == pytest.approx(1.0)


def test_regime_bins_are_disjoint_and_documented():
    shares = regime_shares([0.0, 0.0999, 0.1, 0.8999, 0.9, 1.0, 1.1, 1.1001, 2.0, 1.05])
    assert shares == {
        "skip": 0.2,
        "partial": 0.2,
        "match": 0.4,
        "over_relaxed": 0.2,
        "share_beta_gt_1": 0.4,
    }


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only"])
@pytest.mark.parametrize(
    "beta, regime", [(2.0, "over_relaxed"), (0.0, "skip"), (1.0, "match"), (0.5, "partial"), (1.5, "over_relaxed")]
)
def test_regimes_and_reading_errors_follow_the_gate(tokenizer, name, beta, regime):
    model = make_model(name, tokenizer)
    set_constant_gate(model, beta)
    audit = audit_gates(model, tokenizer, LINES, max_tokens=96, window=48)
    for row in audit["sublayers"]:
        assert row["regimes"][regime] == 1.0
        assert row["beta_mean"] == pytest.approx(beta, abs=1e-6)
        before, after = row["reading_error_before"], row["reading_error_after"]
        assert before > 0.1 and math.isfinite(after)
        if name != "write-only":
            # delta rule: e_after = (1 - beta) e_before, so the reading lands on the target at beta = 1
            assert after == pytest.approx(abs(1 - beta) * before, rel=1e-4, abs=1e-5)
        elif beta == 0.0:
            assert after == pytest.approx(before, rel=1e-5)
    if beta == 1.0 and name != "write-only":
        assert all(row["reading_error_after"] < 1e-5 for row in audit["sublayers"])


def test_bad_inputs(tokenizer):
    model = make_model("ddl-cc", tokenizer)
    with pytest.raises(ValueError, match="must be positive"):
        audit_gates(model, tokenizer, LINES, max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        audit_gates(model, tokenizer, [], max_tokens=10)
    with pytest.raises(ValueError, match="no DDL residual modules"):
        audit_gates(torch.nn.Linear(2, 2), tokenizer, LINES)


REMOTE_AUDIT = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.modules["ddl_transformers"] = None  # any `import ddl_transformers` now fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    diagnostics_file, out = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("gate_diagnostics", diagnostics_file)
    diagnostics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnostics)
    torch.set_num_threads(1)
    lines = json.loads(sys.argv[3])
    audits = {}
    for folder in sys.argv[4:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained(folder)
        audit = diagnostics.audit_gates(model, tokenizer, lines, max_tokens=100)
        diagnostics.write_audit(audit, folder + "-audit")
        audits[folder] = audit
    with open(out, "w") as handle:
        json.dump(audits, handle)
    """
)


@pytest.fixture(scope="module")
def saved_models(tokenizer, tmp_path_factory):
    """`{preset: (model, folder)}` for a delta model and the additive baseline, saved with their tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    saved = {}
    for name in ("ddl-tc", "baseline"):
        model = make_model(name, tokenizer)
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        saved[name] = (model, folder)
    return saved


def test_audit_of_remote_code_model_without_the_package(saved_models, tokenizer, tmp_path):
    folders = [str(folder) for _, folder in saved_models.values()]
    result = tmp_path / "audits.json"
    subprocess.run(
        [sys.executable, "-c", REMOTE_AUDIT, str(DIAGNOSTICS), str(result), json.dumps(LINES[:60]), *folders],
        check=True,
        cwd=tmp_path,
        env={
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf_home"),
            "MPLCONFIGDIR": str(tmp_path / "mpl"),
            "PATH": "/usr/bin:/bin",
        },
    )
    remote = json.loads(result.read_text())
    for name, (model, folder) in saved_models.items():
        audit = remote[str(folder)]
        assert audit["has_gate"] is (name != "baseline")
        assert Path(f"{folder}-audit/gate_audit.png").is_file()
        local = audit_gates(model, tokenizer, LINES[:60], max_tokens=100)
        assert audit["tokens"] == local["tokens"] == 100
        assert audit["state_norm_across_depth"] == pytest.approx(local["state_norm_across_depth"], rel=1e-5)
        for theirs, ours in zip(audit["sublayers"], local["sublayers"], strict=True):
            for key in ("beta_mean", "reading_error_before", "reading_error_after", "regimes", "beta_quantiles"):
                if key in ours:
                    assert theirs[key] == pytest.approx(ours[key], rel=1e-5, abs=1e-6), key


def load_script():
    spec = importlib.util.spec_from_file_location("audit_gates_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cli(saved_models, tmp_path, capsys):
    script = load_script()
    benchmark = tmp_path / "sample.txt"
    benchmark.write_text("\n".join(LINES[:80]))
    folder = saved_models["ddl-tc"][1]
    audit = script.main(
        [
            "--model",
            str(folder),
            "--benchmark",
            str(benchmark),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_tokens",
            "80",
        ]
    )
    assert audit["tokens"] == 80 and audit["source"] == "sample.txt"
    written = json.loads((tmp_path / "out" / "gate_audit.json").read_text())
    assert written["summary_markdown"] == audit["summary_markdown"]
    assert (tmp_path / "out" / "gate_audit.png").is_file()
    assert "| Layer | Sublayer |" in capsys.readouterr().out

    with pytest.raises(ValueError, match="Unknown benchmark 'wikitext103'"):
        script.main(["--model", str(folder), "--benchmark", "wikitext103", "--output_dir", str(tmp_path / "x")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        script.main(["--model", str(tmp_path / "empty"), "--benchmark", str(benchmark), "--output_dir", str(tmp_path)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="Could not load a causal LM"):
        script.main(["--model", str(broken), "--benchmark", str(benchmark), "--output_dir", str(tmp_path / "x")])
