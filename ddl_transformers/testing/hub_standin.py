"""TEST STAND-IN for the Hugging Face Hub HTTP API.

This module is **not** the Hugging Face Hub and does not try to be one. It is a small local HTTP server, written with
the standard library only (``http.server.ThreadingHTTPServer``), that answers just enough of the Hub's HTTP API for the
*real* ``huggingface_hub`` client (and ``transformers``, which goes through it) to create repos, push commits and
download files in tests, without network access. Point a client at it with the ``HF_ENDPOINT`` environment variable,
set before ``huggingface_hub`` is imported (the client reads it into ``huggingface_hub.constants`` at import time),
e.g. in a subprocess started with the environment returned by :meth:`HubStandIn.client_env`. It only ever binds
``127.0.0.1``.

What it implements (request shapes taken from the installed ``huggingface_hub`` 2.x sources: ``hf_api.py``,
``_commit_api.py``, ``_upload_pipeline.py``, ``lfs.py``, ``file_download.py``, ``utils/_http.py``):

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``PUT /api/{type}s/{repo}/settings`` (private flag);
  a new repo gets an "initial commit" holding the Hub's default ``.gitattributes``, as on the Hub.
* repo/model info: ``GET /api/{type}s/{repo}`` and ``GET /api/{type}s/{repo}/revision/{rev}`` (``sha``, ``private``,
  ``siblings`` with ``?blobs=True`` sizes / LFS info, ``config`` from ``config.json``), ``GET /api/{type}s`` (list).
* tree listing ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``expand``, Link-header pagination),
  ``POST /api/{type}s/{repo}/paths-info/{rev}``, ``GET /api/{type}s/{repo}/commits/{rev}``,
  ``GET /api/{type}s/{repo}/refs``.
* branches and tags: ``POST|DELETE /api/{type}s/{repo}/branch/{branch}``, ``POST /api/{type}s/{repo}/tag/{rev}``,
  ``DELETE /api/{type}s/{repo}/tag/{tag}``. As on the Hub, committing to a branch that does not exist fails with
  ``RevisionNotFound`` (``transformers``' ``push_to_hub(revision=...)`` calls ``create_branch`` first).
* uploads: ``POST /api/{type}s/{repo}/preupload/{rev}`` then ``POST /api/{type}s/{repo}/commit/{rev}`` (ndjson:
  ``header``, ``file`` (base64), ``lfsFile``, ``deletedFile``, ``deletedFolder``; ``parentCommit``; ``?create_pr=1``
  creates ``refs/pr/N``). Large files: the client decides between two protocols *on its own*, from whether the
  ``hf_xet`` package is importable and ``HF_HUB_DISABLE_XET`` is unset -- it does not negotiate with the server.
  The stand-in cannot serve the Xet protocol (a separate content-addressed storage service), so:

  - ``upload_mode="regular"`` (default): the preupload answer declares **every** file ``"regular"``, so the client
    sends all contents base64-encoded inside the commit payload and never touches LFS or Xet. This works whatever
    the client's Xet setting (with ``hf_xet`` installed, ``upload_folder`` takes the pipelined multi-commit path,
    which then only does preupload + commit). Fine for the few-MB files tests use; stored files are then "regular"
    (no ``lfs`` info in listings, ``ETag`` is the git blob sha1).
  - ``upload_mode="lfs"``: the preupload answer says ``"lfs"`` the way the Hub does (path matched by an
    ``filter=lfs`` pattern of the repo's ``.gitattributes``, a NUL byte in the 512-byte sample, or >= 10 MB). The
    client must then run with ``HF_HUB_DISABLE_XET=1`` (see :meth:`HubStandIn.client_env`) so that it uses the
    legacy git-LFS batch API, which is implemented:
    ``POST /{repo}.git/info/lfs/objects/batch`` (basic and multipart transfers; objects already stored get no
    actions), the signed ``PUT`` upload / part URLs and multipart completion ``POST`` under ``/__standin/lfs/``
    (the client sends no auth header there, like for S3 pre-signed URLs), and
    ``POST /{repo}.git/info/lfs/objects/verify``. A Xet-enabled client pointed at an ``"lfs"`` stand-in asks for
    ``GET /api/{type}s/{repo}/xet-write-token/{rev}``, which answers ``501`` (body: "set HF_HUB_DISABLE_XET=1");
    ``hf_xet`` then fails with a ``ConnectionError`` naming that URL and status.
* downloads: ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob sha1 for
  regular files), ``Content-Length``, ``Accept-Ranges``/``Range`` (``206``), and, for LFS files, ``X-Linked-Etag``
  (sha256) and ``X-Linked-Size``. With ``lfs_redirect_host="localhost"`` LFS files answer ``302`` to a signed
  ``/__standin/cdn/`` URL on that other host name (same socket), which the client treats like the Hub's CDN
  redirect: it reads the ``X-Linked-*`` metadata from the redirect and downloads without sending its token. No
  ``X-Xet-Hash`` header is ever sent, so downloads always use plain HTTP.
* auth: ``Authorization: Bearer <token>``, tokens mapped to user names (default ``hf_standin_token`` ->
  ``standin-user``; ``orgs`` maps organisation -> members). Writes need a token whose user owns the namespace.
  Errors follow the Hub's style (``X-Error-Code`` / ``X-Error-Message`` headers and ``{"error": ...}`` bodies) so the
  client raises its usual exceptions: a write without token answers ``401`` ``Invalid username or password.`` with
  ``X-Error-Code: RepoNotFound`` (the real client maps 401s on repo URLs to ``RepositoryNotFoundError`` only for
  ``https`` endpoints, so the stand-in sends the code explicitly to get the same exception over ``http``); an
  unknown token answers ``401 Invalid credentials in Authorization header``; missing/private repos answer
  ``401``/``404`` ``RepoNotFound``, missing revisions ``404 RevisionNotFound``, missing files ``404 EntryNotFound``
  (with ``X-Repo-Commit``); ``create_repo`` on an existing repo ``409``; a stale ``parentCommit`` ``412``.
* small helpers the client calls along the way: ``GET /api/whoami-v2``, ``POST /api/validate-yaml`` (always valid,
  only an unterminated front matter is rejected), ``GET /api/agent-harnesses`` (empty registry).

Not implemented (answered ``404`` with an explanatory ``error``, and recorded in :attr:`HubStandIn.unhandled`): Xet,
discussions / pull-request API (``create_pull_request``; ``create_commit(create_pr=True)`` works), repo move,
Spaces runtime, collections, gating workflow, rate limits, squash/super-squash, the ``datasets-server``.

Storage is a directory: ``repos/{type}/{namespace}/{name}/`` holds ``meta.json``, ``refs.json`` (branches, tags,
PR refs), ``commits/{oid}.json`` (one manifest per commit: message, author, date, parent, file table),
``snapshots/{oid}/`` (one folder per revision with the full file tree; unchanged files are hard links to the parent's)
and ``commit_log.jsonl``; ``lfs/`` holds LFS objects by sha256. All state changes happen under one lock, enough for the
threads of one server process; do not point two live servers at the same directory. Restarting on the same directory
serves the same repos.

Usage::

    with HubStandIn() as hub:                        # or HubStandIn(storage_dir), HubStandIn(upload_mode="lfs")
        env = hub.client_env(tmp_path / "hf_home", token=DEFAULT_TOKEN)
        subprocess.run([sys.executable, "client.py"], env=env, check=True)
        assert hub.unhandled == []                   # every request the client made had a route
        hub.requests                                 # [RequestRecord(method, path, status, authorized), ...]

    python -m ddl_transformers.testing.hub_standin --port 0 --storage DIR   # prints HUB_STANDIN_URL=http://...
    python path/to/hub_standin.py ...            # same, without importing the ddl_transformers package (faster)

In a process that has already imported ``huggingface_hub``, :func:`redirect_hub_client` patches the module attributes
that froze ``HF_ENDPOINT`` (see its docstring for the list and the limits).

Other limitations: request bodies are held in memory (fine for test-sized files); tokens have no scopes (a valid
token of the namespace owner may do everything); ``lastCommit`` in expanded listings follows first parents only;
listings never carry ``xetHash``; repo names follow a simplified rule set.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import math
import mimetypes
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "HubStandIn", "RequestRecord", "main", "redirect_hub_client"]

DEFAULT_TOKEN = "hf_standin_token"
DEFAULT_USER = "standin-user"
HOST = "127.0.0.1"

UPLOAD_MODES = ("regular", "lfs")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MB and more in LFS whatever their name
_PAGE_SIZE = 1000
_PAGE_SIZE_EXPANDED = 50

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_OID_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA_PREFIX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_PR_RE = re.compile(r"^refs/pr/(\d+)$")

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- small helpers


class HubError(Exception):
    """An HTTP error answered in the Hub's style (``X-Error-Code`` / ``X-Error-Message`` + ``{"error": ...}``)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _file_hashes(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file, read in chunks."""
    size = path.stat().st_size
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    sha256 = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on"}


