"""The Hub stand-in (``ddl_transformers.testing.hub_standin``) driven by the *real* ``huggingface_hub`` client.

Client code runs in subprocesses whose environment (from ``HubStandIn.client_env``) sets ``HF_ENDPOINT`` before
``huggingface_hub`` is imported, a fresh ``HF_HOME`` and ``HF_HUB_OFFLINE=0`` (conftest sets it to 1 for this
process). One test checks the in-process alternative, ``redirect_hub_client``, with ``transformers``' own
``push_to_hub`` / ``from_pretrained``.
"""

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from ddl_transformers.testing import hub_standin
from ddl_transformers.testing.hub_standin import DEFAULT_TOKEN, DEFAULT_USER, HubStandIn, redirect_hub_client

CLIENT_TIMEOUT = 180


def run_client(script: str, env: dict[str, str], workdir: Path) -> dict:
    """Run ``script`` in a fresh interpreter (argv[1] = ``workdir``); it must print ``RESULT=<json>`` last."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**env, "STANDIN_TOKEN": DEFAULT_TOKEN, "STANDIN_USER": DEFAULT_USER}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(workdir)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    assert results, f"client printed no RESULT line:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(results[-1].removeprefix("RESULT="))


ROUNDTRIP_CLIENT = r"""
import json, os, shutil, sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

token, user, work = os.environ["STANDIN_TOKEN"], os.environ["STANDIN_USER"], Path(sys.argv[1])
api = HfApi(token=token)
out = {}

# -- repos: public with an explicit namespace, private with the namespace taken from the token
public = api.create_repo(f"{user}/ddl-public").repo_id
private = api.create_repo("ddl-private", private=True).repo_id
assert private == f"{user}/ddl-private", private
assert api.repo_info(public).private is False and api.repo_info(private).private is True
try:
    api.create_repo(public)
    raise AssertionError("creating an existing repo must fail")
except HfHubHTTPError as err:
    assert err.response.status_code == 409
assert api.create_repo(public, exist_ok=True).repo_id == public

# -- first commit: a checkpoint folder (safetensors of a few MB, config, code, card) in one commit
ckpt = work / "checkpoint"
ckpt.mkdir()
weights = {"embed.weight": np.random.default_rng(0).standard_normal((768, 1024), dtype=np.float32)}
save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
(ckpt / "config.json").write_text(json.dumps({"model_type": "ddl", "architectures": ["DDLForCausalLM"], "v": 1}))
(ckpt / "modeling_ddl.py").write_text("HIDDEN = 1024\n")
(ckpt / "README.md").write_text("---\nlibrary_name: transformers\nlicense: apache-2.0\n---\n\n# DDL test card\n")
first = api.upload_folder(
    folder_path=ckpt, repo_id=public, commit_message="Upload DDL checkpoint", commit_description="first push"
)
v1 = work / "v1"
shutil.copytree(ckpt, v1)
files = [".gitattributes", "README.md", "config.json", "model.safetensors", "modeling_ddl.py"]
assert api.list_repo_files(public) == files, api.list_repo_files(public)

# -- second commit: only the changed file goes in (the client compares the preupload oids)
(ckpt / "config.json").write_text(json.dumps({"model_type": "ddl", "architectures": ["DDLForCausalLM"], "v": 2}))
second = api.upload_folder(folder_path=ckpt, repo_id=public, commit_message="Update config")
assert second.oid != first.oid
commits = api.list_repo_commits(public)
assert [c.title for c in commits] == ["Update config", "Upload DDL checkpoint", "initial commit"], commits
assert commits[1].message == "first push"
last = {f.path: f.last_commit.title for f in api.list_repo_tree(public, expand=True)}
assert last["config.json"] == "Update config" and last["model.safetensors"] == "Upload DDL checkpoint", last

# -- push to a new branch with `revision=` (like the Hub, the branch must be created first)
try:
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public, revision="no-such-branch")
    raise AssertionError("a commit to a missing branch must fail")
