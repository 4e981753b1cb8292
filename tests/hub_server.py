"""A loopback Hugging Face Hub for tests, spoken to through ``huggingface_hub``'s own client.

Tests must not reach the network, yet the code that downloads from the Hub should be tested
through the real client (its cache layout, etags, retries and error classes), not a mock of it.
:class:`LoopbackHub` serves, on ``127.0.0.1`` and an ephemeral port, the few routes that
``huggingface_hub`` 2.4.0 uses to download, as the Hub answers them::

    HEAD/GET /<prefix><repo_id>/resolve/<revision>/<path>   prefix: "" (model), datasets/, spaces/
    GET /api/<type>s/<repo_id>[/revision/<revision>]        repo_info / model_info / dataset_info
    GET /api/<type>s/<repo_id>/tree/<revision>[/<folder>]   list_repo_tree / list_repo_files

``<revision>`` is a branch (``main``), a ref made with :meth:`LoopbackHub.set_ref` or a full
commit sha, percent-quoted as the client sends it. Every commit stays served, as on the Hub.

What the client reads, and so what the server sends (``file_download.get_hf_file_metadata``):
``X-Repo-Commit`` (the commit sha), ``ETag`` (quoted git blob sha1) and ``Content-Length``; for
an LFS file also ``X-Linked-Etag`` (quoted sha256) and ``X-Linked-Size``, which the client
prefers, so its cache names the blob by the sha256 as with the real Hub. A file is LFS when its
name ends with one of :data:`LFS_SUFFIXES` or it has :data:`LFS_MIN_SIZE` bytes or more (what the
Hub's default ``.gitattributes`` and its 10 MB limit on plain git files decide), or when
:meth:`LoopbackHub.add_file` is told so. LFS files are served directly, without the Hub's
redirect to its CDN. ``X-Xet-Hash`` is never sent, so the client takes its plain HTTP path
(``http_get``) even with ``hf_xet`` installed. ``Range: bytes=N-`` is answered with 206.

Errors carry the Hub's ``X-Error-Code`` so that ``hf_raise_for_status`` raises its own classes:
unknown repo: 404 ``RepoNotFound`` (``RepositoryNotFoundError``); unknown revision: 404
``RevisionNotFound`` (``RevisionNotFoundError``); unknown file or folder: 404 ``EntryNotFound``
(``RemoteEntryNotFoundError``, an ``EntryNotFoundError``; a file's names the commit in
``X-Repo-Commit``, and the client caches the miss under ``.no_exist/<commit>``); a gated repo
without ``Authorization: Bearer <token>``: 401 ``GatedRepo``, with a token not in
:attr:`LoopbackHub.tokens`: 403 ``GatedRepo`` (both ``GatedRepoError``). Other routes: a plain
404 (``HfHubHTTPError``); never a 5xx, which the client would retry with sleeps.

For tests: :attr:`LoopbackHub.requests` logs every request (method, path as sent, headers),
:meth:`LoopbackHub.cut_next_download` drops a download midway (its docstring says what the
client does then), and nothing is printed per request.

Pointing code at it: in-process with :meth:`LoopbackHub.patch` (``huggingface_hub`` copies
``HF_ENDPOINT``, ``HF_HOME``... into ``huggingface_hub.constants`` at import, so setting the
environment is not enough), in a subprocess with ``env={**os.environ, **hub.env(home)}``.

Offline in-process: every request ``huggingface_hub`` sends goes through an httpx event hook that
raises ``OfflineModeIsEnabled`` when ``constants.is_offline_mode()``, i.e. the module global
``huggingface_hub.constants.HF_HUB_OFFLINE``, read at call time, is true: setting that constant
(:meth:`LoopbackHub.offline`) switches offline; the ``HF_HUB_OFFLINE`` variable alone does not
after import. Offline, ``hf_hub_download`` returns the cached file of ``refs/<revision>``
without a request, and API calls such as ``list_repo_tree`` raise ``OfflineModeIsEnabled``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

#: Names the Hub's default ``.gitattributes`` stores with LFS (the ones tests are likely to use).
LFS_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".safetensors",
    ".onnx",
    ".h5",
    ".msgpack",
    ".npy",
    ".npz",
    ".parquet",
    ".arrow",
    ".zip",
    ".tar",
    ".gz",
)
#: The Hub refuses plain git files from 10 MB on: bigger files are LFS whatever their name.
LFS_MIN_SIZE = 10 * 1024 * 1024

_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_DATE = "2024-01-01T00:00:00.000Z"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _git_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``: what the Hub sends as a file's ``ETag`` and tree ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """A file of a commit; an LFS file is stored in git as a pointer naming its sha256."""

    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The LFS pointer file git holds for an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    @cached_property
    def oid(self) -> str:
        """The git blob sha1 of what git stores: the pointer for an LFS file, else the data."""
        return _git_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """The etag ``huggingface_hub`` keeps, and names the cached blob by."""
        return self.sha256 if self.lfs else self.oid

    def tree_item(self, path: str) -> dict[str, Any]:
        """The file's entry in the Hub's ``/tree`` listing."""
        item: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return item


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    gated: bool
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """The commit sha of a ref or of a full sha, None when unknown."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class Request(NamedTuple):
    """One request the hub received; header names are lower-cased."""

    method: str
    path: str  # as sent: percent-quoted, with the query string
    headers: dict[str, str]


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    is_file: bool = False  # a file body, which cut_next_download may cut