def _validate_repo_path(path: str) -> str:
    """A file path inside a repo: relative, no ``..``/``.`` segments, no ``.git`` folder."""
    path = path.lstrip("/")
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts) or parts[0] == ".git" or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _validate_repo_id(repo_id: str) -> tuple[str, str]:
    namespace, _, name = repo_id.partition("/")
    if not (_NAME_RE.match(namespace) and _NAME_RE.match(name)) or "--" in name or ".." in name:
        raise HubError(400, f"Invalid repo id: {repo_id!r}")
    return namespace, name


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _pattern_lines(text: str | None) -> list[str]:
    if not text:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _glob_match(path: str, pattern: str) -> bool:
    """Approximate gitignore/gitattributes matching: patterns without a slash match any path component."""
    anchored = pattern.startswith("/")
    pattern = pattern.strip("/")
    if not pattern:
        return False
    if "/" in pattern or anchored:
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.replace("**/", ""))
    return any(fnmatch.fnmatchcase(part, pattern) for part in path.split("/"))


def _gitignored(path: str, gitignore: str | None) -> bool:
    """Approximate ``.gitignore`` semantics (last matching pattern wins, ``!`` negates, ``dir/`` patterns)."""
    ignored = False
    parts = path.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    for pattern in _pattern_lines(gitignore):
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        if pattern.endswith("/"):
            hit = any(_glob_match(parent, pattern.rstrip("/")) for parent in parents)
        else:
            hit = any(_glob_match(candidate, pattern) for candidate in [path, *parents])
        if hit:
            ignored = not negate
    return ignored


def _lfs_tracked(path: str, gitattributes: str | None) -> bool:
    tracked = False
    for line in _pattern_lines(gitattributes):
        pattern, *attrs = line.split()
        if "filter=lfs" in attrs and _glob_match(path, pattern):
            tracked = True
        elif "-filter" in attrs and _glob_match(path, pattern):
            tracked = False
    return tracked


def _front_matter_value(readme: str, key: str) -> str | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.S)
    if not match:
        return None
    value = re.search(rf"^{re.escape(key)}:\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", match.group(1), flags=re.M)
    return value.group(1) if value else None


class RequestRecord(NamedTuple):
    """One request served by the stand-in (see :attr:`HubStandIn.requests`)."""

    method: str
    path: str  # path and query string, as sent
    status: int
    authorized: bool  # whether an ``Authorization`` header was sent


@dataclass
class _Resolved:
    oid: str
    kind: str  # "branch" | "tag" | "pr" | "commit"
    name: str