except RevisionNotFoundError as err:
    assert err.response.status_code == 404
api.create_branch(public, branch="dev")
(ckpt / "modeling_ddl.py").write_text("HIDDEN = 2048\n")
dev = api.upload_folder(folder_path=ckpt, repo_id=public, revision="dev", commit_message="Wider model on dev")
refs = api.list_repo_refs(public)
assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "dev": dev.oid}, refs
assert api.repo_info(public, revision="dev").sha == dev.oid
assert api.list_repo_files(public, revision="dev") == files

# -- downloads (bytes compared): single files, an older commit, whole snapshots of main and dev
for name in files[1:]:
    expected = (v1 if name == "modeling_ddl.py" else ckpt) / name
    assert Path(hf_hub_download(public, name)).read_bytes() == expected.read_bytes(), name
old = hf_hub_download(public, "config.json", revision=first.oid)
assert Path(old).read_bytes() == (v1 / "config.json").read_bytes()
main_dir = Path(snapshot_download(public))
dev_dir = Path(snapshot_download(public, revision="dev"))
assert sorted(p.name for p in main_dir.iterdir()) == files
assert (main_dir / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
assert (main_dir / "modeling_ddl.py").read_text() == "HIDDEN = 1024\n"
assert (dev_dir / "modeling_ddl.py").read_text() == "HIDDEN = 2048\n"
assert (dev_dir / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
assert main_dir.name == second.oid and dev_dir.name == dev.oid
info = api.model_info(public, files_metadata=True)
sizes = {s.rfilename: s.size for s in info.siblings}
assert sizes["model.safetensors"] == (ckpt / "model.safetensors").stat().st_size
assert info.sha == second.oid and info.library_name == "transformers" and info.config["model_type"] == "ddl"

# -- the model card
card = ModelCard.load(public)
assert card.data.library_name == "transformers" and "# DDL test card" in card.text

# -- private repo: readable with the token only
api.upload_file(path_or_fileobj=b'{"secret": 1}', path_in_repo="config.json", repo_id=private)
assert Path(hf_hub_download(private, "config.json", token=token)).read_bytes() == b'{"secret": 1}'
try:
    hf_hub_download(private, "README.md", token=False)
    raise AssertionError("private repo must not be readable without a token")
except RepositoryNotFoundError as err:
    assert err.response.status_code == 401

# -- writes without a token / with a wrong token fail with the client's usual errors
anonymous = HfApi(token=False)
try:
    anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public)
    raise AssertionError("an anonymous upload must fail")
except RepositoryNotFoundError as err:
    assert err.response.status_code == 401 and "Invalid username or password." in str(err)
    out["anonymous_upload_error"] = type(err).__name__
try:
    anonymous.create_repo(f"{user}/anonymous")
    raise AssertionError("an anonymous create_repo must fail")
except HfHubHTTPError as err:
    assert err.response.status_code == 401
try:
    HfApi(token="hf_not_a_valid_token").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public)
    raise AssertionError("a bad token must fail")
except HfHubHTTPError as err:
    assert err.response.status_code == 401 and not isinstance(err, RepositoryNotFoundError)
assert api.list_repo_files(public) == files  # nothing was written