def _error(status: int, code: str | None, message: str, **headers: str) -> _Reply:
    """An error as the Hub sends it: ``X-Error-Code``/``X-Error-Message`` and a JSON body."""
    head = {"Content-Type": "application/json", "X-Error-Message": message, **headers}
    if code is not None:
        head["X-Error-Code"] = code
    return _Reply(status, head, json.dumps({"error": message}).encode())


def _json(payload: Any) -> _Reply:
    return _Reply(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stalled client cannot keep a handler thread (and shutdown) waiting forever
    server: _Server

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        """No POST route (paths-info, commits...): logged, then 404 Not Found."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._serve(_error(404, None, "Not Found"))

    def _serve(self, reply: _Reply | None = None) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        hub = self.server.hub
        with hub._lock:
            hub.requests.append(Request(self.command, self.path, headers))
        if reply is None:
            reply = hub._route(self.path, headers)
        cut = hub._take_cut() if reply.is_file and self.command == "GET" else None
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        # One request per connection: no idle keep-alive socket holds a thread at shutdown.
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            # a client gone away needs no answer
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(reply.body if cut is None else reply.body[:cut])

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no line on stderr per request (``hub.requests`` keeps them)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: LoopbackHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Keep a handler's exception for the test instead of printing it."""
        self.hub.errors.append(sys.exc_info()[1])


class LoopbackHub:
    """A Hugging Face Hub on ``127.0.0.1`` for tests; a context manager (see the module docs).

    >>> with LoopbackHub() as hub:  # doctest: +SKIP
    ...     hub.add_repo("org/data", repo_type="dataset", files={"a/b/x.bin": b"..."})
    ...     hub.patch(monkeypatch, tmp_path)
    ...     hf_hub_download("org/data", "a/b/x.bin", repo_type="dataset")
    """

    def __init__(self) -> None:
        self.tokens: set[str] = set()  # tokens granted access to every gated repo
        self.requests: list[Request] = []
        self.errors: list[BaseException | None] = []  # exceptions raised in request handlers
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._cuts: list[int] = []  # pending cut_next_download byte counts, in order
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> LoopbackHub:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LoopbackHub"
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, close the socket and join the server and handler threads."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()  # joins the handler threads (block_on_close)
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, the value for ``HF_ENDPOINT``."""
        assert self._server is not None, "the hub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- contents -------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        files: Mapping[str, Path | bytes] | None = None,
        gated: bool = False,
        commit: str | None = None,
    ) -> str:
        """Create a repo whose ``main`` holds ``files`` (path in repo: local file or bytes, read
        now); LFS or not by :data:`LFS_SUFFIXES`/:data:`LFS_MIN_SIZE`. Returns the commit sha
        (``commit``, or one derived from the contents)."""
        key = (repo_type, repo_id)
        if repo_type not in _URL_PREFIXES:
            raise ValueError(f"unknown repo type {repo_type!r}")
        if key in self._repos:
            raise ValueError(f"{repo_type} {repo_id} exists")
        repo = self._repos[key] = _Repo(repo_type, repo_id, gated)
        tree = {path: self._hub_file(path, content) for path, content in (files or {}).items()}
        return self._commit(repo, tree, commit)

    def add_file(
        self,
        repo_id: str,
        path: str,
        content: Path | bytes,
        *,
        repo_type: str = "model",
        lfs: bool | None = None,
        commit: str | None = None,
    ) -> str:
        """Add or replace ``path`` in a new commit on ``main`` (LFS by the rule when ``lfs`` is
        None); returns the new commit sha. Earlier commits keep their files."""
        repo = self._repos[(repo_type, repo_id)]
        tree = dict(repo.commits[repo.refs["main"]])
        tree[path] = self._hub_file(path, content, lfs)
        return self._commit(repo, tree, commit)

    def delete_file(
        self, repo_id: str, path: str, *, repo_type: str = "model", commit: str | None = None
    ) -> str:
        """Remove ``path`` in a new commit on ``main``; returns the new commit sha."""
        repo = self._repos[(repo_type, repo_id)]
        tree = dict(repo.commits[repo.refs["main"]])
        del tree[path]
        return self._commit(repo, tree, commit)

    def set_ref(self, repo_id: str, ref: str, commit: str, *, repo_type: str = "model") -> None:
        """Point a branch or tag (``v1``, ``refs/pr/1``...) at a commit of the repo."""
        repo = self._repos[(repo_type, repo_id)]
        if commit not in repo.commits:
            raise ValueError(f"no commit {commit} in {repo_id}")
        repo.refs[ref] = commit

    def commit(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """The commit sha a revision resolves to (what ``X-Repo-Commit`` says)."""
        sha = self._repos[(repo_type, repo_id)].resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return sha

    def etag(
        self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main"
    ) -> str:
        """The etag ``huggingface_hub`` computes for the file, the name of its cached blob:
        the sha256 for an LFS file, the git blob sha1 otherwise."""
        sha = self.commit(repo_id, repo_type=repo_type, revision=revision)
        return self._repos[(repo_type, repo_id)].commits[sha][path].etag

    def cut_next_download(self, after_bytes: int, times: int = 1) -> None:
        """Make each of the next ``times`` GETs of a file body send only ``after_bytes`` bytes
        (of the body asked for: the rest of the file for a Range request) and close the
        connection, as a dropped network would.

        What huggingface_hub 2.4.0 does then (``file_download.http_get``): it catches httpx2's
        ``RemoteProtocolError``, sleeps 1 s and GETs again within the same call, with
        ``Range: bytes=N-`` where N counts the bytes it wrote, which are whole chunks of
        ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) only: below that, N is 0 and the retry has no
        Range. It gives up after 5 retries in a row without a chunk, raising the
        ``RemoteProtocolError`` and deleting its partial file, which is unique to the call
        (``blobs/<etag>.<random>.incomplete``): a later call starts from zero."""
        with self._lock:
            self._cuts.extend([after_bytes] * times)

    # -- pointing huggingface_hub at the hub ----------------------------------------------

    def env(self, home: Path, *, offline: bool = False) -> dict[str, str]:
        """Environment variables for a subprocess using this hub and a cache under ``home``.
        Empty values cancel tokens and settings the parent environment may carry."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(Path(home) / "hub"),
            "HF_TOKEN_PATH": str(Path(home) / "token"),
            "HF_TOKEN": "",
            "HUGGING_FACE_HUB_TOKEN": "",
            "HF_OIDC_RESOURCE": "",
            "HUGGINGFACE_CO_STAGING": "",
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",  # also skips the agent-detection request
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }

    def patch(self, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
        """Make in-process ``huggingface_hub`` calls use this hub, a cache under ``home`` and
        no token of the machine (the same variables for subprocesses, see :meth:`env`)."""
        from huggingface_hub import constants, hf_api
        from huggingface_hub.utils import _cache_manager

        home = Path(home)
        for name, value in self.env(home).items():
            monkeypatch.setenv(name, value)
        hub_cache = str(home / "hub")
        token_path = str(home / "token")
        for name, value in {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint
            + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": hub_cache,
            "HUGGINGFACE_HUB_CACHE": hub_cache,
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": token_path,
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }.items():
            monkeypatch.setattr(constants, name, value)
        # Bound when imported: huggingface_hub.hf_hub_download/list_repo_tree... are methods of
        # this HfApi, made with the endpoint of the time; scan_cache_dir's default cache.
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)
        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", hub_cache)
        # also copied at import: no progress bars on stderr, as HF_HUB_DISABLE_PROGRESS_BARS=1
        monkeypatch.setattr(
            importlib.import_module("huggingface_hub.utils.tqdm"),
            "HF_HUB_DISABLE_PROGRESS_BARS",
            True,
        )

    @staticmethod
    def offline(monkeypatch: pytest.MonkeyPatch) -> None:
        """Switch in-process ``huggingface_hub`` offline (and subprocesses: ``HF_HUB_OFFLINE``)."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _hub_file(path: str, content: Path | bytes, lfs: bool | None = None) -> HubFile:
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        if lfs is None:
            lfs = path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        return HubFile(data, lfs)

    def _commit(self, repo: _Repo, tree: dict[str, HubFile], sha: str | None) -> str:
        """Record ``tree`` as a new commit on ``main``; a derived sha is deterministic (repo,
        parent and contents) and differs from the parent's."""
        if sha is None:
            text = f"{repo.repo_type}/{repo.repo_id}\n{repo.refs.get('main', '')}\n"
            text += "".join(f"{path}\0{tree[path].oid}\n" for path in sorted(tree))
            sha = hashlib.sha1(text.encode()).hexdigest()
        if not re.fullmatch(r"[0-9a-f]{40}", sha) or sha in repo.commits:
            raise ValueError(f"commit must be a new 40-hex sha, not {sha!r}")
        with self._lock:
            repo.commits[sha] = tree
            repo.refs["main"] = sha
        return sha

    def _take_cut(self) -> int | None:
        with self._lock:
            return self._cuts.pop(0) if self._cuts else None

    def _find(self, repo_type: str, segments: list[str]) -> tuple[_Repo | None, str, list[str]]:
        """Split ``segments`` into a repo id (``ns/name``, or a legacy one-part model id) and
        the rest; the repo is None when unknown."""
        for parts in (2, 1):
            repo_id = "/".join(segments[:parts])
            if (repo_type, repo_id) in self._repos:
                return self._repos[(repo_type, repo_id)], repo_id, segments[parts:]
        return None, "/".join(segments[:2]), segments[2:]

    def _route(self, target: str, headers: dict[str, str]) -> _Reply:
        url = urlsplit(target)
        segments = [unquote(part) for part in url.path.strip("/").split("/")]
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        if segments[0] == "api" and len(segments) > 2 and segments[1] in _API_TYPES:
            return self._api(_API_TYPES[segments[1]], segments[2:], query, headers)
        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type, segments = segments[0][:-1], segments[1:]
        if "resolve" in segments[1:3]:
            repo, repo_id, rest = self._find(repo_type, segments)
            if repo is None or (refused := self._refuse(repo, headers)) is not None:
                return refused if repo is not None else self._no_repo(repo_type, repo_id)
            if rest[:1] == ["resolve"] and len(rest) >= 3:
                return self._resolve(repo, rest[1], "/".join(rest[2:]), headers)
        return _error(404, None, "Not Found")

    @staticmethod
    def _no_repo(repo_type: str, repo_id: str) -> _Reply:
        return _error(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id}")

    def _refuse(self, repo: _Repo, headers: dict[str, str]) -> _Reply | None:
        """The Hub's answer to a gated repo asked without an accepted token, else None."""
        if not repo.gated:
            return None
        auth = headers.get("authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if token in self.tokens:
            return None
        name = f"{repo.repo_type} {repo.repo_id}"
        if token is None:
            message = f"Access to {name} is restricted. You must have access to it and be"
            message += " authenticated to access it. Please log in."
            return _error(401, "GatedRepo", message)
        message = f"Access to {name} is restricted and you are not in the authorized list."
        return _error(403, "GatedRepo", message)

    def _commit_of(self, repo: _Repo, revision: str) -> tuple[str | None, _Reply | None]:
        sha = repo.resolve(revision)
        if sha is None:
            return None, _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, None

    def _resolve(self, repo: _Repo, revision: str, path: str, headers: dict[str, str]) -> _Reply:
        sha, error = self._commit_of(repo, revision)
        if error is not None:
            return error
        assert sha is not None
        hub_file = repo.commits[sha].get(path)
        if hub_file is None:
            return _error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": sha})
        head = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": sha,
            "ETag": f'"{hub_file.oid}"',
        }
        if hub_file.lfs:
            head["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            head["X-Linked-Size"] = str(hub_file.size)
        asked = _RANGE.fullmatch(headers.get("range", "").strip())
        if asked is None:
            return _Reply(200, head, hub_file.data, is_file=True)
        size = hub_file.size
        first, last = asked.groups()
        if first:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        else:  # bytes=-N: the last N bytes
            start, end = max(size - int(last or 0), 0), size - 1
        if start >= size or start > end:
            return _Reply(416, {**head, "Content-Range": f"bytes */{size}"})
        head["Content-Range"] = f"bytes {start}-{end}/{size}"
        return _Reply(206, head, hub_file.data[start : end + 1], is_file=True)

    def _api(
        self, repo_type: str, segments: list[str], query: dict[str, str], headers: dict[str, str]
    ) -> _Reply:
        repo, repo_id, rest = self._find(repo_type, segments)
        if repo is None:
            return self._no_repo(repo_type, repo_id)
        if (refused := self._refuse(repo, headers)) is not None:
            return refused
        if not rest or (rest[0] == "revision" and len(rest) == 2):
            sha, error = self._commit_of(repo, rest[1] if rest else "main")
            if error is not None:
                return error
            assert sha is not None
            return _json(self._info(repo, sha, blobs=query.get("blobs", "").lower() == "true"))
        if rest[0] == "tree" and len(rest) >= 2:
            sha, error = self._commit_of(repo, rest[1])
            if error is not None:
                return error
            assert sha is not None
            folder = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", "").lower() in ("true", "1")
            items = self._tree(repo.commits[sha], folder, recursive)
            if items is None:
                return _error(404, "EntryNotFound", f"{folder} does not exist on {rest[1]}")
            return _json(items)
        return _error(404, None, "Not Found")

    @staticmethod
    def _info(repo: _Repo, sha: str, *, blobs: bool) -> dict[str, Any]:
        """The ``/api/<type>s/<repo_id>`` answer (the fields ``ModelInfo``/``DatasetInfo`` read)."""
        siblings = []
        for path, hub_file in sorted(repo.commits[sha].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=hub_file.size, blobId=hub_file.oid)
                if hub_file.lfs:
                    sibling["lfs"] = {
                        "sha256": hub_file.sha256,
                        "size": hub_file.size,
                        "pointerSize": len(hub_file.pointer),
                    }
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": sha,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    @staticmethod
    def _tree(files: dict[str, HubFile], folder: str, recursive: bool) -> list[dict] | None:
        """The ``/tree`` items under ``folder`` (files and folders; all below it when
        ``recursive``), None when there is no such folder."""
        prefix = folder + "/" if folder else ""
        below = {path: f for path, f in files.items() if path.startswith(prefix)}
        if folder and not below:
            return None
        items: dict[str, dict[str, Any]] = {}
        for path, hub_file in below.items():
            parts = path[len(prefix) :].split("/")
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            for count in range(1, depth + 1):
                directory = prefix + "/".join(parts[:count])
                if directory not in items:
                    # a stand-in for git's tree sha1: changes whenever a file below changes
                    inside = sorted(
                        f"{p}\0{f.oid}" for p, f in files.items() if p.startswith(directory + "/")
                    )
                    oid = hashlib.sha1("\n".join(inside).encode()).hexdigest()
                    items[directory] = {
                        "type": "directory",
                        "oid": oid,
                        "size": 0,
                        "path": directory,
                    }
            if recursive or len(parts) == 1:
                items[path] = hub_file.tree_item(path)
        return [items[path] for path in sorted(items)]


__all__ = ["LFS_MIN_SIZE", "LFS_SUFFIXES", "HubFile", "LoopbackHub", "Request"]