@dataclass
class _RepoKey:
    repo_type: str
    repo_id: str
    namespace: str = field(init=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.namespace, self.name = _validate_repo_id(self.repo_id)

    @property
    def url_path(self) -> str:
        return f"{_URL_PREFIXES[self.repo_type]}{self.repo_id}"


# ----------------------------------------------------------------------------------------------------------- storage


class _Store:
    """On-disk repos, commits, snapshots and LFS objects. Every public method takes ``self.lock``."""

    def __init__(self, root: Path, initial_gitattributes: bool = True):
        self.root = root
        self.initial_gitattributes = initial_gitattributes
        self.lock = threading.RLock()
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        for sub in ("repos", "lfs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # -- paths and small files

    def repo_dir(self, key: _RepoKey) -> Path:
        return self.root / "repos" / key.repo_type / key.namespace / key.name

    def exists(self, key: _RepoKey) -> bool:
        return (self.repo_dir(key) / "meta.json").is_file()

    def meta(self, key: _RepoKey) -> dict[str, Any]:
        return json.loads((self.repo_dir(key) / "meta.json").read_text())

    def _write_json(self, path: Path, data: Any) -> None:
        tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def write_meta(self, key: _RepoKey, meta: dict[str, Any]) -> None:
        with self.lock:
            self._write_json(self.repo_dir(key) / "meta.json", meta)

    def refs(self, key: _RepoKey) -> dict[str, dict[str, str]]:
        return json.loads((self.repo_dir(key) / "refs.json").read_text())

    def _write_refs(self, key: _RepoKey, refs: dict[str, dict[str, str]]) -> None:
        self._write_json(self.repo_dir(key) / "refs.json", refs)

    def lfs_path(self, oid: str) -> Path:
        return self.root / "lfs" / oid[:2] / oid

    def has_lfs(self, oid: str) -> bool:
        return bool(_OID_RE.match(oid)) and self.lfs_path(oid).is_file()

    def put_lfs_file(self, oid: str, src: Path) -> None:
        """Move ``src`` into the LFS store after checking its sha256."""
        _, sha256 = _file_hashes(src)
        if sha256 != oid:
            src.unlink(missing_ok=True)
            raise HubError(400, f"Uploaded content does not match oid {oid} (got sha256 {sha256})")
        dst = self.lfs_path(oid)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)

    def tmp_path(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    # -- repos

    def all_repos(self, repo_type: str) -> list[_RepoKey]:
        base = self.root / "repos" / repo_type
        if not base.is_dir():
            return []
        keys = [_RepoKey(repo_type, f"{ns.name}/{repo.name}") for ns in base.iterdir() for repo in ns.iterdir()]
        return sorted(keys, key=lambda k: k.repo_id)

    def create_repo(self, key: _RepoKey, *, private: bool, author: str, extra: dict[str, Any]) -> None:
        with self.lock:
            if self.exists(key):
                raise HubError(409, f"You already created this {key.repo_type} repo", headers={})
            repo_dir = self.repo_dir(key)
            (repo_dir / "commits").mkdir(parents=True, exist_ok=True)
            (repo_dir / "snapshots").mkdir(exist_ok=True)
            meta = {
                "id": key.repo_id,
                "type": key.repo_type,
                "uid": uuid.uuid4().hex[:24],
                "private": private,
                "gated": False,
                "createdAt": _now_iso(),
                **extra,
            }
            self._write_refs(key, {"branches": {}, "tags": {}, "pulls": {}})
            files: dict[str, Any] = {}
            contents: dict[str, bytes | str] = {}
            if self.initial_gitattributes:
                data = DEFAULT_GITATTRIBUTES.encode()
                files[".gitattributes"] = self._regular_entry(data)
                contents[".gitattributes"] = data
            oid = self._write_commit(key, None, files, contents, "initial commit", "", author)
            self._write_refs(key, {"branches": {"main": oid}, "tags": {}, "pulls": {}})
            self.write_meta(key, meta)  # written last: the repo "exists" once it is complete

    def delete_repo(self, key: _RepoKey) -> None:
        with self.lock:
            repo_dir = self.repo_dir(key)
            trash = self.tmp_path()
            os.replace(repo_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
            self._manifests = {k: v for k, v in self._manifests.items() if k[0] != str(repo_dir)}

    # -- revisions and commits

    def resolve(self, key: _RepoKey, revision: str) -> _Resolved | None:
        with self.lock:
            refs = self.refs(key)
            for prefix, kind, table in (
                ("", "branch", "branches"),
                ("refs/heads/", "branch", "branches"),
                ("", "tag", "tags"),
                ("refs/tags/", "tag", "tags"),
            ):
                if revision.startswith(prefix) and revision[len(prefix) :] in refs[table]:
                    name = revision[len(prefix) :]
                    return _Resolved(refs[table][name], kind, name)
            match = _PR_RE.match(revision)
            if match and match.group(1) in refs["pulls"]:
                return _Resolved(refs["pulls"][match.group(1)], "pr", match.group(1))
            if _SHA_PREFIX_RE.match(revision):
                hits = sorted(p.stem for p in (self.repo_dir(key) / "commits").glob(f"{revision}*.json"))
                if len(hits) == 1:
                    return _Resolved(hits[0], "commit", hits[0])
            return None

    def manifest(self, key: _RepoKey, oid: str) -> dict[str, Any]:
        cache_key = (str(self.repo_dir(key)), oid)
        with self.lock:
            if cache_key not in self._manifests:
                self._manifests[cache_key] = json.loads((self.repo_dir(key) / "commits" / f"{oid}.json").read_text())
            return self._manifests[cache_key]

    def snapshot(self, key: _RepoKey, oid: str) -> Path:
        return self.repo_dir(key) / "snapshots" / oid

    def read_file(self, key: _RepoKey, oid: str, path: str, limit: int = 1 << 20) -> str | None:
        entry = self.manifest(key, oid)["files"].get(path)
        if entry is None or entry["size"] > limit:
            return None
        return (self.snapshot(key, oid) / path).read_text(errors="replace")

    @staticmethod
    def _regular_entry(data: bytes) -> dict[str, Any]:
        sha1 = _git_blob_sha1(data)
        return {"size": len(data), "oid": sha1, "sha1": sha1, "sha256": hashlib.sha256(data).hexdigest(), "lfs": None}

    def _lfs_entry(self, oid: str) -> dict[str, Any]:
        path = self.lfs_path(oid)
        size = path.stat().st_size
        sha1, _ = _file_hashes(path)
        pointer = _lfs_pointer(oid, size)
        return {
            "size": size,
            "oid": _git_blob_sha1(pointer),
            "sha1": sha1,
            "sha256": oid,
            "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)},
        }

    def _write_commit(
        self,
        key: _RepoKey,
        parent: str | None,
        files: dict[str, Any],
        contents: dict[str, bytes | str],
        title: str,
        description: str,
        author: str,
    ) -> str:
        """Write snapshot + manifest of a new commit (refs untouched). ``contents``: path -> bytes | LFS oid."""
        date = _now_iso()
        header = json.dumps(
            [parent, sorted((p, e["oid"]) for p, e in files.items()), title, description, author, date]
        )
        oid = hashlib.sha1(f"commit {header} {uuid.uuid4().hex}".encode()).hexdigest()
        repo_dir = self.repo_dir(key)
        staging = self.tmp_path()
        staging.mkdir(parents=True)
        for path in files:
            dst = staging / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            content = contents.get(path)
            if isinstance(content, bytes):
                dst.write_bytes(content)
            elif isinstance(content, str):
                _link_or_copy(self.lfs_path(content), dst)
            else:
                assert parent is not None
                _link_or_copy(self.snapshot(key, parent) / path, dst)
        os.replace(staging, repo_dir / "snapshots" / oid)
        manifest = {
            "oid": oid,
            "parents": [parent] if parent else [],
            "title": title,
            "message": description,
            "author": author,
            "date": date,
            "files": files,
        }
        self._write_json(repo_dir / "commits" / f"{oid}.json", manifest)
        with (repo_dir / "commit_log.jsonl").open("a") as log:
            log.write(json.dumps({k: manifest[k] for k in ("oid", "parents", "title", "author", "date")}) + "\n")
        return oid

    def commit(
        self,
        key: _RepoKey,
        revision: str,
        operations: list[dict[str, Any]],
        *,
        title: str,
        description: str,
        author: str,
        parent_commit: str | None,
        create_pr: bool,
    ) -> tuple[str, int | None]:
        """Apply ndjson operations on top of ``revision``; returns (commit oid, PR number or None)."""
        with self.lock:
            target = self.resolve(key, revision)
            if target is None:
                raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            if not create_pr and target.kind not in ("branch", "pr"):
                raise HubError(400, f"Invalid rev id: {revision} is not a branch, cannot commit to it")
            if parent_commit is not None and not create_pr and parent_commit != target.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            base_oid = parent_commit if (create_pr and parent_commit) else target.oid
            if self.resolve(key, base_oid) is None:
                raise HubError(404, f"Invalid parent commit: {base_oid}", code="RevisionNotFound")
            files = dict(self.manifest(key, base_oid)["files"])
            contents: dict[str, bytes | str] = {}
            for op in operations:
                kind, value = op.get("key"), op.get("value") or {}
                if kind in ("file", "lfsFile"):
                    path = _validate_repo_path(str(value.get("path", "")))
                    if kind == "file":
                        raw = value.get("content", "")
                        data = base64.b64decode(raw) if value.get("encoding") == "base64" else str(raw).encode()
                        files[path], contents[path] = self._regular_entry(data), data
                    else:
                        oid = str(value.get("oid", ""))
                        if value.get("algo", "sha256") != "sha256" or not self.has_lfs(oid):
                            raise HubError(
                                400,
                                f"Your push was rejected because an LFS pointer pointed to a file that does not exist"
                                f" (path: {path}, oid: {oid})",
                            )
                        entry = self._lfs_entry(oid)
                        if value.get("size") is not None and int(value["size"]) != entry["size"]:
                            raise HubError(400, f"LFS object {oid} has size {entry['size']}, not {value['size']}")
                        files[path], contents[path] = entry, oid
                elif kind == "deletedFile":
                    path = _validate_repo_path(str(value.get("path", "")))
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del files[path]
                    contents.pop(path, None)
                elif kind == "deletedFolder":
                    prefix = _validate_repo_path(str(value.get("path", "")).rstrip("/")) + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {prefix}", code="EntryNotFound")
                    for p in doomed:
                        del files[p]
                        contents.pop(p, None)
                else:
                    raise HubError(400, f"Unknown commit operation key: {kind!r}")
            for path in files:
                parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
                if any(p in files for p in parents):
                    raise HubError(400, f"Path conflict: {path} is inside a file")
            oid = self._write_commit(key, base_oid, files, contents, title, description, author)
            refs = self.refs(key)
            pr_num: int | None = None
            if create_pr:
                pr_num = max((int(n) for n in refs["pulls"]), default=0) + 1
                refs["pulls"][str(pr_num)] = oid
            elif target.kind == "branch":
                refs["branches"][target.name] = oid
            else:
                refs["pulls"][target.name] = oid
            self._write_refs(key, refs)
            return oid, pr_num

    def set_ref(self, key: _RepoKey, table: str, name: str, oid: str | None, *, must_be_new: bool) -> None:
        with self.lock:
            refs = self.refs(key)
            if must_be_new and name in refs[table]:
                raise HubError(409, "Reference already exists")
            if oid is None:
                if name not in refs[table]:
                    raise HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
                del refs[table][name]
            else:
                refs[table][name] = oid
            self._write_refs(key, refs)

    def history(self, key: _RepoKey, oid: str) -> list[dict[str, Any]]:
        """First-parent history, newest first."""
        out = []
        current: str | None = oid
        while current:
            manifest = self.manifest(key, current)
            out.append(manifest)
            current = manifest["parents"][0] if manifest["parents"] else None
        return out


# --------------------------------------------------------------------------------------------------- tree formatting


def _tree_oid(files: Mapping[str, Any], folder: str) -> str:
    prefix = folder + "/"
    listing = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(prefix))
    return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


def _file_entry(path: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        out["lfs"] = dict(entry["lfs"])
    return out


def _folder_entry(files: Mapping[str, Any], folder: str) -> dict[str, Any]:
    return {"type": "directory", "oid": _tree_oid(files, folder), "size": 0, "path": folder}


def _tree_listing(files: Mapping[str, Any], folder: str, recursive: bool) -> list[dict[str, Any]] | None:
    prefix = f"{folder}/" if folder else ""
    folders: set[str] = set()
    entries = []
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            if recursive or depth == 1:
                folders.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(_file_entry(path, files[path]))
    if folder and not entries and not folders:
        return None
    return sorted(
        [_folder_entry(files, f) for f in folders] + entries, key=lambda e: (e["type"] != "directory", e["path"])
    )


# ------------------------------------------------------------------------------------------------------ HTTP handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubStandIn/1.0"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    server: _Server

    # -- plumbing

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.standin.verbose:
            sys.stderr.write(f"[hub-standin] {self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    @property
    def standin(self) -> HubStandIn:
        return self.server.standin

    @property
    def store(self) -> _Store:
        return self.server.standin._store

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline(1 << 16).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1 << 16)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        self._status = 0
        try:
            self.body = self._read_body()
            split = urlsplit(self.path)
            self.raw_path = split.path
            self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:
            if self._status:  # a response was already (partly) sent: all we can do is drop the connection
                self.close_connection = True
                raise
            if isinstance(err, HubError):
                self._send_error(err)
            elif isinstance(err, (json.JSONDecodeError, ValueError, KeyError, TypeError)):
                self._send_error(HubError(400, f"Bad request: {type(err).__name__}: {err}"))
            else:  # pragma: no cover - a bug in the stand-in: answer 500 and let socketserver print the traceback
                self._send_error(HubError(500, f"Hub stand-in internal error: {type(err).__name__}: {err}"))
                raise
        finally:
            record = RequestRecord(self.command, self.path, self._status, "Authorization" in self.headers)
            self.standin._record(record)

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self._status = status
        self.send_response(status)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-Request-Id": uuid.uuid4().hex,
            **(headers or {}),
        }
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, err.status, headers)

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or f'{HOST}:{self.server.server_address[1]}'}"

    def _json_body(self) -> Any:
        return json.loads(self.body or b"{}")

    # -- auth

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.standin.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _may_write(self, namespace: str, user: str | None) -> bool:
        return user is not None and (namespace == user or user in self.standin.orgs.get(namespace, ()))

    def _not_found(self, user: str | None) -> HubError:
        if user is None:
            return HubError(401, "Invalid username or password.", code="RepoNotFound")
        return HubError(404, "Repository not found", code="RepoNotFound")

    def _check_read(self, key: _RepoKey) -> str | None:
        user = self._user()
        if not self.store.exists(key) or (
            self.store.meta(key)["private"] and not self._may_write(key.namespace, user)
        ):
            raise self._not_found(user)
        return user

    def _check_write(self, key: _RepoKey) -> str:
        user = self._user()
        if user is None or not self.store.exists(key):
            raise self._not_found(user)
        if not self._may_write(key.namespace, user):
            if self.store.meta(key)["private"]:
                raise self._not_found(user)
            raise HubError(403, f"You don't have the rights to write to the {key.repo_type} {key.repo_id}")
        return user

    def _resolve(self, key: _RepoKey, revision: str) -> _Resolved:
        resolved = self.store.resolve(key, revision)
        if resolved is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return resolved

    # -- routing

    def _route(self) -> None:
        method = self.command
        segments = [unquote(s) for s in self.raw_path.split("/")[1:]]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]

        if segments[:1] == ["api"]:
            return self._route_api(method, segments[1:])
        if segments[:1] == ["__standin"]:
            return self._route_internal(method, segments[1:])

        # git-LFS batch API: /{prefix}{ns}/{name}.git/info/lfs/objects/{batch|verify}
        match = re.match(
            r"^/(?:(datasets|spaces|kernels)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/(batch|verify)$", self.raw_path
        )
        if match and method == "POST":
            repo_type = _REPO_TYPES[match.group(1)] if match.group(1) else "model"
            key = _RepoKey(repo_type, f"{unquote(match.group(2))}/{unquote(match.group(3))}")
            return self._lfs_batch(key) if match.group(4) == "batch" else self._lfs_verify(key)

        # file resolution: /{prefix}{ns}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if segments and segments[0] in _REPO_TYPES and segments[0] != "models" and len(segments) > 3:
            repo_type, segments = _REPO_TYPES[segments[0]], segments[1:]
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            key = _RepoKey(repo_type, f"{segments[0]}/{segments[1]}")
            return self._resolve_file(key, segments[3], "/".join(segments[4:]))
        return self._unhandled()

    def _unhandled(self) -> None:
        self.standin.unhandled.append(f"{self.command} {self.path}")
        raise HubError(404, f"Hub stand-in: no route for {self.command} {self.raw_path} (not implemented)")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["agent-harnesses"] and method == "GET":
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if not seg or seg[0] not in _REPO_TYPES:
            return self._unhandled()
        repo_type = _REPO_TYPES[seg[0]]
        if len(seg) == 1 and method == "GET":
            return self._list_repos(repo_type)
        if len(seg) < 3:
            return self._unhandled()
        key = _RepoKey(repo_type, f"{seg[1]}/{seg[2]}")
        action, rest = (seg[3], seg[4:]) if len(seg) > 3 else ("", [])
        arg = rest[0] if rest else None

        if method == "GET" and action == "":
            return self._repo_info(key, None)
        if method == "GET" and action == "revision" and arg:
            return self._repo_info(key, "/".join(rest))
        if method == "GET" and action == "tree" and arg:
            return self._tree(key, arg, "/".join(rest[1:]))
        if method == "POST" and action == "paths-info" and arg:
            return self._paths_info(key, arg)
        if method == "POST" and action == "preupload" and arg:
            return self._preupload(key, arg)
        if method == "POST" and action == "commit" and arg:
            return self._commit(key, arg)
        if method == "GET" and action == "refs":
            return self._refs(key)
        if method == "GET" and action == "commits" and arg:
            return self._commits(key, arg)
        if action == "branch" and arg and method in ("POST", "DELETE"):
            return self._branch(key, "/".join(rest), method)
        if action == "tag" and arg and method in ("POST", "DELETE"):
            return self._tag(key, "/".join(rest), method)
        if method == "PUT" and action == "settings":
            return self._settings(key)
        if action in ("xet-write-token", "xet-read-token"):
            raise HubError(
                501,
                "The Hub stand-in does not implement the Xet storage protocol. Run the client with"
                " HF_HUB_DISABLE_XET=1"
                " (legacy LFS uploads), or use the stand-in's default upload_mode='regular'.",
            )
        return self._unhandled()

    def _route_internal(self, method: str, seg: list[str]) -> None:
        if seg == ["health"]:
            return self._send_json({"ok": True})
        if len(seg) >= 2 and seg[0] == "lfs" and _OID_RE.match(seg[1]):
            oid = seg[1]
            if len(seg) == 2 and method == "PUT":
                return self._lfs_put(oid)
            if len(seg) == 2 and method == "POST":
                return self._lfs_complete(oid)
            if len(seg) == 4 and seg[2] == "part" and seg[3].isdigit() and method == "PUT":
                return self._lfs_put_part(oid, int(seg[3]))
        if len(seg) == 2 and seg[0] == "cdn" and _OID_RE.match(seg[1]) and method in ("GET", "HEAD"):
            return self._cdn(seg[1])
        return self._unhandled()

    # -- account / misc

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        orgs = [
            {"type": "org", "name": org, "roleInOrg": "write"} for org, m in self.standin.orgs.items() if user in m
        ]
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "hub-standin", "role": "write"}},
            }
        )

    def _validate_yaml(self) -> None:
        content = str(self._json_body().get("content", ""))
        if content.startswith("---") and not re.match(r"^---\s*\n.*?\n---\s*(\n|$)", content, flags=re.S):
            return self._send_json({"errors": [{"message": "Invalid YAML front matter: missing closing '---'"}]}, 400)
        self._send_json({"errors": [], "warnings": []})

    # -- repos

    def _create_repo(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        namespace = payload.get("organization") or user
        key = _RepoKey(repo_type, f"{namespace}/{payload.get('name', '')}")
        if not self._may_write(key.namespace, user):
            raise HubError(
                403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'
            )
        if repo_type == "space" and payload.get("sdk") is None:
            raise HubError(400, "Space SDK is required")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{self.base_url}/{key.url_path}"
        extra = {"sdk": payload["sdk"]} if payload.get("sdk") else {}
        try:
            self.store.create_repo(key, private=private, author=user, extra=extra)
        except HubError as err:
            if err.status == 409:
                return self._send_json({"error": err.message, "url": url}, 409, {"X-Error-Message": err.message})
            raise
        self._send_json({"url": url, "name": key.repo_id, "id": self.store.meta(key)["uid"]})

    def _delete_repo(self) -> None:
        payload = self._json_body()
        user = self._user()
        key = _RepoKey(payload.get("type") or "model", f"{payload.get('organization') or user}/{payload.get('name')}")
        self._check_write(key)
        self.store.delete_repo(key)
        self._send_json({})

    def _settings(self, key: _RepoKey) -> None:
        self._check_write(key)
        payload = self._json_body()
        with self.store.lock:
            meta = self.store.meta(key)
            if "visibility" in payload:
                meta["private"] = payload["visibility"] == "private"
            if "private" in payload:
                meta["private"] = bool(payload["private"])
            if "gated" in payload:
                meta["gated"] = payload["gated"]
            self.store.write_meta(key, meta)
        self._send_json({})

    def _info_dict(self, key: _RepoKey, resolved: _Resolved, *, blobs: bool, siblings: bool = True) -> dict[str, Any]:
        meta = self.store.meta(key)
        manifest = self.store.manifest(key, resolved.oid)
        files = manifest["files"]
        info: dict[str, Any] = {
            "_id": meta["uid"],
            "id": key.repo_id,
            "author": key.namespace,
            "sha": resolved.oid,
            "lastModified": manifest["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": meta.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "usedStorage": sum(e["size"] for e in files.values()),
        }
        tags = []
        if any(p.endswith(".safetensors") for p in files):
            tags.append("safetensors")
        readme = self.store.read_file(key, resolved.oid, "README.md") or ""
        if key.repo_type == "model":
            config = None
            with contextlib.suppress(ValueError, TypeError):
                config = json.loads(self.store.read_file(key, resolved.oid, "config.json") or "null")
            if isinstance(config, dict):
                info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
                if config.get("model_type"):
                    tags.append(str(config["model_type"]))
                if config.get("auto_map"):
                    tags.append("custom_code")
            for field_name in ("library_name", "pipeline_tag"):
                if value := _front_matter_value(readme, field_name):
                    info[field_name] = value
        if key.repo_type == "space":
            info["sdk"] = meta.get("sdk")
        info["tags"] = tags
        if siblings:
            info["siblings"] = []
            for path in sorted(files):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry = files[path]
                    sibling["size"], sibling["blobId"] = entry["size"], entry["oid"]
                    if entry["lfs"]:
                        lfs = entry["lfs"]
                        sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
                info["siblings"].append(sibling)
        return info

    def _repo_info(self, key: _RepoKey, revision: str | None) -> None:
        self._check_read(key)
        resolved = self._resolve(key, revision or "main")
        self._send_json(self._info_dict(key, resolved, blobs=_truthy(self.query.get("blobs"))))

    def _list_repos(self, repo_type: str) -> None:
        user = self._user()
        author, search = self.query.get("author"), (self.query.get("search") or "").lower()
        out = []
        for key in self.store.all_repos(repo_type):
            if not self.store.exists(key) or (author and key.namespace != author) or search not in key.repo_id.lower():
                continue
            if self.store.meta(key)["private"] and not self._may_write(key.namespace, user):
                continue
            out.append(self._info_dict(key, self._resolve(key, "main"), blobs=False, siblings=False))
        limit = self.query.get("limit")
        self._send_json(out[: int(limit)] if limit else out)

    # -- tree, paths-info, refs, commits

    def _last_commit(self, key: _RepoKey, oid: str, path: str, is_folder: bool) -> dict[str, Any]:
        def fingerprint(files: Mapping[str, Any]) -> str | None:
            if is_folder:
                return _tree_oid(files, path) if any(p.startswith(path + "/") for p in files) else None
            return files[path]["oid"] if path in files else None

        history = self.store.history(key, oid)
        chosen = history[-1]
        for commit, parent in zip(history, history[1:], strict=False):
            if fingerprint(commit["files"]) != fingerprint(parent["files"]):
                chosen = commit
                break
        return {"id": chosen["oid"], "title": chosen["title"], "date": chosen["date"]}

    def _expand(self, key: _RepoKey, oid: str, entry: dict[str, Any]) -> dict[str, Any]:
        entry["lastCommit"] = self._last_commit(key, oid, entry["path"], entry["type"] == "directory")
        if entry["type"] == "file":
            entry["securityFileStatus"] = {
                "status": "safe",
                "avScan": {"virusFound": False, "virusNames": None},
                "pickleImportScan": None,
            }
        return entry

    def _tree(self, key: _RepoKey, revision: str, folder: str) -> None:
        self._check_read(key)
        resolved = self._resolve(key, revision)
        files = self.store.manifest(key, resolved.oid)["files"]
        folder = folder.strip("/")
        listing = _tree_listing(files, folder, _truthy(self.query.get("recursive")))
        if listing is None:
            raise HubError(
                404, f"Entry not found: {folder}", code="EntryNotFound", headers={"X-Repo-Commit": resolved.oid}
            )
        expand = _truthy(self.query.get("expand"))
        page_size = _PAGE_SIZE_EXPANDED if expand else _PAGE_SIZE
        start = int(self.query.get("cursor") or 0)
        page = listing[start : start + page_size]
        if expand:
            page = [self._expand(key, resolved.oid, dict(e)) for e in page]
        headers = {}
        if start + page_size < len(listing):
            params = {k: v for k, v in self.query.items() if k != "cursor"}
            query = "&".join(f"{quote(k)}={quote(v)}" for k, v in {**params, "cursor": str(start + page_size)}.items())
            headers["Link"] = f'<{self.base_url}{self.raw_path}?{query}>; rel="next"'
        self._send_json(page, headers=headers)

    def _paths_info(self, key: _RepoKey, revision: str) -> None:
        self._check_read(key)
        resolved = self._resolve(key, revision)
        files = self.store.manifest(key, resolved.oid)["files"]
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            payload = self._json_body()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                entry = _file_entry(path, files[path])
            elif any(p.startswith(path + "/") for p in files):
                entry = _folder_entry(files, path)
            else:
                continue
            out.append(self._expand(key, resolved.oid, entry) if expand else entry)
        self._send_json(out)

    def _refs(self, key: _RepoKey) -> None:
        self._check_read(key)
        refs = self.store.refs(key)
        data: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in sorted(refs["branches"].items())
            ],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in sorted(refs["tags"].items())],
        }
        if _truthy(self.query.get("include_prs")):
            data["pullRequests"] = [
                {"name": n, "ref": f"refs/pr/{n}", "targetCommit": o}
                for n, o in sorted(refs["pulls"].items(), key=lambda kv: int(kv[0]))
            ]
        self._send_json(data)

    def _commits(self, key: _RepoKey, revision: str) -> None:
        self._check_read(key)
        resolved = self._resolve(key, revision)
        out = []
        for commit in self.store.history(key, resolved.oid):
            item = {
                "id": commit["oid"],
                "title": commit["title"],
                "message": commit["message"],
                "date": commit["date"],
                "authors": [{"user": commit["author"], "avatar": None}],
            }
            if "formatted" in self.query.get("expand[]", ""):
                item["formatted"] = {"title": commit["title"], "message": commit["message"]}
            out.append(item)
        self._send_json(out)

    def _branch(self, key: _RepoKey, branch: str, method: str) -> None:
        self._check_write(key)
        if branch.startswith("refs/") or not branch or ".." in branch or branch.endswith("/"):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if method == "DELETE":
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            self.store.set_ref(key, "branches", branch, None, must_be_new=False)
            return self._send_json({})
        starting_point = self._json_body().get("startingPoint") or "main"
        resolved = self._resolve(key, starting_point)
        self.store.set_ref(key, "branches", branch, resolved.oid, must_be_new=True)
        self._send_json({})

    def _tag(self, key: _RepoKey, arg: str, method: str) -> None:
        self._check_write(key)
        if method == "DELETE":
            self.store.set_ref(key, "tags", arg, None, must_be_new=False)
            return self._send_json({})
        tag = str(self._json_body().get("tag", ""))
        if not tag or tag.startswith("refs/") or ".." in tag:
            raise HubError(400, f"Invalid tag name: {tag!r}")
        resolved = self._resolve(key, arg)
        self.store.set_ref(key, "tags", tag, resolved.oid, must_be_new=True)
        self._send_json({})

    # -- uploads

    def _preupload(self, key: _RepoKey, revision: str) -> None:
        create_pr = _truthy(self.query.get("create_pr"))
        if create_pr:
            if self._check_read(key) is None:
                raise self._not_found(None)
        else:
            self._check_write(key)
        resolved = self._resolve(key, revision)
        files = self.store.manifest(key, resolved.oid)["files"]
        payload = self._json_body()
        gitignore = payload.get("gitIgnore")
        if gitignore is None:
            gitignore = self.store.read_file(key, resolved.oid, ".gitignore")
        gitattributes = self.store.read_file(key, resolved.oid, ".gitattributes")
        out = []
        for item in payload.get("files", []):
            path = _validate_repo_path(str(item["path"]))
            sample = base64.b64decode(item.get("sample") or "")
            if self.standin.upload_mode == "lfs":
                lfs = (
                    int(item.get("size", 0)) >= LFS_SIZE_THRESHOLD
                    or b"\0" in sample
                    or _lfs_tracked(path, gitattributes)
                )
            else:
                lfs = False
            mode = "lfs" if lfs else "regular"
            existing = files.get(path)
            oid = None if existing is None else (existing["sha256"] if lfs else existing["sha1"])
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": _gitignored(path, gitignore), "oid": oid})
        self._send_json({"files": out, "commitOid": resolved.oid})

    def _commit(self, key: _RepoKey, revision: str) -> None:
        user = self._check_write(key)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "Missing commit header")
        summary = str(header.get("summary") or "").strip()
        if not summary:
            raise HubError(400, "Commit summary (title) cannot be empty")
        operations = [line for line in lines if line.get("key") != "header"]
        create_pr = _truthy(self.query.get("create_pr"))
        oid, pr_num = self.store.commit(
            key,
            revision,
            operations,
            title=summary,
            description=str(header.get("description") or ""),
            author=user,
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        repo_url = f"{self.base_url}/{key.url_path}"
        self._send_json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{repo_url}/commit/{oid}",
                "commitMessage": summary,
                "hookOutput": "",
                "pullRequestUrl": f"{repo_url}/discussions/{pr_num}" if pr_num is not None else None,
            }
        )

    # -- git LFS

    def _sign(self, *parts: str) -> str:
        return hmac.new(self.standin._secret, ":".join(parts).encode(), hashlib.sha256).hexdigest()[:40]

    def _check_sig(self, *parts: str) -> None:
        if not hmac.compare_digest(self.query.get("sig", ""), self._sign(*parts)):
            raise HubError(403, "Invalid or missing signature on pre-signed URL")

    def _lfs_batch(self, key: _RepoKey) -> None:
        payload = self._json_body()
        operation = payload.get("operation", "upload")
        if operation == "upload":
            self._check_write(key)
            ref = (payload.get("ref") or {}).get("name")
            if ref is not None:
                self._resolve(key, ref)
        else:
            self._check_read(key)
        objects = []
        multipart = False
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _OID_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid object oid or size"}})  # fmt: skip
                continue
            if operation != "upload":
                if not self.store.has_lfs(oid):
                    objects.append(
                        {"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}}
                    )
                else:
                    href = f"{self.base_url}/__standin/cdn/{oid}?sig={self._sign('cdn', oid)}"
                    objects.append(
                        {"oid": oid, "size": size, "authenticated": True, "actions": {"download": {"href": href}}}
                    )
                continue
            if self.store.has_lfs(oid):
                objects.append({"oid": oid, "size": size})  # already stored: no actions => the client skips it
                continue
            sig = self._sign("lfs", oid, str(size))
            href = f"{self.base_url}/__standin/lfs/{oid}?size={size}&sig={sig}"
            upload: dict[str, Any] = {"href": href}
            chunk = self.standin.lfs_multipart_chunk_size
            if size >= self.standin.lfs_multipart_threshold and size > chunk:
                multipart = True
                upload["header"] = {"chunk_size": str(chunk)}
                for part in range(1, math.ceil(size / chunk) + 1):
                    upload["header"][str(part)] = (
                        f"{self.base_url}/__standin/lfs/{oid}/part/{part}?size={size}&sig={sig}"
                    )
            verify = {"href": f"{self.base_url}/{key.url_path}.git/info/lfs/objects/verify"}
            objects.append(
                {"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}}
            )
        body = {"transfer": "multipart" if multipart else "basic", "objects": objects, "hash_algo": "sha256"}
        self._send_json(body, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        size = self.query.get("size", "")
        self._check_sig("lfs", oid, size)
        if len(self.body) != int(size):
            raise HubError(400, f"Expected {size} bytes, received {len(self.body)}")
        tmp = self.store.tmp_path()
        tmp.write_bytes(self.body)
        self.store.put_lfs_file(oid, tmp)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _parts_dir(self, oid: str) -> Path:
        return self.store.root / "tmp" / f"parts-{oid}"

    def _lfs_put_part(self, oid: str, part: int) -> None:
        self._check_sig("lfs", oid, self.query.get("size", ""))
        parts_dir = self._parts_dir(oid)
        parts_dir.mkdir(parents=True, exist_ok=True)
        (parts_dir / str(part)).write_bytes(self.body)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_complete(self, oid: str) -> None:
        size = self.query.get("size", "")
        self._check_sig("lfs", oid, size)
        payload = self._json_body()
        if payload.get("oid") != oid:
            raise HubError(400, "Completion payload oid does not match the URL")
        parts_dir = self._parts_dir(oid)
        tmp = self.store.tmp_path()
        with tmp.open("wb") as out:
            for number, part in enumerate(sorted(payload.get("parts", []), key=lambda p: p["partNumber"]), start=1):
                part_path = parts_dir / str(part["partNumber"])
                if part["partNumber"] != number or not part_path.is_file():
                    raise HubError(400, f"Missing part {number}")
                data = part_path.read_bytes()
                if part.get("etag", "").strip('"') != hashlib.md5(data).hexdigest():
                    raise HubError(400, f"ETag mismatch for part {number}")
                out.write(data)
        if tmp.stat().st_size != int(size):
            tmp.unlink()
            raise HubError(400, f"Assembled object has {tmp.stat().st_size} bytes, expected {size}")
        self.store.put_lfs_file(oid, tmp)
        shutil.rmtree(parts_dir, ignore_errors=True)
        self._send_json({})

    def _lfs_verify(self, key: _RepoKey) -> None:
        self._check_write(key)
        payload = self._json_body()
        oid, size = str(payload.get("oid", "")), payload.get("size")
        if not self.store.has_lfs(oid) or self.store.lfs_path(oid).stat().st_size != size:
            raise HubError(404, f"LFS object {oid} not found (or wrong size)")
        self._send_json({})

    # -- downloads

    def _resolve_file(self, key: _RepoKey, revision: str, path: str) -> None:
        self._check_read(key)
        resolved = self._resolve(key, revision)
        entry = self.store.manifest(key, resolved.oid)["files"].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": resolved.oid})
        headers = {"X-Repo-Commit": resolved.oid, "ETag": f'"{entry["oid"]}"'}
        filename = path.rsplit("/", 1)[-1]
        if entry["lfs"]:
            sha256 = entry["lfs"]["oid"]
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(entry["size"])})
            redirect_host = self.standin.lfs_redirect_host
            if redirect_host:
                port = self.server.server_address[1]
                location = (
                    f"http://{redirect_host}:{port}/__standin/cdn/{sha256}"
                    f"?sig={self._sign('cdn', sha256)}&filename={quote(filename)}"
                )
                return self._send(302, b"", {**headers, "Location": location, "Content-Type": "text/plain"})
        self._send_file(self.store.snapshot(key, resolved.oid) / path, filename, headers)

    def _cdn(self, oid: str) -> None:
        self._check_sig("cdn", oid)
        if not self.store.has_lfs(oid):
            raise HubError(404, "Object not found")
        filename = self.query.get("filename") or oid
        self._send_file(self.store.lfs_path(oid), filename, {"ETag": f'"{oid}"'})

    def _send_file(self, path: Path, filename: str, headers: dict[str, str]) -> None:
        size = path.stat().st_size
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        headers = {
            **headers,
            "Content-Type": content_type,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\"",
        }
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and (match := re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())):
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            elif last:
                start, end = max(size - int(last), 0), size - 1
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._status = status
        self.send_response(status)
        headers.update({"Content-Length": str(length), "X-Request-Id": uuid.uuid4().hex})
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    request_queue_size = 64
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    standin: HubStandIn