out.update(first=first.oid, second=second.oid, dev=dev.oid, public=public, private=private)
print("RESULT=" + json.dumps(out))
"""


def test_roundtrip_with_real_client(tmp_path: Path) -> None:
    with HubStandIn(tmp_path / "hub") as hub:
        result = run_client(ROUNDTRIP_CLIENT, hub.client_env(tmp_path / "hf_home"), tmp_path / "client")
        assert hub.unhandled == []
        assert result["anonymous_upload_error"] == "RepositoryNotFoundError"

        # storage: one folder per revision, one manifest per commit, a commit log
        repo_dir = tmp_path / "hub" / "repos" / "model" / DEFAULT_USER / "ddl-public"
        for key in ("first", "second", "dev"):
            assert (repo_dir / "snapshots" / result[key] / "config.json").is_file()
        log = [json.loads(line) for line in (repo_dir / "commit_log.jsonl").read_text().splitlines()]
        assert [entry["title"] for entry in log] == [
            "initial commit",
            "Upload DDL checkpoint",
            "Update config",
            "Wider model on dev",
        ]
        assert all(entry["author"] == DEFAULT_USER for entry in log)
        manifest = json.loads((repo_dir / "commits" / f"{result['second']}.json").read_text())
        assert manifest["parents"] == [result["first"]]

        # the client's protocol, as seen from the server
        calls = {(r.method, r.path.split("?")[0], r.status) for r in hub.requests}
        assert ("POST", f"/api/models/{DEFAULT_USER}/ddl-public/preupload/main", 401) in calls
        assert ("POST", f"/api/models/{DEFAULT_USER}/ddl-public/commit/dev", 200) in calls
        assert ("HEAD", f"/{DEFAULT_USER}/ddl-public/resolve/main/model.safetensors", 200) in calls
        assert not any("/info/lfs/" in r.path or "xet" in r.path for r in hub.requests)  # all "regular" uploads


LFS_CLIENT = r"""
import hashlib, json, os, sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download

assert constants.HF_HUB_DISABLE_XET
token, user, work = os.environ["HF_TOKEN"], os.environ["STANDIN_USER"], Path(sys.argv[1])
api = HfApi()  # token from HF_TOKEN
repo = api.create_repo(f"{user}/ddl-lfs", private=True).repo_id
ckpt = work / "checkpoint"
ckpt.mkdir()
weights = np.random.default_rng(1).standard_normal((768, 1024), dtype=np.float32)
save_file({"w": weights}, str(ckpt / "model.safetensors"))
save_file({"b": np.zeros(8, dtype=np.float32)}, str(ckpt / "bias.safetensors"))
(ckpt / "config.json").write_text(json.dumps({"model_type": "ddl"}))
api.upload_folder(folder_path=ckpt, repo_id=repo, commit_message="LFS upload")
# same content under a new name: the LFS batch answers "already stored", nothing is re-sent
api.upload_file(path_or_fileobj=ckpt / "model.safetensors", path_in_repo="copy/model.safetensors", repo_id=repo)

tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "lfs")}
for name in ("model.safetensors", "bias.safetensors", "copy/model.safetensors"):
    local = ckpt / name.split("/")[-1]
    sha256 = hashlib.sha256(local.read_bytes()).hexdigest()
    assert tree[name].lfs is not None and tree[name].lfs.sha256 == sha256 and tree[name].size == local.stat().st_size
    meta = get_hf_file_metadata(hf_hub_url(repo, name), token=token)
    assert meta.etag == sha256 and meta.size == local.stat().st_size, meta
    assert Path(hf_hub_download(repo, name)).read_bytes() == local.read_bytes(), name
