"""The loopback Hub (tests/hub_server.py) through huggingface_hub's own client: downloads, cache
layout, listings, gating, errors, a dropped download and offline mode, as with the real Hub."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import (
    HfApi,
    constants,
    dataset_info,
    file_download,
    hf_hub_download,
    list_repo_files,
    list_repo_tree,
    repo_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from hub_server import LoopbackHub

DATA = "org/data"
MODEL = "org/model"
GATED = "org/gated"
BIG = random.Random(0).randbytes(300_000)  # LFS by its .bin suffix
SMALL = json.dumps({"classes": ["a", "b"]}).encode()
DATASET_FILES = {
    "README.md": b"# data\n",
    "a/b/big.bin": BIG,
    "a/b/small.json": SMALL,
    "a/c.txt": b"c\n",
}
MODEL_FILES = {
    "config.json": b'{"hidden": 8}',
    "model.safetensors": random.Random(1).randbytes(50_000),
    "sub/notes.txt": b"notes\n",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LoopbackHub]:
    """A started hub with a dataset, a model and a gated dataset; huggingface_hub pointed at it
    with a cache under tmp_path/hf."""
    with LoopbackHub() as hub:
        hub.add_repo(DATA, repo_type="dataset", files=DATASET_FILES)
        hub.add_repo(MODEL, files=MODEL_FILES)
        hub.add_repo(GATED, repo_type="dataset", files={"x.txt": b"secret\n"}, gated=True)
        hub.tokens = {"hf_good"}
        hub.patch(monkeypatch, tmp_path / "hf")
        yield hub
        assert hub.errors == []


def _gets(hub: LoopbackHub, path: str) -> list[dict[str, str]]:
    """The headers of each GET of ``path`` (a file body)."""
    return [r.headers for r in hub.requests if r.method == "GET" and r.path.endswith(path)]


def _cache(tmp_path: Path, repo_type: str, repo_id: str) -> Path:
    return tmp_path / "hf" / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"


def test_download_then_cache_named_by_etag(hub: LoopbackHub, tmp_path: Path) -> None:
    """The file comes back byte for byte, in the cache laid out as with the real Hub (blob named
    by the sha256 of an LFS file, by the git blob sha1 of a plain one); a warm call HEADs only."""
    path = Path(hf_hub_download(DATA, "a/b/big.bin", repo_type="dataset"))
    assert path.read_bytes() == BIG
    sha = hub.commit(DATA, repo_type="dataset")
    cache = _cache(tmp_path, "dataset", DATA)
    assert path == cache / "snapshots" / sha / "a/b/big.bin"
    assert (cache / "refs" / "main").read_text() == sha
    assert path.resolve() == cache / "blobs" / hashlib.sha256(BIG).hexdigest()
    assert hub.etag(DATA, "a/b/big.bin", repo_type="dataset") == path.resolve().name

    small = Path(hf_hub_download(DATA, "a/b/small.json", repo_type="dataset"))
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(SMALL) + SMALL).hexdigest()
    assert small.resolve().name == git_sha1 == hub.etag(DATA, "a/b/small.json", repo_type="dataset")

    hub.requests.clear()
    assert Path(hf_hub_download(DATA, "a/b/big.bin", repo_type="dataset")) == path
    assert [(r.method, r.path) for r in hub.requests] == [
        ("HEAD", "/datasets/org/data/resolve/main/a/b/big.bin")
    ]


def test_revisions_and_new_commits(hub: LoopbackHub) -> None:
    """A changed file is a new commit with a new etag; older commits and refs stay served, and
    a cached file asked by commit sha needs no request."""
    first = hub.commit(DATA, repo_type="dataset")
    hub.set_ref(DATA, "refs/pr/1", first, repo_type="dataset")
    second = hub.add_file(DATA, "a/b/small.json", b'{"classes": []}', repo_type="dataset")
    assert second != first and hub.commit(DATA, repo_type="dataset") == second
    old_etag = hub.etag(DATA, "a/b/small.json", repo_type="dataset", revision=first)
    assert hub.etag(DATA, "a/b/small.json", repo_type="dataset") != old_etag

    new = Path(hf_hub_download(DATA, "a/b/small.json", repo_type="dataset"))
    assert new.read_bytes() == b'{"classes": []}' and new.parents[2].name == second
    old = Path(hf_hub_download(DATA, "a/b/small.json", repo_type="dataset", revision=first))
    assert old.read_bytes() == SMALL and old.resolve().name == old_etag
    pr = Path(hf_hub_download(DATA, "a/b/small.json", repo_type="dataset", revision="refs/pr/1"))
    assert pr == old
    assert any("/resolve/refs%2Fpr%2F1/" in r.path for r in hub.requests)

    hub.requests.clear()
    assert hf_hub_download(DATA, "a/b/small.json", repo_type="dataset", revision=first) == str(old)
    assert hub.requests == []


def test_list_repo_tree_and_repo_info(hub: LoopbackHub) -> None:
    """Folder listings (flat and recursive) with sizes and LFS info, and the repo info."""
    items = list(list_repo_tree(DATA, path_in_repo="a/b", repo_type="dataset"))
    assert {f.path: f.size for f in items if isinstance(f, RepoFile)} == {
        "a/b/big.bin": len(BIG),
        "a/b/small.json": len(SMALL),
    }
    big = next(f for f in items if f.path == "a/b/big.bin")
    assert big.lfs is not None and big.lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    root = list(list_repo_tree(DATA, repo_type="dataset"))
    assert [(type(f), f.path) for f in root] == [(RepoFile, "README.md"), (RepoFolder, "a")]
    assert sorted(list_repo_files(DATA, repo_type="dataset")) == sorted(DATASET_FILES)

    sha = hub.commit(DATA, repo_type="dataset")
    info = dataset_info(DATA)
    assert info.sha == sha and sorted(s.rfilename for s in info.siblings) == sorted(DATASET_FILES)
    assert repo_info(MODEL).sha == hub.commit(MODEL)
    assert HfApi().model_info(MODEL, revision=hub.commit(MODEL)).id == MODEL


def test_snapshot_download_of_a_model(hub: LoopbackHub) -> None:
    """snapshot_download lists the repo (repo_info, then the tree) and downloads every file."""
    folder = Path(snapshot_download(MODEL))
    assert folder.name == hub.commit(MODEL)
    assert {p: (folder / p).read_bytes() for p in MODEL_FILES} == MODEL_FILES


def test_gated_repo(hub: LoopbackHub) -> None:
    """No token: the Hub's 401 GatedRepo; an accepted token: the file; any other token: 403
    GatedRepo. huggingface_hub raises GatedRepoError for both, on files and API calls."""
    with pytest.raises(GatedRepoError) as refused:
        hf_hub_download(GATED, "x.txt", repo_type="dataset")
    assert refused.value.response.status_code == 401
    with pytest.raises(GatedRepoError):
        list(list_repo_tree(GATED, repo_type="dataset"))
    with pytest.raises(GatedRepoError) as refused:
        hf_hub_download(GATED, "x.txt", repo_type="dataset", token="hf_bad")
    assert refused.value.response.status_code == 403
    path = hf_hub_download(GATED, "x.txt", repo_type="dataset", token="hf_good")
    assert Path(path).read_bytes() == b"secret\n"
    assert dataset_info(GATED, token="hf_good").gated == "manual"


def test_unknown_repo_file_and_revision(hub: LoopbackHub, tmp_path: Path) -> None:
    """The Hub's 404s become huggingface_hub's own exceptions."""
    with pytest.raises(RepositoryNotFoundError) as missing:
        hf_hub_download("org/nope", "x.txt", repo_type="dataset")
    assert type(missing.value) is RepositoryNotFoundError  # not a GatedRepoError
    with pytest.raises(RepositoryNotFoundError):
        dataset_info("org/nope")
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        hf_hub_download(DATA, "nope.txt", repo_type="dataset")
    assert isinstance(missing.value, EntryNotFoundError)
    sha = hub.commit(DATA, repo_type="dataset")  # the 404 names the commit: cached as missing
    assert (_cache(tmp_path, "dataset", DATA) / ".no_exist" / sha / "nope.txt").is_file()
    with pytest.raises(RemoteEntryNotFoundError):
        list(list_repo_tree(DATA, path_in_repo="nope", repo_type="dataset"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(DATA, "README.md", repo_type="dataset", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        dataset_info(DATA, revision="0" * 40)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """http_get waits time.sleep(1) before each retry: record the waits instead."""
    waits: list[float] = []
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=waits.append))
    return waits


def _ranges(hub: LoopbackHub) -> list[str | None]:
    """The Range header of each GET of big.bin."""
    return [h.get("range") for h in _gets(hub, "/a/b/big.bin")]


def test_cut_download_is_retried_within_the_call(hub: LoopbackHub, sleeps: list[float]) -> None:
    """huggingface_hub 2.4.0 on a dropped download: http_get catches httpx2's
    RemoteProtocolError, waits 1 s and GETs again in the same call, from the last byte it
    wrote. It writes whole chunks of constants.DOWNLOAD_CHUNK_SIZE (10 MiB) only, so a file
    under 10 MiB has none written: the retry asks for the whole file again, without Range."""
    hub.cut_next_download(after_bytes=100_000)
    path = hf_hub_download(DATA, "a/b/big.bin", repo_type="dataset")
    assert Path(path).read_bytes() == BIG
    assert _ranges(hub) == [None, None]
    assert sleeps == [1]


def test_cut_download_resumes_with_range(
    hub: LoopbackHub, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With whole chunks written before the cut (32 KiB chunks here, as a file over 10 MiB has
    with the real size), the retry asks ``Range: bytes=N-`` from the end of the last whole
    chunk; the hub answers 206 and the file is whole."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 32_768)
    hub.cut_next_download(after_bytes=100_000)
    path = hf_hub_download(DATA, "a/b/big.bin", repo_type="dataset")
    assert Path(path).read_bytes() == BIG
    assert _ranges(hub) == [None, "bytes=98304-"]  # 3 chunks of 32 KiB kept, 1696 bytes lost
    assert sleeps == [1]


def test_failed_download_restarts_from_zero(
    hub: LoopbackHub, sleeps: list[float], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Resuming is within a call only: once http_get's retries are spent (5 in a row without a
    byte), the call raises and deletes its partial file (``<etag>.<random>.incomplete``, unique
    to the call), so the next call GETs the whole file, without Range."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 32_768)
    hub.cut_next_download(after_bytes=100_000)
    hub.cut_next_download(after_bytes=0, times=5)
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(DATA, "a/b/big.bin", repo_type="dataset")
    assert _ranges(hub) == [None] + ["bytes=98304-"] * 5
    assert len(sleeps) == 5
    assert list((_cache(tmp_path, "dataset", DATA) / "blobs").iterdir()) == []

    hub.requests.clear()
    assert Path(hf_hub_download(DATA, "a/b/big.bin", repo_type="dataset")).read_bytes() == BIG
    assert _ranges(hub) == [None]


def test_offline(hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a cached file comes from refs/main without any request; a file not cached
    raises LocalEntryNotFoundError and an API call OfflineModeIsEnabled."""
    path = hf_hub_download(DATA, "a/b/small.json", repo_type="dataset")
    hub.requests.clear()
    LoopbackHub.offline(monkeypatch)
    assert hf_hub_download(DATA, "a/b/small.json", repo_type="dataset") == path
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(DATA, "README.md", repo_type="dataset")
    with pytest.raises(OfflineModeIsEnabled):
        list(list_repo_tree(DATA, repo_type="dataset"))
    assert hub.requests == []