# ------------------------------------------------------------------------------------------------------- public API


class HubStandIn:
    """A local stand-in of the Hugging Face Hub HTTP API, for tests (see the module docstring).

    Args:
        storage: directory holding the repos; a temporary directory (removed by :meth:`stop`) when ``None``.
            An existing directory is reused, so a restarted server sees the repos of the previous one.
        port: TCP port on ``127.0.0.1``; ``0`` picks a free one.
        tokens: token -> user name. Defaults to ``{DEFAULT_TOKEN: DEFAULT_USER}``.
        orgs: organisation -> member user names (members may write to the organisation's repos).
        upload_mode: ``"regular"`` (every file is sent inline in the commit: works with or without Xet) or
            ``"lfs"`` (Hub-like choice; the client must run with ``HF_HUB_DISABLE_XET=1``).
        lfs_redirect_host: if set (e.g. ``"localhost"``), LFS file downloads answer ``302`` to this host name, like
            the Hub's CDN redirect. The host must resolve to ``127.0.0.1``.
        lfs_multipart_threshold / lfs_multipart_chunk_size: LFS objects at least this big are uploaded with the
            multipart transfer, in parts of this size.
        initial_gitattributes: give new repos an "initial commit" with the Hub's default ``.gitattributes``.
        verbose: log each request on stderr.
    """

    def __init__(
        self,
        storage: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        tokens: Mapping[str, str] | None = None,
        orgs: Mapping[str, Iterable[str]] | None = None,
        upload_mode: str = "regular",
        lfs_redirect_host: str | None = None,
        lfs_multipart_threshold: int = 64 * 1024 * 1024,
        lfs_multipart_chunk_size: int = 16 * 1024 * 1024,
        initial_gitattributes: bool = True,
        verbose: bool = False,
    ):
        if upload_mode not in UPLOAD_MODES:
            raise ValueError(f"upload_mode must be one of {UPLOAD_MODES}, not {upload_mode!r}")
        self._owns_storage = storage is None
        self.storage = Path(tempfile.mkdtemp(prefix="hub-standin-")) if storage is None else Path(storage)
        self.port = port
        self.tokens: dict[str, str] = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.orgs: dict[str, set[str]] = {org: set(members) for org, members in (orgs or {}).items()}
        self.upload_mode = upload_mode
        self.lfs_redirect_host = lfs_redirect_host
        self.lfs_multipart_threshold = lfs_multipart_threshold
        self.lfs_multipart_chunk_size = lfs_multipart_chunk_size
        self.verbose = verbose
        self.requests: list[RequestRecord] = []
        """Every request served, in order."""
        self.unhandled: list[str] = []
        """Requests no route matched (``"METHOD path"``): an endpoint the client needs and the stand-in lacks."""
        self._secret = secrets.token_bytes(32)
        self._store = _Store(self.storage, initial_gitattributes=initial_gitattributes)
        self._log_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _record(self, record: RequestRecord) -> None:
        with self._log_lock:
            self.requests.append(record)

    @property
    def url(self) -> str:
        """Base URL (the value for ``HF_ENDPOINT``); only valid once started."""
        if self._server is None:
            raise RuntimeError("HubStandIn is not started")
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> str:
        """Start serving in a background thread; returns the base URL ``http://127.0.0.1:PORT``."""
        if self._server is not None:
            return self.url
        server = _Server((HOST, self.port), _Handler)
        server.standin = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop the server (and remove the storage directory if it was a temporary one)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = self._thread = None
        if self._owns_storage:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> HubStandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_token(self, token: str, user: str) -> None:
        """Accept ``token`` as ``user`` from now on."""
        self.tokens[token] = user

    def client_env(
        self,
        hf_home: str | os.PathLike[str],
        *,
        token: str | None = None,
        disable_xet: bool | None = None,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for a subprocess that should talk to this stand-in with the real client.

        Starts from ``base`` (default ``os.environ``) minus every Hub-related variable (endpoint, token, cache
        locations, offline flags), then sets ``HF_ENDPOINT``, ``HF_HOME`` (fresh cache and no stored token),
        ``HF_HUB_OFFLINE=0`` / ``TRANSFORMERS_OFFLINE=0`` / ``HF_DATASETS_OFFLINE=0``, quiet progress bars,
        ``HF_HUB_DISABLE_TELEMETRY=1``, ``NO_PROXY`` for the loopback host, and ``HF_TOKEN`` if ``token`` is
        given. ``HF_HUB_DISABLE_XET=1`` is set when ``disable_xet`` is true, or, when it is ``None``, when this
        stand-in runs with ``upload_mode="lfs"``. Without ``token``, pass one explicitly (``HfApi(token=...)``).
        """
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not (k.startswith(("HF_", "HUGGINGFACE_")) or k in ("TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE"))
        }
        env.update(
            {
                "HF_ENDPOINT": self.url,
                "HF_HOME": os.fspath(hf_home),
                "HF_HUB_OFFLINE": "0",
                "TRANSFORMERS_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
                "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            }
        )
        for var in ("NO_PROXY", "no_proxy"):  # never send loopback traffic through an HTTP proxy set in the env
            hosts = [h.strip() for h in env.get(var, "").split(",") if h.strip()]
            env[var] = ",".join(hosts + [h for h in (HOST, "localhost") if h not in hosts])
        if disable_xet or (disable_xet is None and self.upload_mode == "lfs"):
            env["HF_HUB_DISABLE_XET"] = "1"
        if token is not None:
            env["HF_TOKEN"] = token
        return env


@contextlib.contextmanager
def redirect_hub_client(
    endpoint: str,
    *,
    hf_home: str | os.PathLike[str] | None = None,
    disable_xet: bool | None = None,
) -> Iterator[None]:
    """Point an already-imported ``huggingface_hub`` (and ``transformers``) at ``endpoint`` in *this* process.

    ``huggingface_hub`` freezes ``HF_ENDPOINT`` (and ``HF_HOME``, ``HF_HUB_OFFLINE``, ...) at import time into module
    attributes; this patches every one the installed version reads: ``constants.ENDPOINT``,
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``/``hf_hub_download``), ``constants.HF_URL_HOSTS``,
    ``utils._http._HUB_ORIGINS`` (which redirects keep the token), the module-level ``HfApi`` behind
    ``huggingface_hub.upload_folder`` & co., and ``transformers``' cached ``HfApi``
    (``transformers.utils.hub._hf_api``).
    It also turns offline mode off, optionally sets Xet on/off (``disable_xet``) and, with ``hf_home``, moves the
    cache/token locations (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``)
    under that folder. Everything is restored on exit.

    Limits: ``HfApi`` objects created *before* entering keep their old endpoint; ``transformers``' remote-code module
    cache (``HF_MODULES_CACHE``, for ``trust_remote_code``) is not moved; other libraries keeping their own copy of the
    endpoint (e.g. ``datasets.config``) are not patched. Prefer a subprocess started with
    :meth:`HubStandIn.client_env` when you can: it is what real usage looks like.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    host = urlsplit(endpoint).hostname
    patches: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | ({host.lower()} if host else set())),
        "HF_HUB_OFFLINE": False,
    }
    if disable_xet is not None:
        patches["HF_HUB_DISABLE_XET"] = disable_xet
    if hf_home is not None:
        home = os.fspath(hf_home)
        patches.update(
            {
                "HF_HOME": home,
                "HF_HUB_CACHE": os.path.join(home, "hub"),
                "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
                "HF_ASSETS_CACHE": os.path.join(home, "assets"),
                "HUGGINGFACE_ASSETS_CACHE": os.path.join(home, "assets"),
                "HF_XET_CACHE": os.path.join(home, "xet"),
                "HF_TOKEN_PATH": os.path.join(home, "token"),
                "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
                "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
            }
        )
    saved_constants = {name: getattr(constants, name) for name in patches}
    saved_origins = _http._HUB_ORIGINS
    saved_api_endpoint = hf_api_module.api.endpoint
    transformers_hub = sys.modules.get("transformers.utils.hub")
    saved_transformers_api = getattr(transformers_hub, "_hf_api", None)
    try:
        for name, value in patches.items():
            setattr(constants, name, value)
        _http._HUB_ORIGINS = frozenset(saved_origins | {_http._url_origin(endpoint)})
        hf_api_module.api.endpoint = endpoint
        if transformers_hub is not None:
            transformers_hub._hf_api = None
        yield
    finally:
        for name, value in saved_constants.items():
            setattr(constants, name, value)
        _http._HUB_ORIGINS = saved_origins
        hf_api_module.api.endpoint = saved_api_endpoint
        if transformers_hub is not None:
            transformers_hub._hf_api = saved_transformers_api