assert tree["config.json"].lfs is None
snapshot = Path(snapshot_download(repo))
assert (snapshot / "copy" / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
print("RESULT=" + json.dumps({"repo": repo}))
"""


def _loopback_name(name: str) -> str | None:
    try:
        return name if socket.gethostbyname(name) == "127.0.0.1" else None
    except OSError:
        return None


def test_lfs_protocol_with_xet_disabled(tmp_path: Path) -> None:
    redirect_host = _loopback_name("localhost")  # a second host name for 127.0.0.1 plays the CDN
    hub = HubStandIn(
        upload_mode="lfs",
        lfs_redirect_host=redirect_host,
        lfs_multipart_threshold=1 << 20,
        lfs_multipart_chunk_size=1 << 20,
    )
    with hub:
        env = hub.client_env(tmp_path / "hf_home", token=DEFAULT_TOKEN)  # HF_TOKEN: downloads of the private repo
        assert env["HF_HUB_DISABLE_XET"] == "1"
        run_client(LFS_CLIENT, env, tmp_path / "client")
        assert hub.unhandled == []
        paths = [(r.method, r.path.split("?")[0], r.status, r.authorized) for r in hub.requests]
        batches = [p for p in paths if p[1].endswith(".git/info/lfs/objects/batch")]
        assert len(batches) == 2 and all(p[2] == 200 for p in batches)
        parts = [p for p in paths if p[0] == "PUT" and "/part/" in p[1]]
        # 3 MiB of weights + the safetensors header, in 1 MiB parts; pre-signed URLs: the client sends no token
        assert len(parts) == 4 and not any(p[3] for p in parts)
        assert sum(p[0] == "POST" and p[1].startswith("/__standin/lfs/") for p in paths) == 1  # multipart completion
        assert sum(p[0] == "PUT" and p[1].startswith("/__standin/lfs/") and "/part/" not in p[1] for p in paths) == 1
        assert sum(p[1].endswith("/objects/verify") for p in paths) == 2
        if redirect_host:
            cdn = [p for p in paths if p[1].startswith("/__standin/cdn/")]
            assert cdn and not any(p[3] for p in cdn)  # like a CDN: the client drops its token off the Hub host
            assert any(p[0] == "HEAD" and p[2] == 302 for p in paths)
        assert not (hub.storage / "tmp").exists() or not any((hub.storage / "tmp").iterdir())
    assert not hub.storage.exists()  # temporary storage removed by stop()


MORE_ENDPOINTS_CLIENT = r"""
import json, os, sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

api = HfApi(token=os.environ["STANDIN_TOKEN"])
user = os.environ["STANDIN_USER"]
assert api.whoami()["name"] == user
repo = api.create_repo(f"{user}/misc").repo_id
add = [CommitOperationAdd("a/b.txt", b"hi"), CommitOperationAdd("a/c.txt", b"world"), CommitOperationAdd("d", b"\0")]
first = api.create_commit(repo, operations=add, commit_message="add")
ops = [CommitOperationCopy("a/b.txt", "e/b2.txt"), CommitOperationDelete("a/c.txt"), CommitOperationDelete("d")]
second = api.create_commit(repo, operations=ops, commit_message="copy + delete")
assert api.list_repo_files(repo) == [".gitattributes", "a/b.txt", "e/b2.txt"]
info = {f.path: type(f).__name__ for f in api.get_paths_info(repo, ["a", "e/b2.txt", "missing"])}
assert info == {"a": "RepoFolder", "e/b2.txt": "RepoFile"}, info

pr = api.create_commit(repo, operations=[CommitOperationAdd("pr.txt", b"pr")], commit_message="PR", create_pr=True)
assert (pr.pr_num, pr.pr_revision) == (1, "refs/pr/1") and "pr.txt" not in api.list_repo_files(repo)
assert "pr.txt" in api.list_repo_files(repo, revision="refs/pr/1")
try:
    stale = [CommitOperationAdd("x", b"x")]
    api.create_commit(repo, operations=stale, commit_message="stale", parent_commit=first.oid)
    raise AssertionError("a stale parent_commit must fail")
except HfHubHTTPError as err:
    assert err.response.status_code == 412
api.create_commit(repo, operations=[CommitOperationAdd("x", b"x")], commit_message="fresh", parent_commit=second.oid)

api.create_tag(repo, tag="v1.0", revision=first.oid)
assert Path(hf_hub_download(repo, "a/c.txt", revision="v1.0")).read_bytes() == b"world"
assert api.file_exists(repo, "x") and not api.file_exists(repo, "missing")
assert api.revision_exists(repo, "v1.0") and not api.revision_exists(repo, "missing")
api.create_branch(repo, branch="tmp")
api.delete_branch(repo, branch="tmp")
api.delete_tag(repo, tag="v1.0")
refs = api.list_repo_refs(repo)
assert [b.name for b in refs.branches] == ["main"] and refs.tags == []

api.update_repo_settings(repo, private=True)
assert api.model_info(repo).private and not HfApi(token=False).repo_exists(repo)
assert [m.id for m in api.list_models(author=user)] == [repo]

dataset = api.create_repo(f"{user}/table", repo_type="dataset").repo_id
api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=dataset, repo_type="dataset")
assert Path(hf_hub_download(dataset, "data.csv", repo_type="dataset")).read_bytes() == b"a,b\n1,2\n"
assert api.dataset_info(dataset).sha == api.list_repo_commits(dataset, repo_type="dataset")[0].commit_id