def test_subprocess_env(hub: LoopbackHub, tmp_path: Path) -> None:
    """hub.env(home) points a fresh interpreter at the hub, with its cache under home."""
    code = (
        "from huggingface_hub import hf_hub_download;"
        f"print(hf_hub_download({DATA!r}, 'a/c.txt', repo_type='dataset'))"
    )
    env = {**os.environ, **hub.env(tmp_path / "sub")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    path = Path(out.stdout.strip())
    assert path.is_relative_to(tmp_path / "sub" / "hub") and path.read_bytes() == b"c\n"
    assert out.stderr == ""


def test_range_and_unknown_routes(hub: LoopbackHub) -> None:
    """Ranges as HTTP has them (206 with Content-Range, 416 past the end); routes the hub does
    not serve are a plain 404, and logged."""
    url = f"{hub.endpoint}/datasets/{DATA}/resolve/main/a/b/big.bin"
    tail = httpx2.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == BIG[-10:]
    assert tail.headers["Content-Range"] == f"bytes {len(BIG) - 10}-{len(BIG) - 1}/{len(BIG)}"
    middle = httpx2.get(url, headers={"Range": "bytes=5-9"})
    assert middle.status_code == 206 and middle.content == BIG[5:10]
    assert httpx2.get(url, headers={"Range": f"bytes={len(BIG)}-"}).status_code == 416
    head = httpx2.head(url)
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(BIG).hexdigest()}"'
    assert head.headers["Content-Length"] == str(len(BIG)) and "X-Xet-Hash" not in head.headers
    for response in (
        httpx2.get(f"{hub.endpoint}/api/agent-harnesses"),
        httpx2.post(f"{hub.endpoint}/api/datasets/{DATA}/paths-info/main", json={"paths": []}),
    ):
        assert response.status_code == 404 and "X-Error-Code" not in response.headers
    assert hub.requests[-1].method == "POST"


def test_shutdown_and_quiet(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Requests print nothing; leaving the block stops the threads and closes the socket."""
    with LoopbackHub() as hub:
        hub.add_repo(MODEL, files=MODEL_FILES)
        hub.patch(monkeypatch, tmp_path)
        assert sorted(list_repo_files(MODEL)) == sorted(MODEL_FILES)
        with pytest.raises(RepositoryNotFoundError):
            repo_info("org/nope")
        port = int(hub.endpoint.rsplit(":", 1)[1])
    assert capfd.readouterr().err == ""
    assert not any(t.name == "LoopbackHub" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