# ------------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m ddl_transformers.testing.hub_standin --port N --storage DIR``: serve until SIGTERM / Ctrl-C.

    Prints ``HUB_STANDIN_URL=http://127.0.0.1:PORT`` on stdout once it accepts connections.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: pick a free one)")
    parser.add_argument("--storage", default=None, help="storage directory (default: a temporary one)")
    parser.add_argument(
        "--token", action="append", default=[], metavar="TOKEN[=USER]",
        help=f"accepted token, mapped to USER (default user {DEFAULT_USER}); default token {DEFAULT_TOKEN}",
    )  # fmt: skip
    parser.add_argument(
        "--org", action="append", default=[], metavar="ORG=USER[,USER...]", help="organisation members"
    )
    parser.add_argument("--upload-mode", choices=UPLOAD_MODES, default="regular")
    parser.add_argument("--lfs-redirect-host", default=None, help="answer LFS downloads with a 302 to this host name")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    tokens = dict(t.split("=", 1) if "=" in t else (t, DEFAULT_USER) for t in args.token) or None
    orgs = {org: members.split(",") for org, _, members in (o.partition("=") for o in args.org)}
    standin = HubStandIn(
        args.storage,
        port=args.port,
        tokens=tokens,
        orgs=orgs,
        upload_mode=args.upload_mode,
        lfs_redirect_host=args.lfs_redirect_host,
        verbose=args.verbose,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"HUB_STANDIN_URL={standin.start()}", flush=True)
    try:
        stop.wait()
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