api.delete_repo(repo)
assert not api.repo_exists(repo)
print("RESULT=" + json.dumps({"repo": repo}))
"""


def test_commit_operations_refs_and_settings(tmp_path: Path) -> None:
    """Copy/delete operations, PR commits, ``parent_commit``, tags, branch deletion, settings, datasets, deletion."""
    with HubStandIn() as hub:
        run_client(MORE_ENDPOINTS_CLIENT, hub.client_env(tmp_path / "hf_home"), tmp_path / "client")
        assert hub.unhandled == []


STANDALONE_CLIENT = r"""
import json, os, sys
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download

api = HfApi(token=os.environ["STANDIN_TOKEN"])
repo = api.create_repo(f"{os.environ['STANDIN_USER']}/standalone").repo_id
api.upload_file(path_or_fileobj=b"# standalone\n", path_in_repo="README.md", repo_id=repo, commit_message="Add card")
assert Path(hf_hub_download(repo, "README.md")).read_bytes() == b"# standalone\n"
print("RESULT=" + json.dumps({"repo": repo}))
"""


def test_standalone_server_process(tmp_path: Path) -> None:
    # The module only needs the standard library, so it can run as a script; `python -m
    # ddl_transformers.testing.hub_standin` works the same but first imports the package (torch, transformers).
    storage = tmp_path / "hub"
    server = subprocess.Popen(
        [sys.executable, hub_standin.__file__, "--port", "0", "--storage", str(storage)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([server.stdout], [], [], 60)
        assert ready, "the stand-in did not start"
        line = server.stdout.readline().strip()
        assert line.startswith("HUB_STANDIN_URL=http://127.0.0.1:"), line + server.stderr.read()
        url = line.removeprefix("HUB_STANDIN_URL=")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=url,
            HF_HOME=str(tmp_path / "hf_home"),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
        )
        result = run_client(STANDALONE_CLIENT, env, tmp_path / "client")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        server.stdout.close()
        server.stderr.close()

    # the storage outlives the process: a new stand-in on the same folder serves the same repo
    with HubStandIn(storage) as hub, redirect_hub_client(hub.url, hf_home=tmp_path / "hf_home2"):
        from huggingface_hub import HfApi, hf_hub_download

        assert HfApi().list_repo_files(result["repo"]) == [".gitattributes", "README.md"]
        assert Path(hf_hub_download(result["repo"], "README.md")).read_bytes() == b"# standalone\n"
    assert storage.is_dir()  # a caller-provided storage folder is kept


def test_in_process_redirection_with_transformers(tmp_path: Path) -> None:
    """``redirect_hub_client`` re-points this (already imported) process; transformers' push/load go through it."""
    import torch
    from huggingface_hub import constants
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    endpoint_before, offline_before = constants.ENDPOINT, constants.HF_HUB_OFFLINE
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=8, n_positions=16, bos_token_id=0, eos_token_id=0)
    )
    vocab = {"[UNK]": 0, "[PAD]": 1, "deep": 2, "delta": 3, "learning": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    repo = f"{DEFAULT_USER}/tiny-gpt2"
    cache = tmp_path / "hf_home" / "hub"

    with HubStandIn() as hub, redirect_hub_client(hub.url, hf_home=tmp_path / "hf_home"):
        assert constants.ENDPOINT == hub.url and not constants.HF_HUB_OFFLINE
        model.push_to_hub(repo, token=DEFAULT_TOKEN, commit_message="tiny model")
        tokenizer.push_to_hub(repo, token=DEFAULT_TOKEN, commit_message="tokenizer")
        model.push_to_hub(repo, token=DEFAULT_TOKEN, revision="v2", commit_message="same model on a branch")

        loaded = AutoModelForCausalLM.from_pretrained(repo)
        on_branch = AutoModelForCausalLM.from_pretrained(repo, revision="v2")
        loaded_tokenizer = AutoTokenizer.from_pretrained(repo)
        assert hub.unhandled == []
    assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE) == (endpoint_before, offline_before)  # restored
    assert any(cache.glob("models--*tiny-gpt2/snapshots/*/model.safetensors"))

    ids = torch.tensor([[2, 3, 4]])
    for other in (loaded, on_branch):
        torch.testing.assert_close(other.eval()(ids).logits, model.eval()(ids).logits)
    assert loaded_tokenizer("deep delta learning").input_ids == [2, 3, 4]


