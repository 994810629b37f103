"""Publishing to the Hub: `scripts/train.py --push_to_hub`, `scripts/push_to_hub.py` and `hub.push_folder`.

Everything runs against the local Hub stand-in (`ddl_transformers.testing.hub_standin`) with the real
`huggingface_hub` client: subprocesses get `HubStandIn.client_env` (endpoint, fresh `HF_HOME`, token), this process
uses `redirect_hub_client`. One micro model is trained and pushed by `scripts/train.py` (module fixture); the other
tests push copies of its folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from test_training import MICRO

from ddl_transformers.hub import DEFAULT_IGNORE_PATTERNS, HubPushError, check_folder_for_push, push_folder
from ddl_transformers.testing.hub_standin import DEFAULT_TOKEN, DEFAULT_USER, HubStandIn, redirect_hub_client
from ddl_transformers.training import DDLTrainingArguments

REPO = Path(__file__).resolve().parent.parent
TRAINED_REPO = f"{DEFAULT_USER}/ddl-micro"
TOKENS = [[5, 9, 11, 30, 42, 7, 3, 64]]
PROMPT = "the company said"
METRICS = ("token_perplexity", "word_perplexity", "bits_per_byte")
TIMEOUT = 300


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubStandIn]:
    with HubStandIn(tmp_path_factory.mktemp("hub")) as standin:
        yield standin
    assert standin.unhandled == []  # every request the client made had a route


def subprocess_env(hub: HubStandIn, hf_home: Path, token: str | None = DEFAULT_TOKEN) -> dict[str, str]:
    """A fresh client environment pointing at the stand-in (the built-in corpora's cache is shared, not rebuilt)."""
    import datasets.config

    env = hub.client_env(hf_home, token=token)
    env.update(HF_DATASETS_CACHE=str(datasets.config.HF_DATASETS_CACHE), TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture
def api(hub: HubStandIn, tmp_path: Path) -> Iterator[HfApi]:
    """This process's client, pointed at the stand-in (fresh HF_HOME, so no stored token)."""
    with redirect_hub_client(hub.url, hf_home=tmp_path / "hf_home"):
        yield HfApi(token=DEFAULT_TOKEN)


@pytest.fixture(scope="module")
def trained(hub: HubStandIn, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`scripts/train.py --push_to_hub` trains a micro model (with a checkpoint and TensorBoard logs) and pushes it."""
    work = tmp_path_factory.mktemp("train")
    folder = work / "ddl-micro"
    command = [
        sys.executable, str(REPO / "scripts" / "train.py"),
        "--preset", "ddl-cc", "--config_overrides", MICRO, "--vocab_size", "300",
        "--dataset_name", "ptb", "--block_size", "32", "--max_train_samples", "300", "--max_eval_samples", "40",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--eval_steps", "2", "--logging_steps", "1", "--warmup_steps", "0", "--sample_tokens", "4",
        "--save_strategy", "steps", "--save_steps", "1", "--report_to", "tensorboard", "--disable_tqdm", "true",
        "--output_dir", str(folder), "--push_to_hub", "--hub_model_id", TRAINED_REPO,
    ]  # fmt: skip
    proc = subprocess.run(
        command,
        env=subprocess_env(hub, work / "hf_home"),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return folder, proc.stdout


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (to show a push leaves it untouched)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def model_copy(folder: Path, target: Path) -> Path:
    """The top-level files of a trained folder (no checkpoints or logs)."""
    target.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)
    return target


# ---------------------------------------------------------------------------------- train.py --push_to_hub, loading


def test_train_script_pushes_the_folder_once(hub: HubStandIn, trained: tuple[Path, str], api: HfApi) -> None:
    folder, stdout = trained
    assert f"Pushed {folder} to the Hub: " in stdout
    # Trainer did not push on its own (no repo at start-up, no "Model save" or checkpoint commits): one commit
    assert [c.title for c in api.list_repo_commits(TRAINED_REPO)] == [
        "Upload DDL model ddl-micro with ddl-transformers",
        "initial commit",
    ]
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert any(name.startswith("checkpoint-1/") for name in local) and any(name.startswith("runs/") for name in local)
    pushed = set(api.list_repo_files(TRAINED_REPO))
    assert pushed == set(check_folder_for_push(folder)) | {".gitattributes"}
    expected = {
        "model.safetensors", "config.json", "configuration_ddl.py", "modeling_ddl.py", "delta_ops.py", "state_tape.py",
        "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "loss_curve.png",
        "evaluation.json", "training_record.json", "eval_results.json", "test_results.json",
    }  # fmt: skip
    assert expected <= pushed, expected - pushed
    assert not any(name.startswith(("checkpoint-", "runs/")) or name.endswith(".bin") for name in pushed)
    assert json.loads((folder / "training_args.json").read_text())["push_hub_ready_folder"] is True


LOAD_FROM_HUB = textwrap.dedent(
    """
    import sys
    sys.modules["ddl_transformers"] = None  # any `import ddl_transformers` now fails: only the Hub copy can serve
    import json
    import torch
    from transformers import AutoModelForCausalLM, pipeline

    repo, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.tensor({tokens})).logits
    generator = pipeline("text-generation", model=repo, trust_remote_code=True)
    text = generator({prompt!r}, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]["generated_text"]
    torch.save({{"logits": logits, "text": text, "module": type(model).__module__}}, out)
    """
).format(tokens=TOKENS, prompt=PROMPT)


def test_fresh_process_loads_the_pushed_model_by_repo_id(
    hub: HubStandIn, trained: tuple[Path, str], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, pipeline

    from ddl_transformers import DDLForCausalLM, delta_ops

    folder, _ = trained
    out = tmp_path / "remote.pt"
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_HUB, TRAINED_REPO, str(out)],
        env=subprocess_env(hub, tmp_path / "fresh_home", token=None),  # a public repo: anyone can load it
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    remote = torch.load(out)
    assert remote["module"].startswith("transformers_modules")  # the code came from the repo

    local = DDLForCausalLM.from_pretrained(folder).eval()
    delta_ops.set_implementation("fused")  # the remote code's operators (it does not carry the C kernels)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], local(torch.tensor(TOKENS)).logits, rtol=0, atol=0)
    generator = pipeline("text-generation", model=local, tokenizer=AutoTokenizer.from_pretrained(folder))
    expected = generator(PROMPT, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert remote["text"] == expected and len(remote["text"]) > len(PROMPT)


def test_pushed_card_parses_and_carries_the_evaluation_results(trained: tuple[Path, str], api: HfApi) -> None:
    folder, _ = trained
    card = ModelCard.load(TRAINED_REPO)
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "text-generation", "apache-2.0")
    assert {"deep-delta-learning", "custom_code", "ddl-cc"} <= set(data.tags) and data.datasets == ["ptb"]
    assert data.model_name == TRAINED_REPO
    pushed = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    records = json.loads((folder / "evaluation.json").read_text())["results"]
    expected = {
        (*record["benchmark"].split(":"), key): record[key] for record in records for key in METRICS
    }  # taken from the evaluation output, value for value
    assert pushed == expected and len(expected) == 6
    assert f'from_pretrained("{TRAINED_REPO}", trust_remote_code=True)' in card.text
    assert "loss_curve.png" in card.text and "loss_curve.png" in api.list_repo_files(TRAINED_REPO)
    assert TRAINED_REPO not in (folder / "README.md").read_text()  # rendered for the push, the folder kept its own


# --------------------------------------------------------------------------------- push_folder: re-push, branch, ...


def test_repush_branch_and_private(hub: HubStandIn, trained: tuple[Path, str], api: HfApi, tmp_path: Path) -> None:
    local = model_copy(trained[0], tmp_path / "model")
    repo = f"{DEFAULT_USER}/ddl-api"
    before = tree_hashes(local)
    first = push_folder(local, repo, commit_message="first push", token=DEFAULT_TOKEN)
    assert tree_hashes(local) == before  # a push never writes into the folder

    # the repo gains a file by hand, and stale weights of an older sharded push
    extra = [CommitOperationAdd("notes.md", b"my notes"), CommitOperationAdd("model-00001-of-00002.safetensors", b"x")]
    api.create_commit(repo, operations=extra, commit_message="by hand")
    (local / "comparison.md").write_text("| model | ppl |\n|---|---|\n| additive | 300.0 |\n")
    second = push_folder(local, "ddl-api", commit_message="second push", token=DEFAULT_TOKEN)  # namespace: whoami
    assert second.repo_url.repo_id == repo and second.oid != first.oid
    assert [c.title for c in api.list_repo_commits(repo)] == ["second push", "by hand", "first push", "initial commit"]
    files = set(api.list_repo_files(repo))
    assert {"notes.md", "comparison.md", "model.safetensors"} <= files  # a user's file stays
    assert "model-00001-of-00002.safetensors" not in files  # stale weights would shadow the new ones
    assert "| additive | 300.0 |" in ModelCard.load(repo).text

    third = push_folder(local, repo, revision="dev", commit_message="on dev", token=DEFAULT_TOKEN)
    refs = {b.name: b.target_commit for b in api.list_repo_refs(repo).branches}
    assert refs == {"main": second.oid, "dev": third.oid}
    assert api.repo_info(repo).private is False
    push_folder(local, repo, private=True, token=DEFAULT_TOKEN)  # an existing public repo is made private
    assert api.repo_info(repo).private is True and not HfApi(token=False).repo_exists(repo)


def test_push_script(hub: HubStandIn, trained: tuple[Path, str], api: HfApi, tmp_path: Path) -> None:
    folder, _ = trained
    repo = f"{DEFAULT_USER}/ddl-cli"
    command = [
        sys.executable, str(REPO / "scripts" / "push_to_hub.py"), str(folder), "--repo_id", repo,
        "--private", "--revision", "release", "--commit_message", "Release candidate",
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=subprocess_env(hub, tmp_path / "hf_home_cli"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Pushed {folder} to {repo}: " in proc.stdout
    assert api.repo_info(repo).private is True
    commits = api.list_repo_commits(repo, revision="release")
    assert commits[0].title == "Release candidate"
    assert [c.title for c in api.list_repo_commits(repo)] == ["initial commit"]  # main untouched
    assert "modeling_ddl.py" in api.list_repo_files(repo, revision="release")


# -------------------------------------------------------------------------------------------------------- refusals


def _drop(name: str):
    return lambda folder: (folder / name).unlink()


def _no_auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


def _pickle(folder: Path) -> None:
    torch.save({"learning_rate": 1e-3}, folder / "training_args.bin")


def _pickled_weights(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("breakage", "messages"),
    [
        (_drop("modeling_ddl.py"), ["code files", "modeling_ddl.py"]),
        (_drop("configuration_ddl.py"), ["configuration_ddl.py"]),
        (_drop("delta_ops.py"), ["delta_ops.py"]),  # imported relatively by modeling_ddl.py
        (_no_auto_map, ["no auto_map"]),
        (_drop("config.json"), ["config.json is missing"]),
        (_pickle, ["pickled files", "training_args.bin", "safe_serialization=True"]),
        (_pickled_weights, ["pytorch_model.bin", "no safetensors weights"]),
    ],
    ids=["modeling", "configuration", "relative-import", "auto_map", "config", "pickle", "pickled-weights"],
)
def test_refuses_broken_folders_before_any_request(
    hub: HubStandIn, trained: tuple[Path, str], api: HfApi, tmp_path: Path, breakage, messages: list[str]
) -> None:
    local = model_copy(trained[0], tmp_path / "model")
    breakage(local)
    before, served = tree_hashes(local), len(hub.requests)
    with pytest.raises(ValueError, match="Refusing to push") as info:
        push_folder(local, f"{DEFAULT_USER}/refused", token=DEFAULT_TOKEN)
    for message in messages:
        assert message in str(info.value)
    assert hub.requests[served:] == []  # refused before the first request
    assert not api.repo_exists(f"{DEFAULT_USER}/refused") and tree_hashes(local) == before


def test_folder_check_lists_uploads(trained: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = trained
    files = check_folder_for_push(folder)
    assert "model.safetensors" in files and "README.md" in files
    assert not [f for f in files if f.startswith(("checkpoint-", "runs/")) or f.endswith(".bin")]
    assert any((folder / "checkpoint-1").glob("*.pt*"))  # pickles in checkpoints are excluded, not refused
    assert "checkpoint-*" in DEFAULT_IGNORE_PATTERNS and "runs" in DEFAULT_IGNORE_PATTERNS
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/ddl-base"}))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        check_folder_for_push(adapter)
    shutil.copy(folder / "model.safetensors", adapter / "adapter_model.safetensors")
    assert check_folder_for_push(adapter) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="no such folder"):
        check_folder_for_push(tmp_path / "missing")


def _load_push_script():
    spec = importlib.util.spec_from_file_location("push_to_hub_script", REPO / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_token_is_reported_before_any_request(
    hub: HubStandIn,
    trained: tuple[Path, str],
    api: HfApi,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, _ = trained
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    repo = f"{DEFAULT_USER}/no-token"
    served = len(hub.requests)
    with pytest.raises(HubPushError, match=r"hf auth login.*HF_TOKEN") as info:
        push_folder(folder, repo)
    assert "Nothing was uploaded" in str(info.value)
    assert _load_push_script().main([str(folder), "--repo_id", repo]) == 1
    assert "No Hugging Face token found" in capsys.readouterr().err
    assert hub.requests[served:] == []  # no request at all, let alone an upload
    with pytest.raises(ValueError, match="needs a Hugging Face token"):  # train.py fails before training
        DDLTrainingArguments(output_dir=str(folder), push_to_hub=True, hub_model_id=repo, report_to="none")
    assert not api.repo_exists(repo)
    args = DDLTrainingArguments(output_dir="x", push_to_hub=True, hub_token=DEFAULT_TOKEN, report_to="none")
    assert (args.push_to_hub, args.push_hub_ready_folder) == (False, True)  # Trainer's own pushes are off
    assert DEFAULT_TOKEN not in args.to_json_string()  # training_args.json is uploaded: the token is redacted


def test_network_failure_is_clear_and_leaves_the_folder_untouched(trained: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = trained
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = tree_hashes(folder)
    with redirect_hub_client(f"http://127.0.0.1:{port}", hf_home=tmp_path / "hf_home"):
        with pytest.raises(HubPushError, match=rf"could not reach the Hub at http://127.0.0.1:{port}") as info:
            push_folder(folder, TRAINED_REPO, token=DEFAULT_TOKEN)
    assert "the local folder is unchanged" in str(info.value) and "push_to_hub.py" in str(info.value)
    assert tree_hashes(folder) == before


def test_rejected_token_is_clear(hub: HubStandIn, trained: tuple[Path, str], api: HfApi) -> None:
    with pytest.raises(HubPushError, match=r"refused the token \(HTTP 401"):
        push_folder(trained[0], f"{DEFAULT_USER}/bad-token", token="hf_not_a_valid_token")
    assert not api.repo_exists(f"{DEFAULT_USER}/bad-token")