def test_bad_requests_are_answered_in_hub_style(tmp_path: Path) -> None:
    """Plain HTTP checks of a few error shapes the client relies on (no client library involved)."""
    import http.client

    with HubStandIn(tmp_path / "hub") as hub:
        port = int(hub.url.rsplit(":", 1)[1])

        def request(method: str, path: str, body: bytes | None = None, token: str | None = None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            conn.close()
            return response.status, dict(response.getheaders()), data

        status, headers, _ = request("HEAD", f"/{DEFAULT_USER}/missing/resolve/main/config.json")
        assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
        status, _, body = request("POST", "/api/repos/create", json.dumps({"name": "r"}).encode(), DEFAULT_TOKEN)
        assert status == 200 and json.loads(body)["url"] == f"{hub.url}/{DEFAULT_USER}/r"
        status, headers, _ = request("HEAD", f"/{DEFAULT_USER}/r/resolve/main/nope.txt")
        assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound") and len(headers["X-Repo-Commit"]) == 40
        status, headers, _ = request("HEAD", f"/{DEFAULT_USER}/r/resolve/nope/.gitattributes")
        assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
        status, headers, _ = request("HEAD", f"/{DEFAULT_USER}/r/resolve/main/.gitattributes")
        assert (
            status == 200
            and headers["ETag"].strip('"')
            == hashlib.sha1(
                b"blob %d\0" % int(headers["Content-Length"]) + hub_standin.DEFAULT_GITATTRIBUTES.encode()
            ).hexdigest()
        )
        status, headers, body = request("GET", f"/{DEFAULT_USER}/r/resolve/main/.gitattributes")
        assert body == hub_standin.DEFAULT_GITATTRIBUTES.encode()
        status, _, body = request(
            "POST",
            "/api/repos/create",
            json.dumps({"name": "r2", "organization": "someone-else"}).encode(),
            DEFAULT_TOKEN,
        )
        assert status == 403
        # a chunked request body (what httpx sends for file-like bodies without a known length)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST", "/api/validate-yaml", body=iter([b'{"content": ', b'"---\\nx: 1\\n"}']), encode_chunked=True
        )
        response = conn.getresponse()
        assert response.status == 400 and "missing closing" in json.loads(response.read())["errors"][0]["message"]
        conn.request("GET", "/__standin/health")  # same keep-alive connection: the chunked body was fully consumed
        assert conn.getresponse().status == 200
        conn.close()
        status, _, _ = request("GET", "/api/spaces/x/y/no-such-endpoint")
        assert status == 404 and hub.unhandled == ["GET /api/spaces/x/y/no-such-endpoint"]


def test_binds_loopback_only() -> None:
    with HubStandIn() as hub:
        assert hub.url.startswith("http://127.0.0.1:")
        assert hub._server is not None and hub._server.server_address[0] == "127.0.0.1"
